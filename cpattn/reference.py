"""NumPy float64 reference of every cpattn op: the only place it lives.

Every op returns ``(out, lse)`` as float64 NumPy arrays. Inputs may be float16, bfloat16
(``ml_dtypes.bfloat16``), float32 or float64; they are cast to float64 first. Index arrays
are int32 by contract (any integer dtype is read here).

One function, :func:`attend`, does the math for one request on its gathered keys; every
other op only gathers a request's tokens (never a page tail, an unreferenced page or
padding) and calls it. Semantics (the contract every kernel shares):

- ``s = (q . k) * sm_scale``, default ``sm_scale = 1 / sqrt(head_dim)``; if
  ``logits_soft_cap > 0``: ``s = cap * tanh(s / cap)``.
- GQA: query head h reads kv head ``h // (num_qo_heads // num_kv_heads)``.
- causal is bottom-right aligned: query i sees key j iff ``j <= i + kv_len - qo_len``
  (PyTorch SDPA and JAX align top-left).
- ``window_left = w >= 0``: key j is visible only if ``j >= i + kv_len - qo_len - w``.
- custom mask: bool, True = attend; exclusive with ``causal=True``.
- masked scores are selected to -inf; a row that sees no key gives out 0 and lse -inf.
- ``lse = log(sum(exp(s)))`` over visible keys, natural log.
"""

import math

import numpy as np

from .mask import lengths_from_indptr, unflatten, unpack

__all__ = [
    "attend",
    "gather_paged",
    "merge_state",
    "merge_states",
    "mla",
    "paged_decode",
    "paged_kv_lens",
    "paged_prefill",
    "ragged_prefill",
    "single_decode",
    "single_prefill",
]

KV_LAYOUTS = ("NHD", "HND")


# ----------------------------------------------------------------------------- checks


def _to_f64(x, name):
    """``x`` as float64; it must hold float16, bfloat16, float32 or float64."""
    x = np.asarray(x)
    if not (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
        raise ValueError(
            f"{name} must be float16, bfloat16, float32 or float64; got dtype {x.dtype}"
        )
    return x.astype(np.float64, copy=False)


def _check_ndim(x, ndim, name, dims):
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {dims}; got shape {x.shape}")


def _check_qkv(q, k, v):
    """Shapes of one request: q [qo_len, Hq, D], k [kv_len, Hkv, D], v [kv_len, Hkv, Dv]."""
    _check_ndim(q, 3, "q", "[qo_len, num_qo_heads, head_dim]")
    _check_ndim(k, 3, "k", "[kv_len, num_kv_heads, head_dim]")
    _check_ndim(v, 3, "v", "[kv_len, num_kv_heads, head_dim_v]")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"k and v must agree on [kv_len, num_kv_heads]; got {k.shape[:2]} and {v.shape[:2]}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q and k must have the same head_dim; got q.shape[-1]={q.shape[2]}, "
            f"k.shape[-1]={k.shape[2]}"
        )
    if q.shape[2] < 1:
        raise ValueError(f"head_dim must be >= 1; got {q.shape[2]}")
    num_qo_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_qo_heads must be a multiple of num_kv_heads; "
            f"got num_qo_heads={num_qo_heads}, num_kv_heads={num_kv_heads}"
        )


def _check_options(causal, window_left, logits_soft_cap, has_mask):
    if int(window_left) != window_left or window_left < -1:
        raise ValueError(f"window_left must be an integer >= -1 (-1: no window); got {window_left}")
    if not logits_soft_cap >= 0:
        raise ValueError(f"logits_soft_cap must be >= 0 (0: off); got {logits_soft_cap}")
    if causal and has_mask:
        raise ValueError(
            "custom_mask and causal=True are mutually exclusive: the custom mask alone "
            "decides which keys are visible, so encode causality in it (True = attend)"
        )


def _check_layout(kv_layout):
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}; got {kv_layout!r}")


def _check_batch(batch, other, name):
    if other != batch:
        raise ValueError(f"{name} must describe batch={batch} requests; got {other}")


