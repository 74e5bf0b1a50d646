"""MLA: multi-head latent attention (DeepSeek-V2/V3 with absorbed weights) over a paged latent cache.

Every head attends one shared latent cache: key j is ``[ckv_j | kpe_j]`` (512 + 64 dims) and its
value is ``ckv_j``. Scores are ``(q_nope . ckv + q_pe . kpe) * sm_scale``; ``sm_scale`` has no
default (DeepSeek-V3 uses ``1 / sqrt(128 + 64)``, the head_dim before absorption).

- :class:`MLAPagedCache`: the ``ckv`` / ``kpe`` page pools (separate arrays, or views of one
  ``[num_pages, page_size, 576]`` array), with the page allocator of :class:`PagedKVCache`.
- :class:`BatchMLA`: plan once per step, run every layer; decode (one query per request) and
  multi-token queries (speculative decoding, MTP, prefill with absorbed weights), causal
  bottom-right. Small batches with long contexts are split over the keys and merged; with
  ``use_cuda_graph=True`` a captured ``run()`` replays after any later ``plan()`` that fits.
"""
from __future__ import annotations

import math

import numpy as np

from . import _arrays as A
from . import _core, _kernels, _tiles, _tma, planner
from .attention import _host_indptr, attention_dtype
from .paged import SequencePages, _PageTables, _cache_dtype, _intake_pools, _new_pools, _write
from .planner import positive_int

__all__ = ["BatchMLA", "MLAPagedCache"]

CKV_DIM, KPE_DIM = _tiles.MLA_CKV_DIM, _tiles.MLA_KPE_DIM

_PTR_FIELDS = ("q_nope", "q_pe", "ckv", "kpe", "o", "lse", "partial_o", "partial_lse",
               "qo_indptr", "kv_indptr", "kv_indices", "kv_lens", "num_items", "item_request",
               "item_q_start", "item_kv_start", "item_kv_end", "item_state", "item_state_stride",
               "merge_indptr", "merge_counters")
_STRIDE_FIELDS = ("q_nope_stride_token", "q_nope_stride_head", "q_pe_stride_token",
                  "q_pe_stride_head", "ckv_stride_page", "ckv_stride_slot", "kpe_stride_page",
                  "kpe_stride_slot")
#: ``MLAParams`` of kernels_cu/common/mla_params.cuh, field by field (C layout).
MLA_PARAMS_DTYPE = np.dtype([(f, np.uint64) for f in _PTR_FIELDS] +
                            [(f, np.int64) for f in _STRIDE_FIELDS] +
                            [(f, np.int32) for f in ("num_heads", "group_size", "page_size",
                                                     "causal", "merge_slices")] +
                            [("logits_scale", np.float32)], align=True)
_MLA_PARAM_NAMES = frozenset(MLA_PARAMS_DTYPE.names)


def _check_dims(head_dim_ckv, head_dim_kpe) -> None:
    if (head_dim_ckv, head_dim_kpe) != (CKV_DIM, KPE_DIM):
        raise NotImplementedError(f"MLA supports head_dim_ckv={CKV_DIM} and head_dim_kpe="
                                  f"{KPE_DIM} (DeepSeek-V2/V3); got {head_dim_ckv} and "
                                  f"{head_dim_kpe}")


# ---- the cache -------------------------------------------------------------------------------

