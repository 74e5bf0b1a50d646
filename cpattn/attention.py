"""Dense and ragged attention: single_prefill, single_decode, varlen_attention, BatchPrefillRagged.

All of them run ``batch_attention`` on CuPy inputs and ``cpattn.reference`` on NumPy inputs.
Shapes (NHD): q ``[total_q, num_qo_heads, head_dim]``, k / v ``[total_kv, num_kv_heads, head_dim]``;
``kv_layout="HND"`` (single request only) takes k / v as ``[num_kv_heads, kv_len, head_dim]``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import _arrays as A
from . import _core, mask as mask_mod, planner, reference
from ._core import Options


def attention_dtype(dtype) -> np.dtype:
    """float16 / bfloat16 from a NumPy dtype or its name."""
    try:
        if dtype is None:
            raise TypeError
        dtype = A.BFLOAT16 if str(dtype) == "bfloat16" else np.dtype(dtype)
    except TypeError:
        raise TypeError(f'dtype must be "float16" or "bfloat16" (or their NumPy dtypes); got '
                        f"{dtype!r}") from None
    if dtype not in A.ATTENTION_DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16; got {A.dtype_name(dtype)}")
    return dtype


def _check_layout(kv_layout: str) -> None:
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f'kv_layout must be "NHD" or "HND"; got {kv_layout!r}')


def _check_qkv(q, k, v, kv_layout: str):
    """Shapes, dtypes and strides of q [n, Hq, D] and k / v; returns (Hq, Hkv, D)."""
    A.check_dtype(q, "q", A.ATTENTION_DTYPES)
    for name, x in (("k", k), ("v", v)):
        A.check_same_dtype(x, name, q, "q")
    if q.ndim != 3:
        raise ValueError(f"q must have shape [total_q, num_qo_heads, head_dim]; got {tuple(q.shape)}")
    if k.ndim != 3:
        raise ValueError(f"k must have 3 dimensions ({kv_layout}); got {tuple(k.shape)}")
    A.check_shape(v, "v", tuple(k.shape), "(that of k)")
    num_kv_heads = k.shape[1] if kv_layout == "NHD" else k.shape[0]
    head_dim = q.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(f"k must have head_dim {head_dim} (that of q); got {k.shape[2]}")
    _core.check_heads(q.shape[1], num_kv_heads)
    return q.shape[1], num_kv_heads, head_dim


def _check_strides(**arrays) -> None:
    for name, x in arrays.items():
        A.check_last_dim_contiguous(x, name)
        A.check_vector_aligned(x, name)


class BatchPrefillRagged:
    """Attention of a batch of requests over ragged (packed) keys: plan once, run every layer.

    ``plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, *, causal=False,
    custom_mask=None, packed_custom_mask=None, mask_indptr=None, window_left=-1,
    logits_soft_cap=0.0, sm_scale=None, dtype="float16")`` takes host int32 indptr arrays
    ``[batch + 1]`` and the dtype of q / k / v (float16 or bfloat16);
    ``run(q, k, v, *, return_lse=False, out=None)`` takes q ``[qo_indptr[-1], Hq, D]`` and k / v
    ``[kv_indptr[-1], Hkv, D]``. Request b's queries are rows ``qo_indptr[b]:qo_indptr[b+1]`` and
    its keys rows ``kv_indptr[b]:kv_indptr[b+1]``.
    """

    def __init__(self):
        self._plan = None
        self._buffer = _core.PlanBuffer()
        self._split = _core.SplitMerge("BatchPrefillRagged", fixed=False)

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim, *, causal=False,
             custom_mask=None, packed_custom_mask=None, mask_indptr=None, window_left=-1,
             logits_soft_cap=0.0, sm_scale=None, dtype="float16", stream=None):
        options = Options(causal, sm_scale, window_left, logits_soft_cap)
        mask = (custom_mask, packed_custom_mask, mask_indptr)
        self._plan = None  # a plan that fails leaves no stale plan behind
        self._plan = plan_ragged(self._buffer, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads,
                                 head_dim, options, mask, attention_dtype(dtype), stream=stream,
                                 split_merge=self._split)

    def run(self, q, k, v, *, return_lse=False, out=None, stream=None):
        if self._plan is None:
            raise RuntimeError("run() before plan(): plan the batch first")
        plan = self._plan
        arrs, on_gpu = A.intake_all({"q": q, "k": k, "v": v, "out": out})
        q, k, v, out = arrs.values()
        if not on_gpu:
            raise TypeError("BatchPrefillRagged runs CuPy (GPU) arrays; for NumPy arrays use "
                            "varlen_attention, which runs the reference")
        # Full checks the first time a layout is seen; then only the base addresses' alignment
        # (the layers of a model share shapes and strides, not addresses).
        seen = (q.dtype, q.shape, q.strides, k.dtype, k.shape, k.strides, v.dtype, v.shape,
                v.strides)
        if seen != plan.get("checked"):
            hq, hkv = plan["heads"]
            d = plan["head_dim"]
            A.check_dtype(q, "q", A.ATTENTION_DTYPES)
            A.check_shape(q, "q", (plan["total_q"], hq, d),
                          "[qo_indptr[-1], num_qo_heads, head_dim]")
            for name, x in (("k", k), ("v", v)):
                A.check_same_dtype(x, name, q, "q")
                A.check_shape(x, name, (plan["total_kv"], hkv, d),
                              "[kv_indptr[-1], num_kv_heads, head_dim]")
            _check_strides(q=q, k=k, v=v)
            if q.dtype != plan["dtype"]:
                raise ValueError(f"q must have the planned dtype {A.dtype_name(plan['dtype'])}; "
                                 f"got {A.dtype_name(q.dtype)}")
            plan["checked"] = seen
        elif (q.data.ptr | k.data.ptr | v.data.ptr) & 15:
            _check_strides(q=q, k=k, v=v)  # names the misaligned one
        out, lse = _outputs(q, out, return_lse)
        plan["launch"](q, k, v, out, lse, stream)
        return (out, lse) if return_lse else out


def plan_ragged(buffer, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim,
                options: Options, mask, q_dtype, kv_layout="NHD", pages=None, stream=None,
                graph=None, split_merge=None) -> dict:
    """Validate, build the work list and upload it; ``plan["launch"]`` runs it.

    ``pages`` is None for ragged keys (request b's keys are rows ``kv_indptr[b]:kv_indptr[b+1]``)
    or ``(kv_indices, kv_lens, page_size)`` for a paged pool (``kv_indptr`` then counts pages;
    both arrays already checked, e.g. by ``planner.check_page_table``). ``graph`` (a
    ``_core.GraphPrefill``, paged only) replaces ``buffer``: fixed buffers, grid and launch.
    ``split_merge`` (a wrapper's ``_core.SplitMerge``) holds split-KV partials across plans; a
    one-shot call gets its own.
    """
    custom_mask, packed_custom_mask, mask_indptr = mask
    options.check(custom_mask is not None or packed_custom_mask is not None)
    for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
        planner.positive_int(value, name)
    _core.check_head_dim(head_dim)
    group = _core.check_heads(num_qo_heads, num_kv_heads)
    qo_indptr = _host_indptr(qo_indptr, "qo_indptr")
    kv_indptr = _host_indptr(kv_indptr, "kv_indptr")
    if len(kv_indptr) != len(qo_indptr):
        raise ValueError(f"kv_indptr must have batch + 1 = {len(qo_indptr)} entries like "
                         f"qo_indptr; got {len(kv_indptr)}")
    qo_lens = np.diff(qo_indptr)
    kv_lens = np.diff(kv_indptr) if pages is None else pages[1]
    packed, mask_indptr, masks = _packed_mask(custom_mask, packed_custom_mask, mask_indptr,
                                              qo_lens, kv_lens)
    if graph is not None:
        if packed is not None:
            raise ValueError("a CUDA-graph BatchPrefillPaged takes no custom mask (its size and "
                             "address change from plan to plan)")
        cfg = _core.choose_tiles(head_dim, group, 1 << 30)  # the prefill tiles serve any length
        graph.check(len(qo_lens), int(qo_indptr[-1]), len(pages[0]))  # before setup fixes anything
        _core.check_graph_pages(graph.pool_pages, pages[0])
        graph.setup((cfg, q_dtype, head_dim, num_qo_heads, num_kv_heads, kv_layout, options,
                     pages[2]), cfg, q_dtype, head_dim, num_qo_heads, num_kv_heads, kv_layout)
        buffer = graph.buffer
    else:
        cfg = _core.choose_tiles(head_dim, group, int(qo_lens.max(initial=0)))
    queries_per_item = cfg.rows // group
    if graph is not None:  # always split (the merge is part of the graph), on a fixed grid
        split = planner.partition_tiles(qo_lens, kv_lens, queries_per_item, options.causal,
                                        num_kv_heads, num_sms=_core.num_sms(),
                                        ctas_per_sm=_core.ctas_per_sm(cfg, head_dim),
                                        tile=cfg.tile, max_items=graph.items)
        if split.num_states > graph.states:
            raise ValueError(f"this plan needs {split.num_states} split-KV states; the "
                             f"CUDA-graph wrapper holds {graph.states}")
        split = dataclasses.replace(split, merge_indptr=np.pad(
            split.merge_indptr, (0, graph.max_total_q + 1 - len(split.merge_indptr)),
            mode="edge"))
    else:
        split = None if packed is not None else _core.split_prefill(
            qo_lens, kv_lens, queries_per_item, options.causal, num_kv_heads, cfg, head_dim)
    if split is not None:  # query tiles cut into key chunks, merged per token
        request, q_start, kv_start, kv_end = split.request, split.q_start, split.kv_start, \
            split.kv_end
    else:
        request, q_start, kv_start, kv_end = _core.partition_prefill(
            qo_lens, kv_lens, queries_per_item, options.causal)
    arrays = dict(num_items=np.array([len(request)], np.int32), item_request=request,
                  item_q_start=q_start, item_kv_start=kv_start, item_kv_end=kv_end,
                  qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_lens=_as32(kv_lens))
    if split is not None:
        arrays.update(item_state=split.state, item_state_stride=split.state_stride,
                      merge_indptr=split.merge_indptr)
    if pages is not None:
        arrays["kv_indices"] = pages[0]
    if packed is not None:
        # Each item's key range runs from its first to its last non-empty tile (empty tiles in
        # between are still copied, but cost no math); the costliest items go first.
        classes, offsets, key_range, work = mask_mod.classify_tiles(
            masks, request, q_start, queries_per_item, cfg.tile,
            packed=packed if isinstance(packed, np.ndarray) else None, mask_indptr=mask_indptr)
        order = np.argsort(-work, kind="stable")
        arrays.update(item_request=request[order], item_q_start=q_start[order],
                      item_kv_start=key_range[order, 0].copy(),
                      item_kv_end=key_range[order, 1].copy(), mask_indptr=mask_indptr,
                      tile_class=classes, item_class_offset=offsets[order])
    params = np.zeros((), _core.PARAMS_DTYPE) if graph is None else graph.launch.params
    pointers = buffer.upload(arrays, stream)
    for name, ptr in pointers.items():
        if name in _core.PARAM_NAMES:
            params[name] = ptr
    device_mask = None
    if packed is not None:
        import cupy
        with stream or cupy.cuda.get_current_stream():  # ordered with the plan's upload
            device_mask = cupy.ascontiguousarray(cupy.asarray(packed).reshape(-1))
        params["mask"] = device_mask.data.ptr
    params["num_qo_heads"] = num_qo_heads
    params["group_size"] = group
    params["page_size"] = 0 if pages is None else pages[2]
    options.fill(params, head_dim)
    if graph is not None:  # the launch, partials and merge of the first plan, rewritten
        launch = graph.launch
        launch.merge[0].set_indptr(pointers["merge_indptr"])
    else:
        launch = _core.Launcher(params, cfg, q_dtype, head_dim, len(request), num_kv_heads,
                                kv_layout, paged=pages is not None)
        if split is not None:
            split_merge = split_merge or _core.SplitMerge("prefill", fixed=False)
            launch.set_split(split, split_merge, num_qo_heads, head_dim,
                             pointers["merge_indptr"], q_dtype, stream)
    # The plan holds its buffer: a caller's temporary one must outlive the launches that read it.
    return dict(launch=launch, total_q=int(qo_indptr[-1]), total_kv=int(kv_indptr[-1]),
                heads=(num_qo_heads, num_kv_heads), head_dim=head_dim, dtype=q_dtype,
                mask=device_mask, buffer=buffer)


def single_prefill(q, k, v, *, causal=False, sm_scale=None, window_left=-1, logits_soft_cap=0.0,
                   custom_mask=None, kv_layout="NHD", return_lse=False, stream=None):
    """Attention of one request: q ``[qo_len, Hq, D]``, k / v ``[kv_len, Hkv, D]`` (NHD) or
    ``[Hkv, kv_len, D]`` (HND); custom_mask bool ``[qo_len, kv_len]``. Returns out
    ``[qo_len, Hq, D]`` in q's dtype (and lse ``[qo_len, Hq]`` float32 with return_lse)."""
    _check_layout(kv_layout)
    arrs, on_gpu = A.intake_all({"q": q, "k": k, "v": v, "custom_mask": custom_mask})
    q, k, v, custom_mask = arrs.values()
    hq, hkv, d = _check_qkv(q, k, v, kv_layout)
    options = Options(causal, sm_scale, window_left, logits_soft_cap)
    if not on_gpu:
        _core.check_head_dim(d)  # the GPU's head dims on the CPU too
        options.check(custom_mask is not None)
        o, lse = reference.single_prefill(q, k, v, causal=causal, sm_scale=sm_scale,
                                          window_left=window_left, logits_soft_cap=logits_soft_cap,
                                          custom_mask=custom_mask, kv_layout=kv_layout)
        return _host_result(o, lse, q.dtype, return_lse)
    _check_strides(q=q, k=k, v=v)
    kv_len = k.shape[0] if kv_layout == "NHD" else k.shape[1]
    if custom_mask is not None and custom_mask.shape not in ((q.shape[0], kv_len),
                                                            (q.shape[0] * kv_len,)):
        raise ValueError(f"custom_mask must have shape [qo_len, kv_len] = ({q.shape[0]}, {kv_len}) "
                         f"or its flattened form; got {tuple(custom_mask.shape)}")
    qo_indptr = np.array([0, q.shape[0]], np.int32)
    kv_indptr = np.array([0, kv_len], np.int32)
    import cupy
    # Every temporary (plan buffer, split partials) on the launch stream: freed behind its use.
    with stream or cupy.cuda.get_current_stream():
        plan = plan_ragged(_core.PlanBuffer(), qo_indptr, kv_indptr, hq, hkv, d, options,
                           (custom_mask, None, None), q.dtype, kv_layout, stream)
        out, lse = _outputs(q, None, return_lse)
        plan["launch"](q, k, v, out, lse, stream)
    return (out, lse) if return_lse else out


def single_decode(q, k, v, *, sm_scale=None, window_left=-1, logits_soft_cap=0.0,
                  kv_layout="NHD", return_lse=False, stream=None):
    """Decode attention of one request: q ``[Hq, D]`` against k / v as in single_prefill.
    Returns out ``[Hq, D]`` (and lse ``[Hq]``)."""
    q = A.intake(q, "q")
    if q.ndim != 2:
        raise ValueError(f"q must have shape [num_qo_heads, head_dim]; got {tuple(q.shape)}")
    res = single_prefill(q[None], k, v, sm_scale=sm_scale, window_left=window_left,
                         logits_soft_cap=logits_soft_cap, kv_layout=kv_layout,
                         return_lse=return_lse, stream=stream)
    return (res[0][0], res[1][0]) if return_lse else res[0]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, sm_scale=None,
                     window_left=-1, logits_soft_cap=0.0, custom_mask=None,
                     packed_custom_mask=None, mask_indptr=None, return_lse=False, stream=None):
    """FlashAttention-style variable-length attention: packed q ``[total_q, Hq, D]``, k / v
    ``[total_k, Hkv, D]``, ``cu_seqlens_*`` int32 ``[batch + 1]`` (lengths [2, 3, 1] give
    [0, 2, 5, 6]). Plans and runs in one call: a serving loop should hold a BatchPrefillRagged."""
    arrs, on_gpu = A.intake_all({"q": q, "k": k, "v": v})
    # The FlashAttention names in errors (BatchPrefillRagged.plan says qo_indptr, kv_indptr).
    cu_seqlens_q = _host_indptr(cu_seqlens_q, "cu_seqlens_q")
    cu_seqlens_k = _host_indptr(cu_seqlens_k, "cu_seqlens_k")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries; got "
                         f"{len(cu_seqlens_q)} and {len(cu_seqlens_k)}")
    if not on_gpu:
        q, k, v = arrs.values()
        _core.check_head_dim(_check_qkv(q, k, v, "NHD")[2])  # the GPU's head dims on the CPU too
        for name, x in (("custom_mask", custom_mask), ("packed_custom_mask", packed_custom_mask),
                        ("mask_indptr", mask_indptr)):
            if x is not None:
                A.intake(x, name)  # arrays, as on the GPU path
        Options(causal, sm_scale, window_left, logits_soft_cap).check(
            custom_mask is not None or packed_custom_mask is not None)
        o, lse = reference.ragged_prefill(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
            sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap,
            custom_mask=custom_mask, packed_custom_mask=packed_custom_mask, mask_indptr=mask_indptr)
        return _host_result(o, lse, q.dtype, return_lse)
    q, k, v = arrs.values()
    hq, hkv, d = _check_qkv(q, k, v, "NHD")
    import cupy
    # Every temporary (plan buffer, split partials) on the launch stream: freed behind its use.
    with stream or cupy.cuda.get_current_stream():
        wrapper = BatchPrefillRagged()
        wrapper.plan(cu_seqlens_q, cu_seqlens_k, hq, hkv, d, causal=causal,
                     custom_mask=custom_mask, packed_custom_mask=packed_custom_mask,
                     mask_indptr=mask_indptr, window_left=window_left,
                     logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, dtype=q.dtype,
                     stream=stream)
        return wrapper.run(q, k, v, return_lse=return_lse, stream=stream)