def _check_total(indptr_name, indptr_last, axis_name, total):
    if indptr_last != total:
        raise ValueError(
            f"{indptr_name}[-1] must equal {axis_name}; got {indptr_name}[-1]={indptr_last}, "
            f"{axis_name}={total}"
        )


# ------------------------------------------------------------------------------- core


def _visibility(qo_len, kv_len, causal, window_left, mask):
    """bool [qo_len, kv_len]: True where query i may see key j."""
    i = np.arange(qo_len)[:, None]
    j = np.arange(kv_len)[None, :]
    diag = i + kv_len - qo_len  # bottom-right aligned: the last key query i may see
    visible = np.ones((qo_len, kv_len), dtype=np.bool_)
    if causal:
        visible &= j <= diag
    if window_left >= 0:
        visible &= j >= diag - window_left
    if mask is not None:
        visible &= mask
    return visible


def _softmax_weighted_sum(s, v):
    """Softmax of the scores over keys, applied to v.

    s : float64 [H, qo_len, kv_len], -inf where masked
    v : float64 [kv_len, H, Dv]
    Returns out [qo_len, H, Dv], lse [qo_len, H].
    """
    row_max = np.max(s, axis=-1, initial=-np.inf)
    # NOTE: a row with no visible key has max -inf; shifting it by 0 instead keeps
    # exp(-inf - 0) = 0 and avoids -inf - -inf = NaN.
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(s - row_max[..., None])
    denom = p.sum(axis=-1)  # [H, qo_len]; 0 only for rows that see no key
    seen = denom > 0
    unnormalized = np.einsum("hqk,khd->qhd", p, v)
    out = np.divide(
        unnormalized,
        denom.T[..., None],
        out=np.zeros_like(unnormalized),
        where=seen.T[..., None],
    )
    lse = np.log(denom, out=np.full_like(denom, -np.inf), where=seen) + row_max
    return out, lse.T


def attend(q, k, v, *, causal=False, sm_scale=None, window_left=-1, logits_soft_cap=0.0,
           mask=None):
    """Attention of one request over its (already gathered) keys.

    Parameters
    ----------
    q : [qo_len, num_qo_heads, head_dim]
    k : [kv_len, num_kv_heads, head_dim]
    v : [kv_len, num_kv_heads, head_dim_v]
    mask : None or bool [qo_len, kv_len], True = attend (exclusive with causal)

    Returns
    -------
    out : float64 [qo_len, num_qo_heads, head_dim_v]
    lse : float64 [qo_len, num_qo_heads]
    """
    q, k, v = _to_f64(q, "q"), _to_f64(k, "k"), _to_f64(v, "v")
    _check_qkv(q, k, v)
    _check_options(causal, window_left, logits_soft_cap, mask is not None)
    qo_len, num_qo_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (qo_len, kv_len):
            raise ValueError(
                f"mask must be bool [qo_len, kv_len] = [{qo_len}, {kv_len}]; "
                f"got {mask.dtype} {list(mask.shape)}"
            )
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)

    group = num_qo_heads // num_kv_heads  # query head h reads kv head h // group
    k_per_qo_head = np.repeat(k, group, axis=1)
    v_per_qo_head = np.repeat(v, group, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k_per_qo_head) * sm_scale
    if logits_soft_cap > 0:
        s = logits_soft_cap * np.tanh(s / logits_soft_cap)
    visible = _visibility(qo_len, kv_len, causal, window_left, mask)
    s = np.where(visible[None], s, -np.inf)
    return _softmax_weighted_sum(s, v_per_qo_head)


def _attend_batch(q, qo_lens, gather_kv, head_dim_v, masks, **options):
    """Run attend() request by request on q [total_q, Hq, D].

    gather_kv(b) returns request b's (k [kv_len_b, Hkv, D], v [kv_len_b, Hkv, Dv]).
    """
    total_q, num_qo_heads, _ = q.shape
    out = np.zeros((total_q, num_qo_heads, head_dim_v))
    lse = np.full((total_q, num_qo_heads), -np.inf)
    starts = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int64)
    for b in range(len(qo_lens)):
        rows = slice(starts[b], starts[b + 1])
        k_b, v_b = gather_kv(b)
        out[rows], lse[rows] = attend(q[rows], k_b, v_b, mask=masks[b], **options)
    return out, lse