class MLAPagedCache(SequencePages):
    """The latent cache of one layer: ``ckv_cache [num_pages, page_size, 512]`` and
    ``kpe_cache [num_pages, page_size, 64]``, with per-sequence page tables.

    Parameters
    ----------
    num_pages, page_size : int
    head_dim_ckv, head_dim_kpe : 512 and 64 (the only supported sizes)
    dtype : float16 or bfloat16 (default)
    ckv_cache, kpe_cache : optional pools to adopt (CuPy, NumPy or DLPack tensors, no copy);
        or ``kv_cache [num_pages, page_size, 576]``, one array whose last axis is
        ``[ckv | kpe]`` (the two pools are then views of it). Otherwise allocated, uninitialised.
    device : "gpu" | "cpu", optional; where to allocate (default: the GPU when there is one)

    The allocator (``add_sequence``, ``grow``, ``free``, ``seq_len``, ``seq_pages``,
    ``page_table``, ``num_free_pages``) is that of :class:`cpattn.PagedKVCache`;
    ``append(seq_ids, ckv_new, kpe_new, append_indptr=None)`` writes new tokens.
    """

    def __init__(self, num_pages: int, page_size: int, head_dim_ckv: int = CKV_DIM,
                 head_dim_kpe: int = KPE_DIM, dtype="bfloat16", *, ckv_cache=None,
                 kpe_cache=None, kv_cache=None, device: str | None = None):
        self.num_pages = positive_int(num_pages, "num_pages")
        self.page_size = positive_int(page_size, "page_size")
        _check_dims(head_dim_ckv, head_dim_kpe)
        self.dtype = _cache_dtype(dtype)
        if self.num_pages > A.INT32_MAX:
            raise ValueError(f"num_pages must be < 2^31 (int32 page ids); got {num_pages}")
        if device not in (None, "gpu", "cpu"):
            raise ValueError(f"device must be 'gpu', 'cpu' or None; got {device!r}")
        if kv_cache is not None:
            if ckv_cache is not None or kpe_cache is not None:
                raise ValueError("give kv_cache, or ckv_cache and kpe_cache, not both")
            kv_cache = A.intake(kv_cache, "kv_cache")
            A.check_shape(kv_cache, "kv_cache", (self.num_pages, self.page_size, CKV_DIM + KPE_DIM),
                          "[num_pages, page_size, head_dim_ckv + head_dim_kpe]")
            if kv_cache.dtype != self.dtype:
                raise ValueError(f"kv_cache must have dtype {A.dtype_name(self.dtype)} (the "
                                 f"cache's); got {A.dtype_name(kv_cache.dtype)}")
            if not A.is_gpu(kv_cache) and not kv_cache.flags.writeable:
                raise ValueError("kv_cache must be writeable; the cache is written in place")
            ckv_cache, kpe_cache = kv_cache[..., :CKV_DIM], kv_cache[..., CKV_DIM:]
        if (ckv_cache is None) != (kpe_cache is None):
            raise ValueError("give both ckv_cache and kpe_cache, or neither")
        if ckv_cache is None:
            (ckv_cache, kpe_cache), on_gpu = _new_pools(
                device, self.dtype, (self.num_pages, self.page_size, CKV_DIM),
                (self.num_pages, self.page_size, KPE_DIM))
        else:
            pools, on_gpu = _intake_pools({"ckv_cache": ckv_cache, "kpe_cache": kpe_cache},
                                          device)
            ckv_cache, kpe_cache = pools.values()
            check_pools(ckv_cache, kpe_cache, self.dtype, (self.num_pages, self.page_size))
            if not on_gpu and not (ckv_cache.flags.writeable and kpe_cache.flags.writeable):
                raise ValueError("ckv_cache and kpe_cache must be writeable; the cache is "
                                 "written in place")
        self.ckv_cache, self.kpe_cache, self.on_gpu = ckv_cache, kpe_cache, on_gpu
        self._tables = _PageTables(self.num_pages, self.page_size)

    def append(self, seq_ids, ckv_new, kpe_new, append_indptr=None, *, stream=None) -> None:
        """Append new tokens' ``ckv_new [total_new, 512]`` and ``kpe_new [total_new, 64]`` to
        distinct sequences: grow each (all or nothing), then write. ``append_indptr [batch + 1]``
        gives the new tokens per sequence (default: one each)."""
        arrs, _ = A.intake_all({"ckv_cache": self.ckv_cache, "ckv_new": ckv_new,
                                "kpe_new": kpe_new})
        ckv_new, kpe_new = arrs["ckv_new"], arrs["kpe_new"]
        total = None
        for name, new, dim in (("ckv_new", ckv_new, CKV_DIM), ("kpe_new", kpe_new, KPE_DIM)):
            A.check_shape(new, name, (total, dim), f"[total_new, {dim}]")
            total = new.shape[0]
            if new.dtype != self.dtype:
                raise ValueError(f"{name} must have the cache's dtype {A.dtype_name(self.dtype)}"
                                 f"; got {A.dtype_name(new.dtype)}")
            A.check_last_dim_contiguous(new, name)
            if A.is_gpu(new):
                A.check_vector_aligned(new, name)
        # One "kv head": the append kernel copies a ckv row and a kpe row per token.
        self._grow_and_write(seq_ids, "ckv_new", total, append_indptr, lambda page, slot: _write(
            self.ckv_cache[:, :, None], self.kpe_cache[:, :, None], ckv_new[:, None],
            kpe_new[:, None], page, slot, "NHD", stream))

    def __repr__(self) -> str:
        return (f"MLAPagedCache(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"dtype={A.dtype_name(self.dtype)}, device={'gpu' if self.on_gpu else 'cpu'!r}, "
                f"sequences={len(self)}, free_pages={self.num_free_pages})")


