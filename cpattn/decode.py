"""BatchDecode: one new query per request against its paged KV cache, plan once, run every layer.

The plan cuts long requests into key chunks when the batch alone would not fill the GPU
(split-KV); each chunk's partial state goes to an fp32 buffer and a merge kernel combines them.
With ``use_cuda_graph=True`` every device buffer has a fixed size and address, the launch grid is
fixed and the split path is always taken, so a ``run()`` captured in a ``cupy.cuda.Graph`` can be
replayed after any later ``plan()`` within the maxima given at construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _arrays as A
from . import _core, _tiles, planner
from ._core import Options
from .attention import _check_layout, attention_dtype


def fuses_merge(cfg, head_dim: int, merge_indptr: np.ndarray) -> bool:
    """Whether a split plan's kernel merges its requests' states itself: Hopper decode tiles
    (``HopperDecodeTileConfig.fused_merge``) and at most ``FUSED_MERGE_MOST_CHUNKS`` chunks a
    request (one warp merges a row's states in sequence; beyond, merge_state's CTAs are faster).

    >>> from cpattn import _tiles
    >>> fuses_merge(_tiles.DECODE_SM90[128], 128, np.array([0, 3, 40]))
    False
    >>> fuses_merge(_tiles.DECODE_SM90[128], 128, np.array([0, 3, 35]))
    True
    >>> fuses_merge(_tiles.DECODE[128], 128, np.array([0, 3, 35]))
    False
    """
    fused = getattr(cfg, "fused_merge", None)
    return (fused is not None and fused(head_dim)
            and planner.most_states(merge_indptr) <= _tiles.FUSED_MERGE_MOST_CHUNKS)


@dataclass(frozen=True)
class GraphLimits:
    """Maxima of a CUDA-graph BatchDecode: its buffers are sized for them once."""
    max_batch_size: int
    max_num_pages: int  # entries of kv_indices
    max_items: int = 0  # work items (0: 2 * num_SMs, at least max_batch_size)


class BatchDecode:
    """Batch decode over a paged KV cache.

    ``plan(kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
    page_size, *, kv_lens=None, window_left=-1, logits_soft_cap=0.0, sm_scale=None,
    dtype="float16", kv_layout="NHD", stream=None)`` takes the page table on the host (int32:
    ``kv_indptr [batch + 1]``, ``kv_indices [kv_indptr[-1]]``, and ``kv_last_page_len [batch]``
    or ``kv_lens [batch]``, with None for ``kv_last_page_len``); its upload is ordered on
    ``stream``. ``run(q, kv, *, return_lse=False, out=None, stream=None)`` takes
    q ``[batch, num_qo_heads, head_dim]`` and ``kv``, a ``PagedKVCache`` or a pair
    ``(k_pages, v_pages)`` of pools ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD) or
    ``[num_pages, num_kv_heads, page_size, head_dim]`` (HND); it returns out
    ``[batch, num_qo_heads, head_dim]`` (and lse ``[batch, num_qo_heads]`` float32).

    A wrapper's runs must be ordered (one stream, or streams ordered by events): split plans
    share its partial-state buffers and, on Hopper, the counters by which the last chunk of a
    request merges it.
    """

    def __init__(self, *, use_cuda_graph=False, max_batch_size=None, max_num_pages=None,
                 max_items=0):
        self._limits = None
        capacities = None
        if use_cuda_graph:
            _core.require_graph_limits(max_batch_size=max_batch_size,
                                       max_num_pages=max_num_pages)
            max_items = planner.positive_int(max_items, "max_items", 0)  # 0: the default
            items = max_items or max(2 * _core.num_sms(), max_batch_size)
            self._limits = GraphLimits(max_batch_size, max_num_pages, items)
            capacities = dict(num_items=1, item_request=items, item_q_start=items,
                              item_kv_start=items, item_kv_end=items, qo_indptr=max_batch_size + 1,
                              kv_indptr=max_batch_size + 1, kv_indices=max_num_pages,
                              kv_lens=max_batch_size, merge_indptr=max_batch_size + 1,
                              item_state=items, item_state_stride=items)
        self._buffer = _core.PlanBuffer(capacities)
        self._plan = None
        self._split = _core.SplitMerge("BatchDecode", fixed=use_cuda_graph)
        self._outputs = None   # graph mode: (out, lse) of max_batch_size rows
        self._launch = self._launch_key = None
        self._graph_key = None  # graph mode: what the first plan fixed
        self._pool_pages = None  # graph mode: pages of the pools the first run saw

    def plan(self, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, *, kv_lens=None, window_left=-1,
             logits_soft_cap=0.0, sm_scale=None, dtype="float16", kv_layout="NHD", stream=None):
        self._plan = None  # a plan that fails leaves no stale plan behind
        _check_layout(kv_layout)
        options = Options(False, sm_scale, window_left, logits_soft_cap)
        options.check(False)
        _core.check_head_dim(head_dim)
        group = _core.check_heads(num_qo_heads, num_kv_heads)
        dtype = attention_dtype(dtype)
        kv_indptr = planner.host_index(kv_indptr, "kv_indptr")
        kv_indices = planner.host_index(kv_indices, "kv_indices")
        kv_lens = planner.check_page_table(kv_indptr, kv_indices, A.INT32_MAX, page_size,
                                           kv_lens=kv_lens, kv_last_page_len=kv_last_page_len)
        batch = len(kv_lens)
        cfg = _core.choose_tiles(head_dim, group, 1)
        limits = self._limits
        work = planner.partition_decode(kv_lens, num_kv_heads, num_sms=_core.num_sms(),
                                        ctas_per_sm=_core.ctas_per_sm(cfg, head_dim),
                                        tile=cfg.tile, max_items=limits.max_items if limits else None,
                                        balance_waves=True)
        split = work.split or limits is not None
        merge_indptr = work.merge_indptr
        fused = split and limits is None and fuses_merge(cfg, head_dim, merge_indptr)
        if limits is not None:
            if batch > limits.max_batch_size:
                raise ValueError(f"batch {batch} is over max_batch_size={limits.max_batch_size}")
            merge_indptr = np.pad(merge_indptr, (0, limits.max_batch_size - batch), mode="edge")
            _core.check_graph_pages(self._pool_pages, kv_indices)
        arrays = dict(num_items=np.array([work.num_items], np.int32), item_request=work.request,
                      item_q_start=np.zeros(work.num_items, np.int32), item_kv_start=work.kv_start,
                      item_kv_end=work.kv_end, qo_indptr=np.arange(batch + 1, dtype=np.int32),
                      kv_indptr=kv_indptr, kv_indices=kv_indices, kv_lens=kv_lens,
                      merge_indptr=merge_indptr,
                      # one query per request: the states of request b are its items, in order
                      item_state=np.arange(work.num_items, dtype=np.int32),
                      item_state_stride=np.ones(work.num_items, np.int32))
        launch = self._launcher(cfg, dtype, head_dim, num_qo_heads, num_kv_heads, kv_layout,
                                options, page_size)  # (graph mode: refuses a changed shape first)
        pointers = self._buffer.upload(arrays, stream)
        grid = limits.max_items if limits else work.num_items
        launch.set_grid(grid)
        params = launch.params
        for name, ptr in pointers.items():
            if name in _core.PARAM_NAMES:
                params[name] = ptr
        params["num_qo_heads"] = num_qo_heads
        params["group_size"] = group
        params["page_size"] = page_size
        options.fill(params, head_dim)
        params["partial_o"] = params["partial_lse"] = params["merge_counters"] = 0
        merge = None
        if fused:
            params["merge_counters"] = self._split.counters(batch * num_kv_heads, stream).data.ptr
        if split:
            partial_o, partial_lse = self._split.partials(grid, num_qo_heads, head_dim, stream)
            params["partial_o"], params["partial_lse"] = partial_o.data.ptr, partial_lse.data.ptr
        if split and not fused:
            rows = limits.max_batch_size if limits else batch
            merge = self._split.merge(pointers["merge_indptr"], rows, dtype,
                                      None if limits else merge_indptr)
        self._plan = dict(launch=launch, heads=(num_qo_heads, num_kv_heads), head_dim=head_dim,
                          dtype=dtype, batch=batch, page_size=page_size, kv_layout=kv_layout,
                          split=split, merge=merge, fused=fused,
                          max_page=int(kv_indices.max(initial=-1)), checked=None)

    @property
    def fixed_outputs(self):
        """CUDA-graph mode: the (out ``[max_batch_size, Hq, D]``, lse ``[max_batch_size, Hq]``)
        buffers every captured run writes (rows past the planned batch hold 0 and -inf); None
        before the first run and outside graph mode."""
        return self._outputs if self._limits is not None else None

    def _launcher(self, cfg, dtype, head_dim, num_qo_heads, num_kv_heads, kv_layout, options,
                  page_size):
        """The attention launch of this shape, kept across plans (plan() rewrites its fields)."""
        key = (cfg, dtype, head_dim, num_qo_heads, num_kv_heads, kv_layout)
        if self._limits is not None:
            # A captured graph holds the launch arguments by value: only the plan's arrays may
            # change between its replays.
            fixed = key + (options, page_size)
            if self._graph_key is not None and fixed != self._graph_key:
                raise ValueError("a CUDA-graph BatchDecode keeps the heads, head_dim, page_size, "
                                 "dtype, layout and options (sm_scale, window_left, "
                                 "logits_soft_cap) of its first plan; make a new BatchDecode")
            self._graph_key = fixed
            if self._outputs is None:  # allocated here, never inside a capture
                import cupy
                rows = self._limits.max_batch_size
                self._outputs = (cupy.empty((rows, num_qo_heads, head_dim), dtype),
                                 cupy.empty((rows, num_qo_heads), np.float32))
        if self._launch_key != key:
            self._launch = _core.Launcher(np.zeros((), _core.PARAMS_DTYPE), cfg, dtype, head_dim,
                                          0, num_kv_heads, kv_layout, paged=True)
            self._launch_key = key
        return self._launch

    def run(self, q, kv, *, return_lse=False, out=None, stream=None):
        plan = self._plan
        if plan is None:
            raise RuntimeError("run() before plan(): plan the batch first")
        q, k_pages, v_pages, out = _core.paged_inputs(q, kv, out, "BatchDecode",
                                                      "paged_decode", plan["kv_layout"])
        _core.check_paged_run(self._plan, q, k_pages, v_pages, plan["batch"],
                              "[batch, num_qo_heads, head_dim]")
        if self._limits is not None and self._pool_pages is None:
            self._pool_pages = k_pages.shape[0]  # later plans check their page ids against it
        if self._limits is not None:
            out, lse = _core.fixed_outputs(self._outputs, out, "BatchDecode")
        else:
            out, lse = _core.run_outputs(q, "q", (plan["batch"],) + tuple(q.shape[1:]),
                                         "[batch, num_qo_heads, head_dim]", out, return_lse,
                                         plan["merge"] is not None, self._split.lse_scratch)
        if plan["merge"] is not None:
            # The kernel writes fp32 partial states (params.partial_o is set); merge them.
            plan["launch"](q, k_pages, v_pages, out, None, stream)
            plan["merge"](out, lse, stream)
        else:  # unsplit, or split with the merge fused into the kernel
            plan["launch"](q, k_pages, v_pages, out, lse, stream)
        if self._limits is not None:
            out, lse = out[:plan["batch"]], lse[:plan["batch"]]
        return (out, lse) if return_lse else out
