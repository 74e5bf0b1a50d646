"""BatchPrefillPaged: many new queries per request against its paged KV cache (chunked prefill).

Each request's new tokens attend to its cached tokens and to themselves, causal bottom-right:
query i of ``qo_len`` sees key j of ``kv_len`` iff ``j <= i + kv_len - qo_len`` (the new tokens'
own K/V are the last ``qo_len`` entries of the cache, appended before the call).
"""
from __future__ import annotations

from . import _arrays as A
from . import _core, planner
from ._core import Options
from .attention import _check_layout, _outputs, attention_dtype, plan_ragged


class BatchPrefillPaged:
    """Prefill (and chunked prefill) over a paged KV cache.

    ``plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads,
    head_dim, page_size, *, kv_lens=None, causal=False, custom_mask=None,
    packed_custom_mask=None, mask_indptr=None, window_left=-1, logits_soft_cap=0.0,
    sm_scale=None, dtype="float16", kv_layout="NHD", stream=None)`` takes host int32 arrays:
    ``qo_indptr [batch + 1]`` (query rows of each request), ``kv_indptr [batch + 1]`` (pages),
    ``kv_indices [kv_indptr[-1]]``, and ``kv_last_page_len [batch]`` or ``kv_lens [batch]``
    (then None for ``kv_last_page_len``).
    Custom masks are per request ``[qo_len, kv_len]`` blocks (flattened bool, or packed bits with
    ``mask_indptr`` in bytes). ``run(q, kv, *, return_lse=False, out=None, stream=None)`` takes
    q ``[qo_indptr[-1], num_qo_heads, head_dim]`` and a ``PagedKVCache`` or ``(k_pages, v_pages)``.

    A batch whose query tiles alone would leave SMs idle (few requests over long keys) has its
    keys split into chunks whose states are merged per query.

    ``use_cuda_graph=True`` with ``max_batch_size``, ``max_num_pages`` (entries of kv_indices)
    and ``max_total_q`` (query rows): the first plan sizes fixed buffers, every plan takes the
    split path on a fixed grid, and run() writes outputs the wrapper owns (``fixed_outputs``;
    out= is not accepted), so a captured run() replays after any later plan that fits. Fixed
    by the first plan: heads, head_dim, page_size, dtype, layout and options; custom masks are
    not taken in this mode.
    """

    def __init__(self, *, use_cuda_graph=False, max_batch_size=None, max_num_pages=None,
                 max_total_q=None, max_items=0):
        self._graph = None
        if use_cuda_graph:
            _core.require_graph_limits(max_batch_size=max_batch_size,
                                       max_num_pages=max_num_pages, max_total_q=max_total_q)
            self._graph = _core.GraphPrefill(max_batch_size, max_num_pages, max_total_q,
                                             max_items)
        self._buffer = _core.PlanBuffer()
        self._split = _core.SplitMerge("BatchPrefillPaged", fixed=False)  # graph: GraphPrefill's
        self._plan = None

    @property
    def fixed_outputs(self):
        """CUDA-graph mode: the (out ``[max_total_q, Hq, D]``, lse ``[max_total_q, Hq]``)
        buffers every captured run writes; None before the first plan and outside graph mode."""
        return self._graph.outputs if self._graph is not None else None

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads,
             head_dim, page_size, *, kv_lens=None, causal=False,
             custom_mask=None, packed_custom_mask=None, mask_indptr=None, window_left=-1,
             logits_soft_cap=0.0, sm_scale=None, dtype="float16", kv_layout="NHD", stream=None):
        self._plan = None  # a plan that fails leaves no stale plan behind
        _check_layout(kv_layout)
        kv_indptr = planner.host_index(kv_indptr, "kv_indptr")
        kv_indices = planner.host_index(kv_indices, "kv_indices")
        kv_lens = planner.check_page_table(kv_indptr, kv_indices, A.INT32_MAX, page_size,
                                           kv_lens=kv_lens, kv_last_page_len=kv_last_page_len)
        options = Options(causal, sm_scale, window_left, logits_soft_cap)
        plan = plan_ragged(self._buffer, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads,
                           head_dim, options, (custom_mask, packed_custom_mask, mask_indptr),
                           attention_dtype(dtype), kv_layout,
                           pages=(kv_indices, kv_lens, page_size), stream=stream,
                           graph=self._graph, split_merge=self._split)
        plan.update(page_size=page_size, kv_layout=kv_layout,
                    max_page=int(kv_indices.max(initial=-1)), checked=None)
        self._plan = plan

    def run(self, q, kv, *, return_lse=False, out=None, stream=None):
        plan = self._plan
        if plan is None:
            raise RuntimeError("run() before plan(): plan the batch first")
        q, k_pages, v_pages, out = _core.paged_inputs(q, kv, out, "BatchPrefillPaged",
                                                      "paged_prefill", plan["kv_layout"])
        _core.check_paged_run(plan, q, k_pages, v_pages, plan["total_q"],
                              "[qo_indptr[-1], num_qo_heads, head_dim]")
        if self._graph is not None:
            if self._graph.pool_pages is None:  # later plans check their page ids against it
                self._graph.pool_pages = k_pages.shape[0]
            out, lse = _core.fixed_outputs(self._graph.outputs, out, "BatchPrefillPaged")
            plan["launch"](q, k_pages, v_pages, out, lse, stream)
            out, lse = out[:plan["total_q"]], lse[:plan["total_q"]]
        else:
            out, lse = _outputs(q, out, return_lse)
            plan["launch"](q, k_pages, v_pages, out, lse, stream)
        return (out, lse) if return_lse else out