def check_pools(ckv_cache, kpe_cache, dtype, pages_shape=None) -> None:
    """ckv ``[num_pages, page_size, 512]`` and kpe ``[num_pages, page_size, 64]`` of ``dtype``,
    contiguous in the last axis and 16-byte aligned (on the GPU)."""
    for name, pool, dim in (("ckv_cache", ckv_cache, CKV_DIM), ("kpe_cache", kpe_cache, KPE_DIM)):
        expected = (pages_shape or ckv_cache.shape[:2]) + (dim,)
        A.check_shape(pool, name, tuple(expected), f"[num_pages, page_size, {dim}]")
        if pool.dtype != dtype:
            raise ValueError(f"{name} must have dtype {A.dtype_name(dtype)}; got "
                             f"{A.dtype_name(pool.dtype)}")
        A.check_last_dim_contiguous(pool, name)
        if A.is_gpu(pool):
            A.check_vector_aligned(pool, name)


# ---- the wrapper -----------------------------------------------------------------------------

def fused_merge(cfg, merge_indptr: np.ndarray, ctas: int, num_sms: int):
    """How a split plan's states are merged: ``"last chunk"`` (the CTA that finishes a query
    tile's last chunk merges its rows: at most ``_tiles.MLA_FUSED_MOST_CHUNKS`` chunks a tile,
    one CTA reads them all), ``"slices"`` (more chunks, and the plan's ``ctas`` CTAs all resident
    at once: every chunk merges a slice of its tile, in a cooperative launch), or None
    (merge_state's launch). The in-kernel merges are the mma.sync tiles'.

    >>> fused_merge(_tiles.MLA_TILES[0], np.array([0, 2, 4, 6]), 3, 132)
    'last chunk'
    >>> fused_merge(_tiles.MLA_TILES[0], np.array([0, 3, 4]), 4, 132)
    'slices'
    >>> fused_merge(_tiles.MLA_TILES[0], np.array([0, 3, 4]), 4, 2) is None
    True
    >>> fused_merge(_tiles.MLA_SM90, np.array([0, 2, 4, 6]), 3, 132) is None
    True
    """
    if not isinstance(cfg, _tiles.MLATileConfig):
        return None
    if planner.most_states(merge_indptr) <= _tiles.MLA_FUSED_MOST_CHUNKS:
        return "last chunk"
    return "slices" if ctas <= num_sms * cfg.ctas else None