def _host_result(o, lse, dtype, return_lse):
    o = o.astype(dtype)
    return (o, lse.astype(np.float32)) if return_lse else o


def _outputs(q, out, return_lse):
    return _core.run_outputs(q, "q", tuple(q.shape), "the shape of q", out, return_lse, False, [])


def _host_indptr(indptr, name: str) -> np.ndarray:
    """An int32 host copy of an indptr (a CuPy one is copied back: that syncs)."""
    indptr = A.intake(indptr, name)
    if A.is_gpu(indptr):
        import cupy
        indptr = cupy.asnumpy(indptr)
    A.check_index(indptr, name)
    if len(indptr) < 1 or indptr[0] != 0:
        raise ValueError(f"{name} must start at 0; got {indptr[:1].tolist()}")
    steps = np.diff(indptr.astype(np.int64))
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing; {name}[{i}]={indptr[i]} > "
                         f"{name}[{i + 1}]={indptr[i + 1]}")
    return np.ascontiguousarray(indptr)


def _packed_mask(custom_mask, packed_custom_mask, mask_indptr, qo_lens, kv_lens):
    """(packed uint8 mask, int32 mask_indptr in bytes, list of host 2-D masks), or Nones."""
    if custom_mask is not None and packed_custom_mask is not None:
        raise ValueError("give custom_mask or packed_custom_mask (with mask_indptr), not both")
    if mask_indptr is not None and packed_custom_mask is None:
        raise ValueError("mask_indptr goes with packed_custom_mask (a flat custom_mask needs none)")
    if custom_mask is not None:
        flat = mask_mod._as_bool(_to_host(A.intake(custom_mask, "custom_mask")).reshape(-1),
                                 "custom_mask")
        expected = int((qo_lens.astype(np.int64) * kv_lens.astype(np.int64)).sum())
        if flat.size != expected:
            raise ValueError(f"custom_mask must hold sum(qo_len * kv_len) = {expected} entries "
                             f"(each request's [qo_len, kv_len] block, flattened); got {flat.size}")
        masks = mask_mod.unflatten(flat, qo_lens, kv_lens)
        packed, indptr = mask_mod.pack(masks)
        return packed, indptr, masks
    if packed_custom_mask is not None:
        if mask_indptr is None:
            raise ValueError("packed_custom_mask needs mask_indptr (bytes, [batch + 1])")
        packed = A.intake(packed_custom_mask, "packed_custom_mask")
        mask_indptr = _to_host(A.intake(mask_indptr, "mask_indptr"))
        masks = mask_mod.unpack(_to_host(packed), mask_indptr, qo_lens, kv_lens,
                                name="packed_custom_mask")
        return packed, mask_indptr.astype(np.int32), masks
    return None, None, None


def _to_host(x):
    """A NumPy view of x (a CuPy array is copied back: that syncs)."""
    if A.is_gpu(x):
        import cupy
        return cupy.asnumpy(x)
    return x


def _as32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int32)