# --------------------------------------------------------------------- single request


def _kv_as_nhd(x, kv_layout, name):
    """k or v of one request as [kv_len, H, D] from NHD or HND ([H, kv_len, D])."""
    _check_layout(kv_layout)
    x = np.asarray(x)
    _check_ndim(x, 3, name, "[kv_len, H, D] (NHD) or [H, kv_len, D] (HND)")
    return np.swapaxes(x, 0, 1) if kv_layout == "HND" else x


def single_prefill(q, k, v, *, causal=False, sm_scale=None, window_left=-1,
                   logits_soft_cap=0.0, custom_mask=None, kv_layout="NHD"):
    """One request: q [qo_len, Hq, D]; k, v [kv_len, Hkv, D] (NHD) or [Hkv, kv_len, D] (HND).

    custom_mask: None or bool [qo_len, kv_len] (or its row-major flattening [qo_len * kv_len]).
    Returns out [qo_len, Hq, Dv], lse [qo_len, Hq].
    """
    q = np.asarray(q)
    _check_ndim(q, 3, "q", "[qo_len, num_qo_heads, head_dim]")
    k = _kv_as_nhd(k, kv_layout, "k")
    v = _kv_as_nhd(v, kv_layout, "v")
    mask = None
    if custom_mask is not None:
        qo_len, kv_len = q.shape[0], k.shape[0]
        custom_mask = np.asarray(custom_mask)
        if custom_mask.shape not in ((qo_len, kv_len), (qo_len * kv_len,)):
            raise ValueError(
                f"custom_mask must have shape [qo_len, kv_len] = [{qo_len}, {kv_len}] "
                f"(or [qo_len * kv_len]); got {list(custom_mask.shape)}"
            )
        mask = unflatten(custom_mask.reshape(-1), [qo_len], [kv_len])[0]
    return attend(q, k, v, causal=causal, sm_scale=sm_scale, window_left=window_left,
                  logits_soft_cap=logits_soft_cap, mask=mask)


def single_decode(q, k, v, *, sm_scale=None, window_left=-1, logits_soft_cap=0.0,
                  kv_layout="NHD"):
    """One decode token: q [Hq, D]; k, v as in single_prefill. Returns out [Hq, Dv], lse [Hq]."""
    q = np.asarray(q)
    _check_ndim(q, 2, "q", "[num_qo_heads, head_dim]")
    out, lse = single_prefill(q[None], k, v, sm_scale=sm_scale, window_left=window_left,
                              logits_soft_cap=logits_soft_cap, kv_layout=kv_layout)
    return out[0], lse[0]


# ----------------------------------------------------------------------- ragged batch


def _request_masks(custom_mask, packed_custom_mask, mask_indptr, qo_lens, kv_lens, causal):
    """Per-request bool [qo_len_b, kv_len_b] masks, or None for every request."""
    if custom_mask is not None and packed_custom_mask is not None:
        raise ValueError("give custom_mask or packed_custom_mask, not both")
    if (packed_custom_mask is None) != (mask_indptr is None):
        raise ValueError("packed_custom_mask and mask_indptr must be given together")
    if custom_mask is None and packed_custom_mask is None:
        return [None] * len(qo_lens)
    _check_options(causal, -1, 0.0, has_mask=True)
    if custom_mask is not None:
        return unflatten(custom_mask, qo_lens, kv_lens)
    return unpack(packed_custom_mask, mask_indptr, qo_lens, kv_lens)


