"""Tile configurations and the choice between the mma.sync and wgmma prefill kernels (CPU)."""
import numpy as np
import pytest

from cpattn import _core, _tiles

SMEM_PER_BLOCK = 227 * 1024  # the opt-in limit of an H100 / H200 block
SMEM_PER_SM = 228 * 1024 - 2 * 1024  # an SM's, less the 1 KB the driver reserves a CTA (two)


@pytest.mark.parametrize("head_dim", _tiles.HEAD_DIMS)
def test_hopper_tiles_match_the_mma_sync_rows_and_fit(head_dim):
    hopper, ampere = _tiles.PREFILL_SM90[head_dim], _tiles.PREFILL[head_dim]
    # Same rows: a plan's GQA limit and query tiles do not depend on the path.
    assert hopper.rows == ampere.rows
    assert hopper.threads == 128 * (hopper.warpgroups + 1)  # a producer + the consumers
    assert hopper.smem_bytes(head_dim) <= SMEM_PER_BLOCK
    # wgmma's swizzled tiles start 1024-byte aligned: Q and every K / V stage are multiples.
    assert hopper.rows * head_dim * 2 % 1024 == 0 and hopper.tile * head_dim * 2 % 1024 == 0
    assert hopper.op == "batch_attention_sm90" and ampere.op == "batch_attention"
    assert hopper.targs("half", head_dim) in _tiles.hopper_variants()


@pytest.mark.parametrize("head_dim", _tiles.HEAD_DIMS)
def test_hopper_decode_tiles_match_the_mma_sync_rows_and_fit(head_dim):
    hopper, ampere = _tiles.DECODE_SM90[head_dim], _tiles.DECODE[head_dim]
    assert hopper.rows == ampere.rows == 16  # the same plans on both paths
    assert hopper.threads == 256 and hopper.tile % (16 * hopper.warps_kv) == 0
    # Its CTAs fit an SM together, in shared memory and in registers.
    assert hopper.ctas * hopper.smem_bytes(head_dim) <= SMEM_PER_SM
    assert hopper.ctas * hopper.threads * hopper.launch_registers <= 65536
    assert hopper.launch_registers % 8 == 0
    # The Q buffers and every K / V stage keep the 1024-byte alignment of the swizzled tiles.
    assert 2 * hopper.rows * head_dim * 2 % 1024 == 0 and hopper.tile * head_dim * 2 % 1024 == 0
    assert _core.ctas_per_sm(hopper, head_dim) == hopper.ctas
    assert hopper.targs("half", head_dim) in _tiles.hopper_decode_variants()


def test_hopper_path_takes_the_hopper_decode_tiles(monkeypatch):
    monkeypatch.setattr(_core, "hopper_path", lambda: True)
    assert _core.choose_tiles(128, 4, 1) == _tiles.DECODE_SM90[128]
    assert _core.choose_tiles(128, 4, 4) == _tiles.DECODE_SM90[128]  # 4 queries x 4 heads
    assert _core.choose_tiles(128, 4, 5) == _tiles.PREFILL_SM90[128]


def test_hopper_decode_registers_follow_its_ctas():
    assert _tiles.HopperDecodeTileConfig(64, 5, 1).launch_registers == 248
    assert _tiles.HopperDecodeTileConfig(64, 2, 2).launch_registers == 128


def test_hopper_ctas_per_sm_are_its_launch_bounds():
    cfg = _tiles.HopperTileConfig(2, 128, 2, 1)
    assert _core.ctas_per_sm(cfg, 128) == 1
    assert _core.ctas_per_sm(_tiles.HopperTileConfig(1, 64, 3, 2), 128) == 2


def test_arch_path_override_needs_no_device(monkeypatch):
    monkeypatch.setenv("CPATTN_ARCH_PATH", "sm80")
    assert _core.hopper_path() is False
    monkeypatch.setenv("CPATTN_ARCH_PATH", "SM80")
    assert _core.hopper_path() is False
    assert _core.choose_tiles(128, 4, 4096) == _tiles.PREFILL[128]
    # Decode shapes take the decode tiles on every path.
    assert _core.choose_tiles(128, 4, 1) == _tiles.DECODE[128]


