"""Cascade attention: keys organised in levels, each level's attention run on its own, the levels'
states merged with ``merge_state``.

The case it serves: many requests share a prefix (a system prompt, the prompt of parallel
samples). Level 0 holds the prefix once; all queries of the requests that share it form one
level-0 "request" over its pages, so the prefix is read once instead of once per request. The
last level holds each request's own tokens. Levels in between (a prefix shared by a subgroup)
work the same way.

Level ``l`` has its own ``qo_indptr``, which groups the query rows (the same rows at every level)
into that level's requests, and its own page table. Row i attends, at each level, the keys of
the level request that contains it; the result equals attention over the concatenation of those
keys in level order. Levels before the last are not causal (their keys all come before the
row's own tokens); the last level is causal when ``causal=True`` (bottom-right, over the
request's own tokens, which must then hold at least its queries).
"""
from __future__ import annotations

import numpy as np

from . import _arrays as A
from . import _core, planner
from .attention import _host_indptr
from .merge import merge_state
from .paged_prefill import BatchPrefillPaged
from .planner import host_index, positive_int

__all__ = ["CascadeAttention"]


class CascadeAttention:
    """Multi-level cascade over one paged KV cache.

    ``CascadeAttention(num_levels=2)``, then ``plan(qo_indptr_arr, kv_indptr_arr,
    kv_indices_arr, kv_lens_arr, num_qo_heads, num_kv_heads, head_dim, page_size, *,
    causal=False, sm_scale=None, logits_soft_cap=0.0, dtype="float16", kv_layout="NHD",
    stream=None)`` with one host int32 array per level in each ``*_arr`` list (``qo_indptr``
    [requests_l + 1], all ending at total_q; ``kv_indptr`` [requests_l + 1] in pages,
    ``kv_indices``, ``kv_lens`` [requests_l] in tokens), and ``run(q, kv, *, return_lse=False,
    stream=None)`` with q ``[total_q, num_qo_heads, head_dim]`` and ``kv`` a ``PagedKVCache`` or
    ``(k_pages, v_pages)``. Level 0 of a shared prefix is one request of all queries:
    ``qo_indptr = [0, total_q]``, the prefix's pages, ``kv_lens = [prefix_len]``.
    """

    def __init__(self, num_levels: int = 2):
        self.num_levels = positive_int(num_levels, "num_levels")
        self._levels = [BatchPrefillPaged() for _ in range(self.num_levels)]
        self._planned = False

    def plan(self, qo_indptr_arr, kv_indptr_arr, kv_indices_arr, kv_lens_arr, num_qo_heads,
             num_kv_heads, head_dim, page_size, *, causal=False, sm_scale=None,
             logits_soft_cap=0.0, dtype="float16", kv_layout="NHD", stream=None):
        self._planned = False
        lists = dict(qo_indptr_arr=qo_indptr_arr, kv_indptr_arr=kv_indptr_arr,
                     kv_indices_arr=kv_indices_arr, kv_lens_arr=kv_lens_arr)
        for name, value in lists.items():
            if not isinstance(value, (list, tuple)) or len(value) != self.num_levels:
                got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
                raise ValueError(f"{name} must be a list of {self.num_levels} arrays (one per "
                                 f"level); got {got}")
        _core.Options(causal, sm_scale, -1, logits_soft_cap).check(False)
        page_size = planner.positive_int(page_size, "page_size")
        for level in range(self.num_levels):  # every level's page table before any level plans
            try:
                planner.check_page_table(kv_indptr_arr[level], kv_indices_arr[level], A.INT32_MAX,
                                         page_size, kv_lens=kv_lens_arr[level])
            except (TypeError, ValueError) as err:
                raise type(err)(f"level {level}: {err}") from None
        total_q = None
        for level, qo_indptr in enumerate(qo_indptr_arr):
            end = int(_host_indptr(qo_indptr, f"qo_indptr_arr[{level}]")[-1])
            if total_q is not None and end != total_q:
                raise ValueError(f"every level covers the same query rows: qo_indptr_arr[{level}]"
                                 f"[-1] must be {total_q} like qo_indptr_arr[0]; got {end}")
            total_q = end
        if causal:  # the last level's requests must hold their own queries
            qo_lens = np.diff(_host_indptr(qo_indptr_arr[-1], "qo_indptr_arr[-1]"))
            kv_lens = host_index(kv_lens_arr[-1], "kv_lens_arr[-1]")
            short = np.flatnonzero(kv_lens < qo_lens) if kv_lens.shape == qo_lens.shape else []
            if len(short):
                b = int(short[0])
                raise ValueError(f"causal cascade: request {b} of the last level has "
                                 f"{qo_lens[b]} queries but only {kv_lens[b]} keys of its own; "
                                 "its queries must be among its own (last-level) tokens")
        last = self.num_levels - 1
        for level, wrapper in enumerate(self._levels):
            try:
                wrapper.plan(qo_indptr_arr[level], kv_indptr_arr[level], kv_indices_arr[level],
                             None, num_qo_heads, num_kv_heads, head_dim, page_size,
                             kv_lens=kv_lens_arr[level], causal=bool(causal) and level == last,
                             sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, dtype=dtype,
                             kv_layout=kv_layout, stream=stream)
            except (ValueError, TypeError, NotImplementedError) as error:
                raise type(error)(f"level {level}: {error}") from error
        self._planned = True

    def run(self, q, kv, *, return_lse=False, stream=None):
        if not self._planned:
            raise RuntimeError("run() before plan(): plan the levels first")
        out, lse = self._levels[0].run(q, kv, return_lse=True, stream=stream)
        for wrapper in self._levels[1:]:
            level_out, level_lse = wrapper.run(q, kv, return_lse=True, stream=stream)
            out, lse = merge_state(out, lse, level_out, level_lse, stream=stream)
        return (out, lse) if return_lse else out