def choose_tiles(num_heads: int, max_qo_len: int, hopper: bool = False):
    """(tiles, heads per CTA): 16 rows when a request's (query, head) rows fit in them, else
    32; a CTA holds all heads of its queries or a block of them. With ``hopper`` (the sm_90a
    path, ``_core.hopper_path()``), more than 16 rows take the 64-row wgmma tiles (measured on
    an H200 at 32 heads, B64 L4096: 2319 GB/s against 1838 for the 32-row mma.sync tiles; at 16
    rows the two are even and the mma.sync tiles win on a single long request)."""
    small, large = _tiles.MLA_TILES
    if num_heads * max(max_qo_len, 1) <= small.rows:
        return small, num_heads
    wide = _tiles.MLA_SM90
    if hopper:
        if num_heads <= wide.rows:
            return wide, num_heads
        if num_heads % wide.rows == 0:
            return wide, wide.rows
    if num_heads <= large.rows:
        return large, num_heads
    for cfg in (large, small):
        if num_heads % cfg.rows == 0:
            return cfg, cfg.rows
    most = wide.rows if hopper else large.rows
    raise NotImplementedError(f"num_heads={num_heads}: MLA supports up to {most} heads on this "
                              f"GPU, or a multiple of {small.rows}")


def many_ctas(cfg, group: int, num_heads: int, qo_lens: np.ndarray, num_sms: int):
    """``_tiles.MLA_MANY`` in place of the 16-row tiles when a plan has two CTAs for every SM
    without splitting any key range (query tiles x head blocks = ``n >= 2 x num_sms``) and its
    waves of CTAs take less time that way: a pair of MLA_MANY CTAs sharing an SM takes
    ``_tiles.MLA_MANY_PAIR_TIME`` times as long as one 16-row CTA alone, so MLA_MANY is taken
    when ``ceil(n / (2 S)) * MLA_MANY_PAIR_TIME < ceil(n / S)`` (S SMs). A short last wave is
    what loses: 300 CTAs on 132 SMs run in 3 waves of 16-row CTAs, or 2 of pairs (3.68).

    >>> small = _tiles.MLA_TILES[0]
    >>> many_ctas(small, 16, 16, np.ones(264, np.int64), 132) is _tiles.MLA_MANY
    True
    >>> many_ctas(small, 16, 16, np.ones(263, np.int64), 132) is small
    True
    >>> many_ctas(small, 16, 16, np.ones(300, np.int64), 132) is small
    True
    """
    if cfg is not _tiles.MLA_TILES[0]:
        return cfg
    ctas = int(np.sum(-(-qo_lens // (cfg.rows // group)))) * (num_heads // group)
    pairs = _tiles.MLA_MANY.ctas * num_sms
    if ctas < pairs:
        return cfg
    waves, pair_waves = -(-ctas // num_sms), -(-ctas // pairs)
    return _tiles.MLA_MANY if pair_waves * _tiles.MLA_MANY_PAIR_TIME < waves else cfg


class BatchMLA:
    """Batch MLA over a paged latent cache: plan once per step, run every layer.

    ``plan(qo_indptr, kv_indptr, kv_indices, kv_lens, num_heads, head_dim_ckv, head_dim_kpe,
    page_size, *, causal=False, sm_scale, dtype="bfloat16", stream=None)`` takes host int32
    arrays: ``qo_indptr [batch + 1]`` (query rows of each request), ``kv_indptr [batch + 1]``
    (pages), ``kv_indices [kv_indptr[-1]]`` and ``kv_lens [batch]`` (tokens; bounds are
    token-granular, so partly filled last pages are fine). ``sm_scale`` is required.

    ``run(q_nope, q_pe, ckv_cache, kpe_cache=None, *, return_lse=False, out=None, stream=None)``
    takes ``q_nope [total_q, num_heads, 512]``, ``q_pe [total_q, num_heads, 64]`` and the pools
    (or an :class:`MLAPagedCache` as ``ckv_cache``); returns out ``[total_q, num_heads, 512]``
    (and lse ``[total_q, num_heads]``, natural log).

    ``use_cuda_graph=True`` with ``max_batch_size``, ``max_num_pages`` (entries of
    kv_indices), ``max_total_q`` (default ``max_batch_size``) and optionally ``max_items``: fixed
    buffers and grid, always the split path, outputs owned by the wrapper (as ``BatchDecode``).
    """

    def __init__(self, *, use_cuda_graph=False, max_batch_size=None, max_num_pages=None,
                 max_total_q=None, max_items=0):
        self._limits = None
        capacities = None
        if use_cuda_graph:
            _core.require_graph_limits(max_batch_size=max_batch_size,
                                       max_num_pages=max_num_pages)
            if max_total_q is not None:
                planner.positive_int(max_total_q, "max_total_q")
            max_items = planner.positive_int(max_items, "max_items", 0)  # 0: the default
            total_q = max_total_q or max_batch_size
            items = max_items or max(2 * _core.num_sms(), total_q)
            self._limits = dict(batch=max_batch_size, pages=max_num_pages, total_q=total_q,
                                items=items)
            capacities = dict(num_items=1, qo_indptr=max_batch_size + 1,
                              kv_indptr=max_batch_size + 1, kv_indices=max_num_pages,
                              kv_lens=max_batch_size, merge_indptr=total_q + 1,
                              **{n: items for n in ("item_request", "item_q_start",
                                                    "item_kv_start", "item_kv_end", "item_state",
                                                    "item_state_stride")})
        self._buffer = _core.PlanBuffer(capacities)
        self._plan = None
        self._fixed = None     # graph mode: (tiles, group, heads, dtype, causal, scale, page_size)
        self._split = _core.SplitMerge("BatchMLA", fixed=use_cuda_graph)
        self._outputs = None   # graph mode: (out, lse) of max_total_q rows
        self._pool_pages = None  # graph mode: pages of the pools the first run saw
        self._maps_kept = _tma.MapsCache()  # Hopper: tensor maps of the pools seen

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_lens, num_heads, head_dim_ckv,
             head_dim_kpe, page_size, *, causal=False, sm_scale, dtype="bfloat16", stream=None):
        self._plan = None  # a plan that fails leaves no stale plan behind
        _check_dims(head_dim_ckv, head_dim_kpe)
        num_heads = positive_int(num_heads, "num_heads")
        page_size = positive_int(page_size, "page_size")
        _core.check_bool(causal, "causal")
        if sm_scale is not None:
            _core.check_number(sm_scale, "sm_scale")
        if kv_lens is None:
            raise ValueError("kv_lens is required: the token count of each request, int32 [batch]")
        if sm_scale is None or not (math.isfinite(sm_scale) and sm_scale > 0):
            raise ValueError(f"sm_scale must be a finite number > 0 (MLA has no default; "
                             f"DeepSeek-V3 uses 1/sqrt(128 + 64)); got {sm_scale}")
        dtype = attention_dtype(dtype)
        qo_indptr = _host_indptr(qo_indptr, "qo_indptr")
        kv_indptr = planner.host_index(kv_indptr, "kv_indptr")
        kv_indices = planner.host_index(kv_indices, "kv_indices")
        kv_lens = planner.check_page_table(kv_indptr, kv_indices, A.INT32_MAX, page_size,
                                           kv_lens=kv_lens)
        if len(qo_indptr) != len(kv_indptr):
            raise ValueError(f"qo_indptr must have batch + 1 = {len(kv_indptr)} entries like "
                             f"kv_indptr; got {len(qo_indptr)}")
        qo_lens = np.diff(qo_indptr)
        batch, total_q = len(kv_lens), int(qo_indptr[-1])
        cfg, group = choose_tiles(num_heads, int(qo_lens.max(initial=0)), _core.hopper_path())
        limits = self._limits
        if limits is not None:  # checked before the first plan fixes anything
            _core.check_graph_fits("BatchMLA", batch, total_q, len(kv_indices), limits["batch"],
                                   limits["total_q"], limits["pages"])
            _core.check_graph_pages(self._pool_pages, kv_indices)
            cfg, group = self._graph_tiles(cfg, group, num_heads, dtype, causal, sm_scale,
                                           page_size)
        else:  # graph mode keeps the tiles of its first plan
            cfg = many_ctas(cfg, group, num_heads, qo_lens, _core.num_sms())
        head_blocks = num_heads // group
        per_item = cfg.rows // group
        work = planner.partition_tiles(qo_lens, kv_lens, per_item, causal, head_blocks,
                                       num_sms=_core.num_sms(), ctas_per_sm=cfg.ctas, tile=cfg.tile,
                                       max_items=limits["items"] if limits else None)
        split = work.split or limits is not None
        merge_indptr = work.merge_indptr
        if limits is not None:
            merge_indptr = np.pad(merge_indptr, (0, limits["total_q"] - total_q), mode="edge")
        arrays = dict(num_items=np.array([work.num_items], np.int32), item_request=work.request,
                      item_q_start=work.q_start, item_kv_start=work.kv_start,
                      item_kv_end=work.kv_end, item_state=work.state,
                      item_state_stride=work.state_stride, qo_indptr=qo_indptr,
                      kv_indptr=kv_indptr, kv_indices=kv_indices, kv_lens=kv_lens,
                      merge_indptr=merge_indptr)
        kernel = _core.load_kernel(cfg.op, cfg.targs(_kernels.CTYPES[A.dtype_name(dtype)]),
                                   cfg.smem_bytes(), f"MLA with {cfg.rows}-row tiles",
                                   getattr(cfg, "launch_registers", None))
        pointers = self._buffer.upload(arrays, stream)
        params = np.zeros((), MLA_PARAMS_DTYPE)
        for name, ptr in pointers.items():
            if name in _MLA_PARAM_NAMES:
                params[name] = ptr
        params["num_heads"], params["group_size"] = num_heads, group
        params["page_size"], params["causal"] = page_size, int(bool(causal))
        params["logits_scale"] = sm_scale * _core.LOG2E
        grid = limits["items"] if limits else work.num_items
        merge = None
        ctas = grid * head_blocks
        fused = (fused_merge(cfg, merge_indptr, ctas, _core.num_sms())
                 if split and limits is None else None)
        if split:
            states = limits["items"] * per_item if limits else work.num_states
            partial_o, partial_lse = self._split.partials(states, num_heads, CKV_DIM, stream)
            params["partial_o"], params["partial_lse"] = partial_o.data.ptr, partial_lse.data.ptr
        if fused:
            slices = fused == "slices"  # two counters a query tile: arrived, merged
            counters = self._split.counters((1 + slices) * total_q * head_blocks, stream)
            params["merge_counters"], params["merge_slices"] = counters.data.ptr, slices
        elif split:
            rows = limits["total_q"] if limits else total_q
            merge = self._split.merge(pointers["merge_indptr"], rows, dtype,
                                      None if limits else merge_indptr)
        # One grid dimension, item-major: the kernel takes (item, head block) from blockIdx.x.
        # The Hopper kernel also takes tensor maps of the pools (encoded at run()).
        maps = np.zeros((), _tma.KV_MAPS_DTYPE) if cfg is _tiles.MLA_SM90 else None
        launch = _core.DirectLaunch(kernel, (ctas,), (cfg.threads,), cfg.smem_bytes(),
                                    [params] if maps is None else [params, maps],
                                    cooperative=fused == "slices")
        self._plan = dict(launch=launch, params=launch.args[0], heads=num_heads, dtype=dtype,
                          total_q=total_q, page_size=page_size, split=split, merge=merge,
                          fused=fused,
                          max_page=int(kv_indices.max(initial=-1)), checked=None,
                          maps=None if maps is None else launch.args[1], maps_of=None,
                          tile=cfg.tile)

    def _graph_tiles(self, cfg, group, num_heads, dtype, causal, sm_scale, page_size):
        """Graph mode: the first plan fixes the tiles and launch arguments; later plans keep
        them (16-row tiles hold fewer queries per item but serve any query length)."""
        if self._fixed is None:
            if self._outputs is None:  # allocated here, never inside a capture
                import cupy
                rows = self._limits["total_q"]
                self._outputs = (cupy.empty((rows, num_heads, CKV_DIM), dtype),
                                 cupy.empty((rows, num_heads), np.float32))
            self._fixed = (cfg, group, num_heads, dtype, bool(causal), float(sm_scale), page_size)
            return cfg, group
        if self._fixed[2:] != (num_heads, dtype, bool(causal), float(sm_scale), page_size):
            raise ValueError("a CUDA-graph BatchMLA keeps the num_heads, dtype, causal, sm_scale "
                             "and page_size of its first plan; make a new BatchMLA")
        return self._fixed[:2]

    @property
    def fixed_outputs(self):
        """CUDA-graph mode: the (out ``[max_total_q, H, 512]``, lse ``[max_total_q, H]``)
        buffers every captured run writes; None outside graph mode or before the first plan."""
        return self._outputs if self._limits is not None else None

    def run(self, q_nope, q_pe, ckv_cache, kpe_cache=None, *, return_lse=False, out=None,
            stream=None):
        plan = self._plan
        if plan is None:
            raise RuntimeError("run() before plan(): plan the batch first")
        if isinstance(ckv_cache, MLAPagedCache):
            if kpe_cache is not None:
                raise ValueError("kpe_cache is part of the MLAPagedCache given as ckv_cache")
            ckv_cache, kpe_cache = ckv_cache.ckv_cache, ckv_cache.kpe_cache
        elif kpe_cache is None:
            raise ValueError("kpe_cache is required (or pass an MLAPagedCache as ckv_cache)")
        arrs, on_gpu = A.intake_all({"q_nope": q_nope, "q_pe": q_pe, "ckv_cache": ckv_cache,
                                     "kpe_cache": kpe_cache, "out": out})
        if not on_gpu:
            raise TypeError("BatchMLA runs CuPy (GPU) arrays; cpattn.reference.mla is the NumPy "
                            "path")
        q_nope, q_pe, ckv_cache, kpe_cache, out = arrs.values()
        self._check_run(q_nope, q_pe, ckv_cache, kpe_cache)
        if self._limits is not None:
            out, lse = _core.fixed_outputs(self._outputs, out, "BatchMLA")
        else:
            out, lse = _core.run_outputs(q_nope, "q_nope", (plan["total_q"], plan["heads"], CKV_DIM),
                                         "[qo_indptr[-1], num_heads, 512]", out, return_lse,
                                         plan["merge"] is not None, self._split.lse_scratch)
        if plan["maps"] is not None:
            self._encode_maps(ckv_cache, kpe_cache)
        params = plan["params"]
        params["q_nope"], params["q_pe"] = q_nope.data.ptr, q_pe.data.ptr
        params["ckv"], params["kpe"] = ckv_cache.data.ptr, kpe_cache.data.ptr
        params["o"] = out.data.ptr
        # The kernel writes lse unless merge_state merges its partial states.
        params["lse"] = 0 if lse is None or plan["merge"] is not None else lse.data.ptr
        try:
            plan["launch"](stream)
        except _core.CooperativeLaunchTooLarge:  # only a "slices" plan launches cooperatively
            self._merge_by_last_chunk(plan)
            plan["launch"](stream)
        if plan["merge"] is not None:
            plan["merge"](out, lse, stream)
        if self._limits is not None:
            out, lse = out[:plan["total_q"]], lse[:plan["total_q"]]
        return (out, lse) if return_lse else out

    @staticmethod
    def _merge_by_last_chunk(plan) -> None:
        """A plan whose chunks merge slices in a cooperative launch, on a GPU that cannot hold
        all its CTAs at once (shared with other processes): from now on the last chunk of each
        query tile merges it, in a plain launch (one counter a tile: the first half of the
        buffer, all 0). One CTA then reads all of a tile's states: slower than the slices, but
        it needs no other launch."""
        plan["params"]["merge_slices"] = 0
        plan["launch"].drop_cooperative()
        plan["fused"] = "last chunk"

    def _encode_maps(self, ckv_cache, kpe_cache) -> None:
        """Tensor maps of the ckv and kpe pools as rows of page slots (``_tma.mla_row_boxes``),
        re-encoded when a pool changes (kept per pair of pools and tile: ``_tma.MapsCache``);
        disabled (cp.async) when their layout does not suit."""
        plan = self._plan
        seen = (ckv_cache.data.ptr, kpe_cache.data.ptr, ckv_cache.shape, ckv_cache.strides,
                kpe_cache.strides, plan["tile"])
        if seen == plan["maps_of"]:
            return
        self._maps_kept.fill(plan["maps"], seen,
                             lambda maps: self._encode_maps_now(maps, ckv_cache, kpe_cache,
                                                                plan["tile"]))
        plan["maps_of"] = seen

    def _encode_maps_now(self, maps, ckv_cache, kpe_cache, tile: int) -> None:
        strides = [A.element_strides(x) for x in (ckv_cache, kpe_cache)]
        boxes = _tma.mla_row_boxes(ckv_cache.shape, strides, tile)
        enabled = boxes is not None
        if enabled:
            rows, box = boxes
            try:
                for name, x, (_, slot, _) in (("k", ckv_cache, strides[0]),
                                              ("v", kpe_cache, strides[1])):
                    _tma.encode_rows(maps[name], x.data.ptr, rows, 1, x.shape[2], slot, slot, box)
            except RuntimeError:  # a layout the driver's limits reject: copy by cp.async
                enabled = False
        maps["enabled"] = int(enabled)

    def _check_run(self, q_nope, q_pe, ckv_cache, kpe_cache) -> None:
        """Full checks the first time a layout is seen; then only the base alignment."""
        plan = self._plan
        seen = (q_nope.dtype, q_nope.shape, q_nope.strides, q_pe.dtype, q_pe.shape, q_pe.strides,
                ckv_cache.dtype, ckv_cache.shape, ckv_cache.strides, kpe_cache.dtype,
                kpe_cache.shape, kpe_cache.strides)
        if seen != plan["checked"]:
            heads, dtype = plan["heads"], plan["dtype"]
            for name, q, dim in (("q_nope", q_nope, CKV_DIM), ("q_pe", q_pe, KPE_DIM)):
                if q.dtype != dtype:
                    raise ValueError(f"{name} must have the planned dtype {A.dtype_name(dtype)}"
                                     f"; got {A.dtype_name(q.dtype)}")
                A.check_shape(q, name, (plan["total_q"], heads, dim),
                              f"[qo_indptr[-1], num_heads, {dim}]")
                A.check_last_dim_contiguous(q, name)
                A.check_vector_aligned(q, name)
            if ckv_cache.ndim == 3 and ckv_cache.shape[1] != plan["page_size"]:
                raise ValueError(f"ckv_cache must have page_size {plan['page_size']} (planned) "
                                 f"in axis 1; got shape {tuple(ckv_cache.shape)}")
            check_pools(ckv_cache, kpe_cache, dtype)
            if plan["max_page"] >= ckv_cache.shape[0]:
                raise ValueError(f"kv_indices refers to page {plan['max_page']} but ckv_cache "
                                 f"has {ckv_cache.shape[0]} pages")
            params = plan["params"]
            for prefix, x in (("q_nope", q_nope), ("q_pe", q_pe)):
                s = A.element_strides(x)
                params[prefix + "_stride_token"], params[prefix + "_stride_head"] = s[0], s[1]
            for prefix, x in (("ckv", ckv_cache), ("kpe", kpe_cache)):
                s = A.element_strides(x)
                params[prefix + "_stride_page"], params[prefix + "_stride_slot"] = s[0], s[1]
            plan["checked"] = seen
        else:
            for name, x in (("q_nope", q_nope), ("q_pe", q_pe), ("ckv_cache", ckv_cache),
                            ("kpe_cache", kpe_cache)):
                if x.data.ptr & 15:
                    raise ValueError(f"{name} must be 16-byte aligned; got address %16 = "
                                     f"{x.data.ptr & 15}")
        if self._limits is not None and self._pool_pages is None:
            self._pool_pages = ckv_cache.shape[0]
