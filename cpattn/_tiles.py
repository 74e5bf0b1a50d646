"""Tile shapes of the attention kernels: defined here once (the kernel static_asserts what it
needs of them; shared-memory sizes are computed here and checked against the device).

``batch_attention_kernel<T, HEAD_DIM, M_TILES, WARPS_Q, WARPS_KV, TILE, STAGES>``: a CTA holds
``16 * M_TILES * WARPS_Q`` packed (query, head) rows (each warp ``M_TILES`` blocks of 16) and
streams keys ``TILE`` at a time through ``STAGES`` shared-memory buffers; ``WARPS_KV`` warps
split each tile's keys.
"""
from __future__ import annotations

from dataclasses import dataclass

HEAD_DIMS = (64, 128, 256)
ATTENTION_CTYPES = ("half", "__nv_bfloat16")


@dataclass(frozen=True)
class TileConfig:
    m_tiles: int
    warps_q: int
    warps_kv: int
    tile: int
    stages: int
    op = "batch_attention"

    @property
    def rows(self) -> int:
        """Packed (query, head) rows of one CTA."""
        return 16 * self.m_tiles * self.warps_q

    @property
    def threads(self) -> int:
        return 32 * self.warps_q * self.warps_kv

    def smem_bytes(self, head_dim: int) -> int:
        """Dynamic shared memory: Q rows + K/V stages, or the cross-warp merge if larger."""
        row = head_dim * 2
        pipeline = self.rows * row + 2 * self.stages * self.tile * row
        merge = self.warps_kv * self.warps_q * (head_dim // 2 + 4) * 32 * 4 if self.warps_kv > 1 else 0
        return max(pipeline, merge)

    def targs(self, ctype: str, head_dim: int) -> tuple[str, ...]:
        return (ctype, str(head_dim), str(self.m_tiles), str(self.warps_q), str(self.warps_kv),
                str(self.tile), str(self.stages))


#: Many queries per request: four warps of 32 rows each (16 at head_dim 256, for registers), one
#: tile of keys shared by all of them. Head_dim 128 takes tiles of 64 keys although its registers
#: then spill 24 bytes built for sm_80 (none for sm_90): H200, 32 heads, TFLOP/s, 32 / 64 keys:
#: B8 S2048 209 / 242, causal 177 / 195; B2 S8192 218 / 252, causal 204 / 236.
PREFILL = {64: TileConfig(2, 4, 1, 64, 2), 128: TileConfig(2, 4, 1, 64, 2),
           256: TileConfig(1, 4, 1, 32, 2)}
#: One query (or a few) per request: the GQA group fills the 16 rows; four warps split the keys.
DECODE = {64: TileConfig(1, 1, 4, 64, 2), 128: TileConfig(1, 1, 4, 64, 2),
          256: TileConfig(1, 1, 4, 64, 2)}


WORK_SLOT_BYTES = 64  #: a work handed to the consumers (kv_producer.cuh)


def pipeline_smem_bytes(rows: int, tile: int, stages: int, head_dim: int) -> int:
    """The shared memory of the sm_90a kernels' producer pipeline (kv_producer.cuh Pipeline):
    two buffers of Q rows + K/V stages (each a multiple of 1024 bytes: the tiles stay aligned) +
    the full and empty barriers of the stages and of the Q buffers (8 bytes each) + the works of
    the two Q buffers."""
    row = head_dim * 2
    return 2 * rows * row + 2 * stages * tile * row + 8 * (2 * stages + 4) + 2 * WORK_SLOT_BYTES


@dataclass(frozen=True)
class HopperTileConfig:
    """``batch_attention_sm90_kernel<T, HEAD_DIM, WARPGROUPS, TILE, STAGES, CTAS>`` (wgmma,
    sm_90a, warp specialised, persistent): a producer warpgroup streams keys ``TILE`` at a time
    through ``STAGES`` buffers to ``warpgroups`` consumer warpgroups of 64 packed rows each;
    registers are capped so that ``CTAS`` CTAs fit an SM, and the grid holds at most that many
    CTAs per SM, each looping over works. Same planning interface as TileConfig."""
    warpgroups: int
    tile: int
    stages: int
    ctas: int = 1  #: CTAs resident per SM the registers are capped for (launch bounds)
    op = "batch_attention_sm90"
    warps_kv = 1

    @property
    def rows(self) -> int:
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        return 128 * (self.warpgroups + 1)

    @property
    def launch_registers(self) -> int:
        """Registers a thread at launch (the kernel's launch_registers()): the register file's
        share of each thread, a multiple of 8, at most 248."""
        return min(248, 65536 // self.threads // 8 * 8)

    def smem_bytes(self, head_dim: int) -> int:
        """The producer pipeline (``pipeline_smem_bytes``)."""
        return pipeline_smem_bytes(self.rows, self.tile, self.stages, head_dim)

    def targs(self, ctype: str, head_dim: int) -> tuple[str, ...]:
        return (ctype, str(head_dim), str(self.warpgroups), str(self.tile), str(self.stages),
                str(self.ctas))


#: Hopper prefill: two consumer warpgroups of 64 rows (one at head_dim 256, for registers); keys in
#: tiles of 128 (64 at head_dim 256) through as many stages as fit beside the two Q buffers.
PREFILL_SM90 = {64: HopperTileConfig(2, 128, 4), 128: HopperTileConfig(2, 128, 2),
                256: HopperTileConfig(1, 64, 2)}


@dataclass(frozen=True)
class HopperDecodeTileConfig:
    """``batch_decode_sm90_kernel<T, HEAD_DIM, TILE, STAGES, CTAS>`` (sm_90a, warp specialised,
    persistent, ``ctas`` CTAs an SM): the decode tiles' 16 packed rows, the producer warpgroup of
    the Hopper prefill kernel streaming keys ``TILE`` at a time through ``STAGES`` buffers, one
    consumer warpgroup whose 4 warps split each tile's keys (mma.sync) and merge their states at
    the end of a work. Same planning interface as TileConfig."""
    tile: int
    stages: int
    ctas: int = 1  #: CTAs resident per SM the registers are capped for (launch bounds)
    op = "batch_decode_sm90"
    rows = 16
    threads = 256
    warps_kv = 4

    @property
    def launch_registers(self) -> int:
        """mbarrier.cuh launch_registers<1, CTAS>(): 65536 / CTAS / 256, a multiple of 8, at
        most 248."""
        return min(248, 65536 // self.ctas // self.threads // 8 * 8)

    def smem_bytes(self, head_dim: int) -> int:
        """The pipeline (``pipeline_smem_bytes``) + the states warps 1..3 publish at the end of
        a work (``head_dim / 2 + 4`` floats a thread) + the fused merge's flag (16 bytes)."""
        return (pipeline_smem_bytes(self.rows, self.tile, self.stages, head_dim)
                + (self.warps_kv - 1) * (head_dim // 2 + 4) * 32 * 4 + 16)

    def targs(self, ctype: str, head_dim: int) -> tuple[str, ...]:
        return (ctype, str(head_dim), str(self.tile), str(self.stages), str(self.ctas))

    @staticmethod
    def fused_merge(head_dim: int) -> bool:
        """Whether the kernel merges a split request's states itself (its FUSED_MERGE): up to
        head_dim 128 (at 256 the merge's registers would spill in the tile loop)."""
        return head_dim <= 128


#: A split decode request's states are merged in the attention kernel (by its last chunk's four
#: warps) up to this many chunks; beyond, by the merge_state kernel's many CTAs.
FUSED_MERGE_MOST_CHUNKS = 32


#: Hopper decode: 64-key tiles; two CTAs an SM where two fit (H200, 32/8 heads, hd128: two CTAs
#: of 2 stages 4075-4154 GB/s at B64 L4096 / B256 L1024 against 3843-4018 for one CTA of 5: an
#: SM's other CTA computes while one folds its warps' states at the end of a work).
DECODE_SM90 = {64: HopperDecodeTileConfig(64, 4, 2), 128: HopperDecodeTileConfig(64, 2, 2),
               256: HopperDecodeTileConfig(64, 2, 1)}

#: Tiles of the persistent kernels: a grid of at most ``ctas`` CTAs an SM, each looping over works.
PERSISTENT = (HopperTileConfig, HopperDecodeTileConfig)


def hopper_variants() -> list[tuple[str, ...]]:
    return [PREFILL_SM90[d].targs(t, d) for t in ATTENTION_CTYPES for d in HEAD_DIMS]


def hopper_decode_variants() -> list[tuple[str, ...]]:
    return [DECODE_SM90[d].targs(t, d) for t in ATTENTION_CTYPES for d in HEAD_DIMS]


def attention_variants() -> list[tuple[str, ...]]:
    return [cfg[d].targs(t, d) for t in ATTENTION_CTYPES for d in HEAD_DIMS
            for cfg in (PREFILL, DECODE)]


# ---- MLA -------------------------------------------------------------------------------------

MLA_CKV_DIM, MLA_KPE_DIM = 512, 64


@dataclass(frozen=True)
class MLATileConfig:
    """``mla_attention_kernel<T, M_TILES, WARPS, TILE, STAGES, KSPLIT>``: a CTA holds
    ``16 * M_TILES`` packed (query, head) rows, all shared by its ``WARPS`` warps; keys stream
    ``TILE`` at a time through ``STAGES`` buffers of [ckv | kpe] rows. The 576 dims of Q K^T are
    cut in ``KSPLIT`` parts, each computed by ``WARPS / KSPLIT`` warps across the tile's keys."""
    m_tiles: int
    warps: int
    tile: int
    stages: int
    ksplit: int = 1
    ctas: int = 1  #: CTAs resident per SM the planner counts on
    op = "mla_attention"

    @property
    def rows(self) -> int:
        return 16 * self.m_tiles

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def smem_bytes(self) -> int:
        """Q rows + K/V stages (576 dims each), P (rows padded by 8), the warps' row maxima,
        the S sums of the parts past the first (fp32)."""
        row = (MLA_CKV_DIM + MLA_KPE_DIM) * 2
        return (self.rows * row + self.stages * self.tile * row + self.rows * (self.tile + 8) * 2
                + self.warps * self.rows * 4 + (self.ksplit - 1) * self.rows * self.tile * 4)

    def targs(self, ctype: str) -> tuple[str, ...]:
        return (ctype, str(self.m_tiles), str(self.warps), str(self.tile), str(self.stages),
                str(self.ksplit))


#: 16 rows (decode with up to 16 heads) and 32 rows (more heads, or several queries).
#: At 16 rows, 8 warps in two halves of the dims of S: two warps a scheduler, not one (H200,
#: 16 heads, same process: +3-6% over 4 warps on every batch shape; 16 warps in four parts, or
#: 4-5 stages of 32-key tiles, gain nothing or lose). The 32 rows the same way: +8-12% on the
#: H200 (H32 B64 L4096 2161 -> 2395 GB/s, H128 610 -> 686).
MLA_TILES = (MLATileConfig(1, 8, 64, 2, 2), MLATileConfig(2, 8, 64, 2, 2))

#: 16 rows when a plan has two CTAs for every SM without splitting any key range (a large batch):
#: 4 warps (at most 255 registers each) and 32-key tiles (96 KB of shared memory), so two CTAs
#: share an SM and one computes while the other waits (H200, 16 heads, GB/s, MLA_MANY /
#: MLA_TILES[0]: B264 L1024 3775 / 3475, B512 L1024 3915 / 3655, B2048 L256 3191 / 2752; B300 L512
#: 2420 / 2549, a short second wave; at 128 CTAs, split or not, they lose: B128 L8192 4271 / 4397).
MLA_MANY = MLATileConfig(1, 4, 32, 2, 2, ctas=2)

#: The time of a wave of MLA_MANY pairs (two CTAs an SM) over a wave of MLA_TILES[0] CTAs (one an
#: SM), from the H200 figures above (B264 L1024: one wave against two, 3775 / 3475 GB/s gives
#: 2 * 3475 / 3775). With it, ``mla.many_ctas``'s wave counts pick the faster of the two on
#: every batch measured but a tie (B396, 2990 / 2997: the 16-row tiles are picked), 16 heads,
#: GB/s, 16-row / MLA_MANY, same process: B264 L512 2894 / 3266,
#: B300 L512 2529 / 2378, B300 L2048 3252 / 3173, B396 L512 2990 / 2997, B400 L1024 2995 / 3405,
#: B528 L512 3032 / 3443, B600 L1024 3534 / 3376, B700 L512 3024 / 3436, B792 L512 3119 / 3531.
MLA_MANY_PAIR_TIME = 1.84

#: A split query tile of the mma.sync MLA kernel is merged by the CTA of its last chunk up to
#: this many chunks; beyond, by merge_state (one CTA reading them all becomes the tail). H200,
#: 16 heads, GB/s merge_state / fused: B64 L4096 (2 chunks) 3420 / 3525, B32 L16384 (4) 3800 /
#: 3760, B16 L4096 (8) 2310 / 2110.
MLA_FUSED_MOST_CHUNKS = 2


@dataclass(frozen=True)
class HopperMLATileConfig:
    """``mla_attention_sm90_kernel<T, TILE, STAGES>`` (wgmma, sm_90a, warp specialised): a
    producer warpgroup loads for two consumer warpgroups sharing 64 packed rows; each consumer
    computes S for half of a tile's keys and O for half of the 512 dims."""
    tile: int
    stages: int
    op = "mla_attention_sm90"
    rows = 64
    ctas = 1  #: CTAs resident per SM the planner counts on
    threads = 384
    launch_registers = 168  #: 65536 / 384, a multiple of 8 (the kernel's launch_registers<2>())

    def smem_bytes(self) -> int:
        """Q rows + key stages (576 dims each) + P (rows x tile) + the warpgroups' row values +
        the stages' full and empty barriers and Q's (8 bytes each)."""
        row = (MLA_CKV_DIM + MLA_KPE_DIM) * 2
        return (self.rows * row + self.stages * self.tile * row + self.rows * self.tile * 2
                + 2 * self.rows * 4 + 8 * (2 * self.stages + 1))

    def targs(self, ctype: str) -> tuple[str, ...]:
        return (ctype, str(self.tile), str(self.stages))


#: Hopper MLA: 64 rows (128 heads in two head blocks, or several queries of fewer heads).
MLA_SM90 = HopperMLATileConfig(64, 2)


def mla_variants() -> list[tuple[str, ...]]:
    return [cfg.targs(t) for t in ATTENTION_CTYPES for cfg in (*MLA_TILES, MLA_MANY)]


def mla_hopper_variants() -> list[tuple[str, ...]]:
    return [MLA_SM90.targs(t) for t in ATTENTION_CTYPES]