def test_tma_maps_layout_matches_the_kernel_struct():
    """KVTensorMaps of kernels_cu/common/tma.cuh: two 128-byte maps, 128-byte aligned, then the
    flag; the struct's alignment rounds it to 384 bytes."""
    from cpattn import _tma
    dt = _tma.KV_MAPS_DTYPE
    assert (dt.fields["k"][1], dt.fields["v"][1], dt.fields["enabled"][1]) == (0, 128, 256)
    assert dt.itemsize == 384


@pytest.mark.parametrize("page_size, layout, expected", [
    (16, "NHD", (50 * 16, 8, 16)), (64, "NHD", (50 * 64, 8, 64)), (128, "NHD", (50 * 128, 8, 128)),
    (5, "NHD", None), (24, "NHD", None), (256, "NHD", None), (4, "NHD", None), (16, "HND", None)])
def test_tma_takes_power_of_two_nhd_pages_that_divide_the_tile(page_size, layout, expected):
    from cpattn import _tma
    shape = (50, page_size, 8, 128) if layout == "NHD" else (50, 8, page_size, 128)
    slot, head = (8 * 128, 128) if layout == "NHD" else (128, page_size * 128)
    strides = [(page_size * 8 * 128, slot, head)] * 2
    assert _tma.row_boxes(shape, strides, layout, True, 128, 128) == expected


def test_tma_takes_pages_of_8_at_any_head_dim():
    """One producer lane copies each page of a tile, so only the page count a tile (<= 32) and
    the 8-row swizzle atom bound the page size."""
    from cpattn import _tma
    strides = [(8 * 8 * 64, 8 * 64, 64)] * 2
    assert _tma.row_boxes((50, 8, 8, 64), strides, "NHD", True, 64, 128) == (400, 8, 8)


def test_tma_needs_contiguous_pages_and_16_byte_strides():
    from cpattn import _tma
    spaced = [(2 * 16 * 1024, 1024, 128)] * 2  # pages of a larger buffer: slots do not run on
    assert _tma.row_boxes((50, 16, 8, 128), spaced, "NHD", True, 128, 128) is None
    odd = [(0, 1028, 128)] * 2
    assert _tma.row_boxes((100, 8, 128), odd, "NHD", False, 128, 128) is None
    assert _tma.row_boxes((0, 8, 128), [(0, 1024, 128)] * 2, "NHD", False, 128, 128) is None
    hnd = [(0, 128, 100 * 128)] * 2  # single-request HND [heads, tokens, head_dim]
    assert _tma.row_boxes((8, 100, 128), hnd, "HND", False, 128, 128) == (100, 8, 128)


def test_tma_doctests():
    import doctest
    from cpattn import _tma
    result = doctest.testmod(_tma)
    assert result.attempted > 0 and result.failed == 0


class _FakeArray:
    """What Launcher._encode_maps reads of a CuPy array (no GPU needed)."""
    def __init__(self, shape, ptr):
        self.shape = shape
        self.strides = tuple(int(np.prod(shape[i + 1:])) * 2 for i in range(len(shape)))
        self.data = type("Memory", (), {"ptr": ptr})()
        self.itemsize = 2


def _launcher_stub(paged):
    from cpattn import _tma
    stub = object.__new__(_core.Launcher)  # no kernel, no launch: the map fields only
    stub.maps = np.zeros((), _tma.KV_MAPS_DTYPE)
    stub.kv_layout, stub.paged, stub.head_dim, stub._box_rows, stub._maps_of = "NHD", paged, 128, 128, None
    stub._maps_kept = _tma.MapsCache()
    return stub


def test_tma_maps_encode_k_and_v_by_their_own_rows(monkeypatch):
    from cpattn import _tma
    calls = []
    monkeypatch.setattr(_tma, "encode_rows", lambda out, ptr, *args: calls.append((ptr,) + args))
    stub = _launcher_stub(paged=True)
    k, v = _FakeArray((40, 16, 8, 128), 1 << 20), _FakeArray((50, 16, 8, 128), 1 << 30)
    _core.Launcher._encode_maps(stub, k, v)
    assert int(stub.maps["enabled"]) == 1
    assert calls == [(1 << 20, 640, 8, 128, 1024, 128, 16), (1 << 30, 800, 8, 128, 1024, 128, 16)]
    _core.Launcher._encode_maps(stub, k, v)  # same arrays: not encoded again
    assert len(calls) == 2