def ragged_prefill(q, k, v, qo_indptr, kv_indptr, *, causal=False, sm_scale=None,
                   window_left=-1, logits_soft_cap=0.0, custom_mask=None,
                   packed_custom_mask=None, mask_indptr=None):
    """Ragged batch (varlen / cu_seqlens attention).

    Parameters
    ----------
    q : [total_q, Hq, D];  k : [total_kv, Hkv, D];  v : [total_kv, Hkv, Dv]
    qo_indptr, kv_indptr : int32 [batch + 1], start at 0, non-decreasing,
        ``qo_indptr[-1] == total_q`` and ``kv_indptr[-1] == total_kv``.
    custom_mask : None or bool [sum_b qo_len_b * kv_len_b], each request's row-major block
    packed_custom_mask : None or uint8, with mask_indptr int32 [batch + 1] in bytes
        (see cpattn.mask.pack)

    Returns out [total_q, Hq, Dv], lse [total_q, Hq].
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    _check_qkv(q, k, v)
    qo_lens = lengths_from_indptr(qo_indptr, "qo_indptr")
    kv_lens = lengths_from_indptr(kv_indptr, "kv_indptr")
    _check_batch(len(qo_lens), len(kv_lens), "kv_indptr")
    _check_total("qo_indptr", int(np.sum(qo_lens)), "q.shape[0]", q.shape[0])
    _check_total("kv_indptr", int(np.sum(kv_lens)), "k.shape[0]", k.shape[0])
    masks = _request_masks(custom_mask, packed_custom_mask, mask_indptr, qo_lens, kv_lens,
                           causal)
    kv_starts = np.asarray(kv_indptr).astype(np.int64)

    def gather_kv(b):
        tokens = slice(kv_starts[b], kv_starts[b + 1])
        return k[tokens], v[tokens]

    return _attend_batch(q, qo_lens, gather_kv, v.shape[2], masks, causal=causal,
                         sm_scale=sm_scale, window_left=window_left,
                         logits_soft_cap=logits_soft_cap)


# ------------------------------------------------------------------------ paged batch


def paged_kv_lens(kv_indptr, page_size, kv_lens=None, kv_last_page_len=None):
    """kv_len of each request of a paged batch, int64 [batch].

    Give exactly one of:
    - kv_last_page_len int32 [batch]: ``kv_len = (num_pages - 1) * page_size + last``, with
      ``1 <= last <= page_size`` for a request with pages; a request with 0 pages has
      kv_len 0 and its kv_last_page_len entry is ignored.
    - kv_lens int32 [batch]: ``(num_pages - 1) * page_size < kv_len <= num_pages * page_size``
      for a request with pages, ``kv_len == 0`` for one without.

    Example: kv_indptr [0, 2, 2, 5], page_size 4, kv_last_page_len [3, 0, 4] -> [7, 0, 12].
    """
    num_pages = lengths_from_indptr(kv_indptr, "kv_indptr")
    if (kv_lens is None) == (kv_last_page_len is None):
        raise ValueError("give exactly one of kv_lens or kv_last_page_len; "
                         f"got {'both' if kv_lens is not None else 'neither'}")
    if int(page_size) != page_size or page_size < 1:
        raise ValueError(f"page_size must be an integer >= 1; got {page_size}")
    name = "kv_lens" if kv_lens is not None else "kv_last_page_len"
    given = np.asarray(kv_lens if kv_lens is not None else kv_last_page_len)
    if given.shape != num_pages.shape or (given.size and given.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be integers [batch] = [{num_pages.shape[0]}]; "
                         f"got {given.dtype} {list(given.shape)}")
    given = given.astype(np.int64)
    has_pages = num_pages > 0
    full_pages = np.maximum(num_pages - 1, 0) * page_size
    if kv_lens is None:
        lo, hi = np.ones_like(given), np.full_like(given, page_size)
        # the kv_last_page_len of a request without pages is ignored
        ok = ((given >= lo) & (given <= hi)) | ~has_pages
        out = np.where(has_pages, full_pages + given, 0)
    else:
        lo, hi = full_pages + 1, num_pages * page_size
        ok = np.where(has_pages, (given >= lo) & (given <= hi), given == 0)
        out = given
    bad = np.flatnonzero(~ok)
    if bad.size:
        b = int(bad[0])
        expected = f"in [{lo[b]}, {hi[b]}]" if has_pages[b] else "0"
        raise ValueError(f"{name}[{b}]={given[b]} must be {expected} for a request with "
                         f"{num_pages[b]} pages of page_size={page_size}")
    return out


def _check_page_table(kv_indptr, kv_indices, num_pages):
    """kv_indices int32 [kv_indptr[-1]] (or longer): page ids in [0, num_pages)."""
    kv_indptr = np.asarray(kv_indptr).astype(np.int64)
    kv_indices = np.asarray(kv_indices)
    _check_ndim(kv_indices, 1, "kv_indices", "[kv_indptr[-1]]")
    if kv_indices.size and kv_indices.dtype.kind not in "iu":
        raise ValueError(f"kv_indices must hold integers (int32); got dtype {kv_indices.dtype}")
    if kv_indptr[-1] > kv_indices.shape[0]:
        raise ValueError(f"kv_indices is too short: kv_indptr[-1]={kv_indptr[-1]}, "
                         f"len(kv_indices)={kv_indices.shape[0]}")
    used = kv_indices[: kv_indptr[-1]].astype(np.int64)
    bad = np.flatnonzero((used < 0) | (used >= num_pages))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"kv_indices[{i}]={used[i]} is out of range [0, num_pages={num_pages})")
    return kv_indptr, used


def gather_paged(pages, kv_indptr, kv_indices, b, kv_len, kv_layout):
    """The first kv_len tokens of request b from a paged pool, [kv_len, H, D].

    pages : [num_pages, page_size, H, D] (NHD) or [num_pages, H, page_size, D] (HND)
    kv_indptr : int32 [batch + 1];  kv_indices : int32 [kv_indptr[-1]] page ids
    Only the request's own token slots are read (token t lives in slot t % page_size of
    its page t // page_size), never a page tail or an unreferenced page.
    """
    _check_layout(kv_layout)
    pages = np.asarray(pages)
    _check_ndim(pages, 4, "pages", "[num_pages, page_size, H, D] (NHD) or "
                "[num_pages, H, page_size, D] (HND)")
    if kv_layout == "HND":
        pages = pages.transpose(0, 2, 1, 3)  # view as NHD
    num_pages, page_size = pages.shape[:2]
    lengths_from_indptr(kv_indptr, "kv_indptr")
    kv_indptr, used = _check_page_table(kv_indptr, kv_indices, num_pages)
    page_ids = used[kv_indptr[b]:kv_indptr[b + 1]]
    if kv_len > page_ids.shape[0] * page_size:
        raise ValueError(f"kv_len={kv_len} does not fit in request {b}'s "
                         f"{page_ids.shape[0]} pages of page_size={page_size}")
    # NOTE: token offsets in 64-bit, as in the kernels.
    t = np.arange(kv_len, dtype=np.int64)
    return pages[page_ids[t // page_size], t % page_size]


def _pool_page_size(k_pages, v_pages, kv_layout):
    """Check two pools agree on [num_pages, page_size, Hkv]; return page_size."""
    _check_layout(kv_layout)
    dims = "[num_pages, page_size, H, D]" if kv_layout == "NHD" else "[num_pages, H, page_size, D]"
    _check_ndim(k_pages, 4, "k_pages", dims)
    _check_ndim(v_pages, 4, "v_pages", dims)
    if k_pages.shape[:3] != v_pages.shape[:3]:
        raise ValueError(f"k_pages and v_pages must agree on all but head_dim; "
                         f"got {k_pages.shape} and {v_pages.shape}")
    return k_pages.shape[1] if kv_layout == "NHD" else k_pages.shape[2]


def paged_prefill(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices, *, kv_lens=None,
                  kv_last_page_len=None, kv_layout="NHD", causal=False, sm_scale=None,
                  window_left=-1, logits_soft_cap=0.0, custom_mask=None,
                  packed_custom_mask=None, mask_indptr=None):
    """Ragged queries over a paged KV cache.

    q : [total_q, Hq, D];  k_pages, v_pages : paged pools (see gather_paged)
    qo_indptr, kv_indptr : int32 [batch + 1] (kv_indptr counts pages);
    kv_indices : int32 page ids;  kv_lens or kv_last_page_len : int32 [batch] (see
    paged_kv_lens);  masks as in ragged_prefill.
    Returns out [total_q, Hq, Dv], lse [total_q, Hq].
    """
    q, k_pages, v_pages = np.asarray(q), np.asarray(k_pages), np.asarray(v_pages)
    _check_ndim(q, 3, "q", "[total_q, num_qo_heads, head_dim]")
    page_size = _pool_page_size(k_pages, v_pages, kv_layout)
    lens = paged_kv_lens(kv_indptr, page_size, kv_lens, kv_last_page_len)
    qo_lens = lengths_from_indptr(qo_indptr, "qo_indptr")
    _check_batch(len(qo_lens), len(lens), "kv_indptr")
    _check_total("qo_indptr", int(np.sum(qo_lens)), "q.shape[0]", q.shape[0])
    _check_page_table(kv_indptr, kv_indices, k_pages.shape[0])
    masks = _request_masks(custom_mask, packed_custom_mask, mask_indptr, qo_lens, lens, causal)

    def gather_kv(b):
        return (gather_paged(k_pages, kv_indptr, kv_indices, b, lens[b], kv_layout),
                gather_paged(v_pages, kv_indptr, kv_indices, b, lens[b], kv_layout))

    return _attend_batch(q, qo_lens, gather_kv, v_pages.shape[3], masks, causal=causal,
                         sm_scale=sm_scale, window_left=window_left,
                         logits_soft_cap=logits_soft_cap)


def paged_decode(q, k_pages, v_pages, kv_indptr, kv_indices, *, kv_lens=None,
                 kv_last_page_len=None, kv_layout="NHD", sm_scale=None, window_left=-1,
                 logits_soft_cap=0.0):
    """One decode token per request over a paged KV cache.

    q : [batch, Hq, D], each the last token of its request (query 0 of qo_len 1).
    Returns out [batch, Hq, Dv], lse [batch, Hq].
    """
    q = np.asarray(q)
    _check_ndim(q, 3, "q", "[batch, num_qo_heads, head_dim]")
    batch = len(lengths_from_indptr(kv_indptr, "kv_indptr"))
    _check_batch(batch, q.shape[0], "q.shape[0]")
    qo_indptr = np.arange(q.shape[0] + 1, dtype=np.int32)
    return paged_prefill(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices,
                         kv_lens=kv_lens, kv_last_page_len=kv_last_page_len,
                         kv_layout=kv_layout, sm_scale=sm_scale, window_left=window_left,
                         logits_soft_cap=logits_soft_cap)


# -------------------------------------------------------------------------------- MLA


def mla(q_nope, q_pe, ckv_cache, kpe_cache, qo_indptr, kv_indptr, kv_indices, *, kv_lens,
        sm_scale, causal=False):
    """Multi-head latent attention over a paged latent cache.

    q_nope : [total_q, H, head_dim_ckv];  q_pe : [total_q, H, head_dim_kpe]
    ckv_cache : [num_pages, page_size, head_dim_ckv];  kpe_cache : [num_pages, page_size,
    head_dim_kpe];  kv_lens : int32 [batch];  sm_scale : required (no default).
    Scores ``(q_nope . ckv + q_pe . kpe) * sm_scale``; V is the ckv itself: attend() with
    k = concat(ckv, kpe) as one kv head and v = ckv.
    Returns out [total_q, H, head_dim_ckv], lse [total_q, H].
    """
    if sm_scale is None:
        raise ValueError("sm_scale is required for mla (e.g. 1/sqrt(128 + 64) for DeepSeek-V3)")
    q_nope, q_pe = np.asarray(q_nope), np.asarray(q_pe)
    ckv_cache, kpe_cache = np.asarray(ckv_cache), np.asarray(kpe_cache)
    _check_ndim(q_nope, 3, "q_nope", "[total_q, num_heads, head_dim_ckv]")
    _check_ndim(q_pe, 3, "q_pe", "[total_q, num_heads, head_dim_kpe]")
    _check_ndim(ckv_cache, 3, "ckv_cache", "[num_pages, page_size, head_dim_ckv]")
    _check_ndim(kpe_cache, 3, "kpe_cache", "[num_pages, page_size, head_dim_kpe]")
    if q_nope.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_nope and q_pe must agree on [total_q, num_heads]; "
                         f"got {q_nope.shape[:2]} and {q_pe.shape[:2]}")
    if ckv_cache.shape[:2] != kpe_cache.shape[:2]:
        raise ValueError(f"ckv_cache and kpe_cache must agree on [num_pages, page_size]; "
                         f"got {ckv_cache.shape[:2]} and {kpe_cache.shape[:2]}")
    for name, q_part, cache in (("ckv", q_nope, ckv_cache), ("kpe", q_pe, kpe_cache)):
        if q_part.shape[2] != cache.shape[2]:
            raise ValueError(f"head_dim_{name} differs: {q_part.shape[2]} in the query, "
                             f"{cache.shape[2]} in {name}_cache")
    q = np.concatenate([_to_f64(q_nope, "q_nope"), _to_f64(q_pe, "q_pe")], axis=-1)
    ckv_pages, kpe_pages = ckv_cache[:, :, None, :], kpe_cache[:, :, None, :]  # one kv head
    lens = paged_kv_lens(kv_indptr, ckv_cache.shape[1], kv_lens=kv_lens)
    qo_lens = lengths_from_indptr(qo_indptr, "qo_indptr")
    _check_batch(len(qo_lens), len(lens), "kv_indptr")
    _check_total("qo_indptr", int(np.sum(qo_lens)), "q_nope.shape[0]", q.shape[0])

    def gather_kv(b):
        ckv = _to_f64(gather_paged(ckv_pages, kv_indptr, kv_indices, b, lens[b], "NHD"), "ckv")
        kpe = _to_f64(gather_paged(kpe_pages, kv_indptr, kv_indices, b, lens[b], "NHD"), "kpe")
        return np.concatenate([ckv, kpe], axis=-1), ckv

    return _attend_batch(q, qo_lens, gather_kv, ckv_cache.shape[2], [None] * len(qo_lens),
                         causal=causal, sm_scale=sm_scale)


# ------------------------------------------------------------------------------ merge


def merge_states(v, s):
    """Merge attention states computed over disjoint key sets.

    v : [n, num_states, H, D] normalized outputs;  s : [n, num_states, H] their lse
    (natural log; -inf for a state that saw no key). num_states may be 0.
    Returns v [n, H, D], s [n, H]; where every state is empty: v 0 and s -inf.
    """
    v, s = _to_f64(v, "v"), _to_f64(s, "s")
    _check_ndim(v, 4, "v", "[n, num_states, H, D]")
    _check_ndim(s, 3, "s", "[n, num_states, H]")
    if v.shape[:3] != s.shape:
        raise ValueError(f"v [n, num_states, H, D] and s [n, num_states, H] disagree; "
                         f"got {v.shape} and {s.shape}")
    s_max = np.max(s, axis=1, initial=-np.inf)  # [n, H]
    # NOTE: as in attend(), an all-empty position shifts by 0 so that no -inf - -inf = NaN.
    s_max = np.where(np.isfinite(s_max), s_max, 0.0)
    weight = np.exp(s - s_max[:, None])[..., None]  # [n, num_states, H, 1]; empty -> 0
    # An empty state contributes nothing, whatever its v holds (0 * inf would be NaN).
    weighted = np.multiply(weight, v, out=np.zeros_like(v), where=weight > 0).sum(axis=1)
    total = weight.sum(axis=1)  # [n, H, 1]
    v_out = np.divide(weighted, total, out=np.zeros_like(weighted), where=total > 0)
    total = total[..., 0]
    s_out = np.log(total, out=np.full_like(total, -np.inf), where=total > 0) + s_max
    return v_out, s_out


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two states: v_a, v_b [n, H, D], s_a, s_b [n, H]. Returns v [n, H, D], s [n, H]."""
    v_a, v_b = np.asarray(v_a), np.asarray(v_b)
    s_a, s_b = np.asarray(s_a), np.asarray(s_b)
    if v_a.shape != v_b.shape or s_a.shape != s_b.shape:
        raise ValueError(f"the two states must have the same shapes; got v {v_a.shape} and "
                         f"{v_b.shape}, s {s_a.shape} and {s_b.shape}")
    return merge_states(np.stack([v_a, v_b], axis=1), np.stack([s_a, s_b], axis=1))