def test_tma_maps_of_arrays_seen_before_are_not_encoded_again(monkeypatch):
    """A serving loop runs each layer on its own pools: their maps are kept, not re-encoded."""
    from cpattn import _tma
    calls = []

    def encode(out, ptr, *args):
        calls.append(ptr)
        out[:] = ptr  # a map that names its array

    monkeypatch.setattr(_tma, "encode_rows", encode)
    stub = _launcher_stub(paged=True)
    layers = [(_FakeArray((40, 16, 8, 128), (2 * i + 1) << 20),
               _FakeArray((40, 16, 8, 128), (2 * i + 2) << 20)) for i in range(3)]
    for _ in range(4):
        for k, v in layers:
            _core.Launcher._encode_maps(stub, k, v)
            assert int(stub.maps["k"][0]) == k.data.ptr and int(stub.maps["v"][0]) == v.data.ptr
    assert len(calls) == 6  # each layer's two maps, once


def test_tma_maps_fall_back_to_cp_async(monkeypatch):
    from cpattn import _tma

    def refuse(*args):
        raise RuntimeError("cuTensorMapEncodeTiled failed (1)")

    monkeypatch.setattr(_tma, "encode_rows", refuse)
    stub = _launcher_stub(paged=False)
    stub.maps["enabled"] = 1
    _core.Launcher._encode_maps(stub, _FakeArray((100, 8, 128), 256), _FakeArray((100, 8, 128), 512))
    assert int(stub.maps["enabled"]) == 0  # the driver refused: the kernel copies by cp.async
    stub = _launcher_stub(paged=True)  # page size 5: no maps at all
    _core.Launcher._encode_maps(stub, _FakeArray((40, 5, 8, 128), 256), _FakeArray((40, 5, 8, 128), 512))
    assert int(stub.maps["enabled"]) == 0


def test_split_decode_merges_in_the_kernel_on_hopper_up_to_32_chunks():
    from cpattn import decode
    hopper, ampere = _tiles.DECODE_SM90, _tiles.DECODE
    chunks = lambda *n: np.concatenate([[0], np.cumsum(n)])
    assert decode.fuses_merge(hopper[128], 128, chunks(32, 1, 5))
    assert not decode.fuses_merge(hopper[128], 128, chunks(33, 1))
    assert decode.fuses_merge(hopper[64], 64, chunks(2, 2))
    assert not decode.fuses_merge(hopper[256], 256, chunks(2, 2))  # its registers would spill
    assert not decode.fuses_merge(ampere[128], 128, chunks(2, 2))  # merge_state's kernel


def test_mla_maps_of_pools_seen_before_are_not_encoded_again(monkeypatch):
    """BatchMLA keeps the tensor maps of every pair of latent pools it ran on (layers, or input
    sets a benchmark rotates): a pool seen before costs no encoding."""
    from cpattn import _tma, mla
    calls = []

    def encode(out, ptr, *args):
        calls.append(ptr)
        out[:] = ptr

    monkeypatch.setattr(_tma, "encode_rows", encode)
    wrapper = mla.BatchMLA()
    wrapper._plan = dict(maps=np.zeros((), _tma.KV_MAPS_DTYPE), maps_of=None, tile=64)
    layers = [(_FakeArray((40, 64, 512), (2 * i + 1) << 20),
               _FakeArray((40, 64, 64), (2 * i + 2) << 20)) for i in range(3)]
    for _ in range(4):
        for ckv, kpe in layers:
            wrapper._encode_maps(ckv, kpe)
            maps = wrapper._plan["maps"]
            assert int(maps["enabled"]) == 1
            assert int(maps["k"][0]) == ckv.data.ptr and int(maps["v"][0]) == kpe.data.ptr
    assert len(calls) == 6  # each pair's two maps, once


def test_packed_row_division_by_multiply_is_exact():
    """work_item.cuh's packed_row takes r / group as the high word of r * ceil(2^32 / group)
    (RowDivider: 0xffffffff // group + 1; r itself for a group of 1)."""
    rows = np.arange(1 << 16, dtype=np.uint64)
    for group in range(1, 257):
        magic = np.uint64(0xFFFFFFFF // group + 1 if group > 1 else 0)
        query = (rows * magic) >> np.uint64(32) if magic else rows
        head = rows - query * np.uint64(group)
        assert np.array_equal(query, rows // np.uint64(group)), group
        assert np.array_equal(head, rows % np.uint64(group)), group
        if group > 1:
            assert magic == -(-(1 << 32) // group)
