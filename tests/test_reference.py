"""CPU tests of cpattn.reference against a naive padded dense implementation written here."""

import math
import warnings

import ml_dtypes
import numpy as np
import pytest

from cpattn import mask as cmask
from cpattn import reference as ref

TOL = dict(rtol=1e-10, atol=1e-12)  # float64 against float64
HEAD_DIM = 8
HEAD_DIM_V = 6
HEADS = [(4, 4), (4, 1), (8, 2)]  # (num_qo_heads, num_kv_heads): GQA ratios 1 and 4
# (qo_len, kv_len) per request: qo_len > kv_len, empty queries, empty keys, both empty
LENGTHS = [(3, 7), (9, 4), (0, 5), (4, 0), (1, 1), (6, 6), (0, 0), (5, 12)]
OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_left": 3},
    "causal-window": {"causal": True, "window_left": 2},
    "soft-cap": {"logits_soft_cap": 1.5, "sm_scale": 0.9},
    "custom-mask": {"custom_mask": True},
}
PAGE_SIZES = [1, 5, 16]
SPARE_PAGES = 3
LAYOUTS = ["NHD", "HND"]
INPUT_DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


# ---------------------------------------------------------------- naive dense version


def dense_attention(qs, ks, vs, masks=None, causal=False, sm_scale=None, window_left=-1,
                    logits_soft_cap=0.0):
    """Pad the batch to its max lengths, build the full score matrix and explicit masks.

    qs[b] [qo_len_b, Hq, D], ks[b] [kv_len_b, Hkv, D], vs[b] [kv_len_b, Hkv, Dv].
    Returns per-request lists of out [qo_len_b, Hq, Dv] and lse [qo_len_b, Hq].
    """
    batch, (_, hq, d), (_, hkv, dv) = len(qs), qs[0].shape, vs[0].shape
    qo_lens, kv_lens = np.array([len(q) for q in qs]), np.array([len(k) for k in ks])
    max_q, max_kv = max(qo_lens.max(), 1), max(kv_lens.max(), 1)
    q_pad, k_pad = np.zeros((batch, max_q, hq, d)), np.zeros((batch, max_kv, hkv, d))
    v_pad = np.zeros((batch, max_kv, hkv, dv))
    allowed = np.zeros((batch, max_q, max_kv), dtype=bool)
    for b in range(batch):
        q_pad[b, : qo_lens[b]], k_pad[b, : kv_lens[b]], v_pad[b, : kv_lens[b]] = qs[b], ks[b], vs[b]
        allowed[b, : qo_lens[b], : kv_lens[b]] = True if masks is None else masks[b]
    i = np.arange(max_q)[None, :, None]
    j = np.arange(max_kv)[None, None, :]
    last_visible = i + (kv_lens - qo_lens)[:, None, None]  # bottom-right aligned
    if causal:
        allowed &= j <= last_visible
    if window_left >= 0:
        allowed &= j >= last_visible - window_left
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros((batch, max_q, hq, dv))
    lse = np.full((batch, max_q, hq), -np.inf)
    any_visible = allowed.any(axis=-1)
    for h in range(hq):
        kv_head = h // (hq // hkv)
        s = np.einsum("bqd,bkd->bqk", q_pad[:, :, h], k_pad[:, :, kv_head]) * scale
        if logits_soft_cap > 0:
            s = logits_soft_cap * np.tanh(s / logits_soft_cap)
        m = np.where(any_visible, np.max(s, axis=-1, where=allowed, initial=-np.inf), 0.0)
        p = np.where(allowed, np.exp(s - m[..., None]), 0.0)
        denom = np.where(any_visible, p.sum(-1), 1.0)
        o = np.einsum("bqk,bkd->bqd", p, v_pad[:, :, kv_head]) / denom[..., None]
        out[:, :, h] = np.where(any_visible[..., None], o, 0.0)
        lse[:, :, h] = np.where(any_visible, m + np.log(denom), -np.inf)
    return ([out[b, : qo_lens[b]] for b in range(batch)],
            [lse[b, : qo_lens[b]] for b in range(batch)])


# -------------------------------------------------------------------- random inputs


def random_requests(rng, lengths, hq, hkv, d=HEAD_DIM, dv=HEAD_DIM_V):
    """Fresh random (never zero) per-request q, k, v and custom masks."""
    qs = [rng.standard_normal((lq, hq, d)) for lq, _ in lengths]
    ks = [rng.standard_normal((lk, hkv, d)) for _, lk in lengths]
    vs = [rng.standard_normal((lk, hkv, dv)) for _, lk in lengths]
    masks = [rng.random((lq, lk)) < 0.6 for lq, lk in lengths]
    return qs, ks, vs, masks


def indptr(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def split_options(options, masks):
    """(reference kwargs, dense kwargs) for one OPTIONS entry."""
    options = dict(options)
    use_mask = options.pop("custom_mask", False)
    ref_kwargs = dict(options, custom_mask=cmask.flatten(masks)[0] if use_mask else None)
    return ref_kwargs, dict(options, masks=masks if use_mask else None)


def poison(rng, shape):
    """An array of NaN, +Inf and -Inf: what unused cache slots may hold."""
    return rng.choice(np.array([np.nan, np.inf, -np.inf]), size=shape)


def build_paged(rng, ks, page_size, layout, poison_pool=None, page_ids=None):
    """Scatter per-request tokens into a shuffled page pool with spare pages.

    Every unused slot (page tails, unreferenced pages) holds NaN or Inf. Returns
    pool [num_pages, page_size, H, D] (NHD) or [num_pages, H, page_size, D] (HND),
    kv_indptr, kv_indices, kv_last_page_len.
    """
    num_pages = [-(-len(k) // page_size) for k in ks]
    total = sum(num_pages) + SPARE_PAGES
    if page_ids is None:
        page_ids = rng.permutation(total)[: sum(num_pages)].astype(np.int32)
    pool = poison(rng, (total, page_size) + ks[0].shape[1:])
    starts = indptr(num_pages)
    for b, k in enumerate(ks):
        for t in range(len(k)):
            pool[page_ids[starts[b] + t // page_size], t % page_size] = k[t]
    last = np.array([len(k) - (n - 1) * page_size if n else 0 for k, n in zip(ks, num_pages)])
    if layout == "HND":
        pool = np.ascontiguousarray(pool.transpose(0, 2, 1, 3))
    return pool, starts, page_ids, last.astype(np.int32)


def assert_close_lists(out, lse, dense_out, dense_lse, qo_lens):
    starts = indptr(qo_lens)
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    for b in range(len(qo_lens)):
        np.testing.assert_allclose(out[starts[b]:starts[b + 1]], dense_out[b], **TOL)
        np.testing.assert_allclose(lse[starts[b]:starts[b + 1]], dense_lse[b], **TOL)


# ------------------------------------------------------------------------------- tests


def test_causal_worked_example_query_0_sees_first_11_keys():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, 2, HEAD_DIM)) for n in (10, 20, 20))
    out, lse = ref.single_prefill(q, k, v, causal=True)
    first, first_lse = ref.single_prefill(q[:1], k[:11], v[:11])
    np.testing.assert_allclose(out[0], first[0], **TOL)
    np.testing.assert_allclose(lse[0], first_lse[0], **TOL)
    k2, v2 = k.copy(), v.copy()
    k2[11:], v2[11:] = 1e3, -1e3  # keys after the 11th do not reach query 0
    np.testing.assert_allclose(ref.single_prefill(q, k2, v2, causal=True)[0][0], out[0], **TOL)
    full = ref.single_prefill(q[9:], k, v)[0]  # the last query sees all 20 keys
    np.testing.assert_allclose(out[9], full[0], **TOL)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("hq, hkv", HEADS)
def test_ragged_prefill_matches_dense(hq, hkv, option):
    rng = np.random.default_rng(1)
    lengths = LENGTHS + [tuple(x) for x in rng.integers(0, 15, size=(3, 2))]
    qs, ks, vs, masks = random_requests(rng, lengths, hq, hkv)
    ref_kwargs, dense_kwargs = split_options(OPTIONS[option], masks)
    out, lse = ref.ragged_prefill(np.concatenate(qs), np.concatenate(ks), np.concatenate(vs),
                                  indptr([len(q) for q in qs]), indptr([len(k) for k in ks]),
                                  **ref_kwargs)
    assert out.shape == (sum(len(q) for q in qs), hq, HEAD_DIM_V) and lse.shape == out.shape[:2]
    assert_close_lists(out, lse, *dense_attention(qs, ks, vs, **dense_kwargs),
                       [len(q) for q in qs])


def test_packed_custom_mask_equals_flat():
    rng = np.random.default_rng(2)
    qs, ks, vs, masks = random_requests(rng, LENGTHS, 4, 2)
    args = (np.concatenate(qs), np.concatenate(ks), np.concatenate(vs),
            indptr([len(q) for q in qs]), indptr([len(k) for k in ks]))
    packed, mask_indptr = cmask.pack(masks)
    flat = ref.ragged_prefill(*args, custom_mask=cmask.flatten(masks)[0])
    from_packed = ref.ragged_prefill(*args, packed_custom_mask=packed, mask_indptr=mask_indptr)
    np.testing.assert_array_equal(from_packed[0], flat[0])
    np.testing.assert_array_equal(from_packed[1], flat[1])


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_prefill_matches_dense(layout, option):
    rng = np.random.default_rng(3)
    qs, ks, vs, masks = random_requests(rng, [(7, 11)], 4, 2)
    ref_kwargs, dense_kwargs = split_options(OPTIONS[option], masks)
    if ref_kwargs["custom_mask"] is not None:
        ref_kwargs["custom_mask"] = masks[0]  # 2-D form
    k, v = (x[0].transpose(1, 0, 2) if layout == "HND" else x[0] for x in (ks, vs))
    out, lse = ref.single_prefill(qs[0], k, v, kv_layout=layout, **ref_kwargs)
    dense_out, dense_lse = dense_attention(qs, ks, vs, **dense_kwargs)
    np.testing.assert_allclose(out, dense_out[0], **TOL)
    np.testing.assert_allclose(lse, dense_lse[0], **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", [{}, {"window_left": 4}, {"logits_soft_cap": 2.0}])
def test_single_decode_matches_dense(options, layout):
    rng = np.random.default_rng(4)
    qs, ks, vs, _ = random_requests(rng, [(1, 13)], 8, 2)
    k, v = (x[0].transpose(1, 0, 2) if layout == "HND" else x[0] for x in (ks, vs))
    out, lse = ref.single_decode(qs[0][0], k, v, kv_layout=layout, **options)
    dense_out, dense_lse = dense_attention(qs, ks, vs, **options)
    assert out.shape == (8, HEAD_DIM_V) and lse.shape == (8,)
    np.testing.assert_allclose(out, dense_out[0][0], **TOL)
    np.testing.assert_allclose(lse, dense_lse[0][0], **TOL)


@pytest.mark.parametrize("option", ["plain", "causal-window", "soft-cap", "custom-mask"])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_prefill_poisoned_pool_matches_ragged(layout, page_size, option):
    rng = np.random.default_rng(5)
    qs, ks, vs, masks = random_requests(rng, LENGTHS, 4, 1)
    ref_kwargs, _ = split_options(OPTIONS[option], masks)
    k_pool, kv_indptr, kv_indices, last = build_paged(rng, ks, page_size, layout)
    v_pool, *_ = build_paged(rng, vs, page_size, layout, page_ids=kv_indices)
    q, qo_indptr = np.concatenate(qs), indptr([len(x) for x in qs])
    kv_lens = np.array([len(k) for k in ks], dtype=np.int32)
    paged_args = (q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = ref.paged_prefill(*paged_args, kv_lens=kv_lens, kv_layout=layout,
                                     **ref_kwargs)
        out_last, lse_last = ref.paged_prefill(*paged_args, kv_last_page_len=last,
                                               kv_layout=layout, **ref_kwargs)
    ragged = ref.ragged_prefill(q, np.concatenate(ks), np.concatenate(vs), qo_indptr,
                                indptr(kv_lens), **ref_kwargs)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, ragged[0])
    np.testing.assert_array_equal(lse, ragged[1])
    np.testing.assert_array_equal(out_last, out)
    np.testing.assert_array_equal(lse_last, lse)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_decode_poisoned_pool_matches_dense(layout, page_size):
    rng = np.random.default_rng(6)
    qs, ks, vs, _ = random_requests(rng, [(1, n) for n in (1, 17, 0, 5, 16, 33)], 8, 2)
    k_pool, kv_indptr, kv_indices, last = build_paged(rng, ks, page_size, layout)
    v_pool, *_ = build_paged(rng, vs, page_size, layout, page_ids=kv_indices)
    out, lse = ref.paged_decode(np.concatenate(qs), k_pool, v_pool, kv_indptr, kv_indices,
                                kv_last_page_len=last, kv_layout=layout, window_left=6)
    assert out.shape == (6, 8, HEAD_DIM_V) and lse.shape == (6, 8)
    assert_close_lists(out, lse, *dense_attention(qs, ks, vs, window_left=6), [1] * 6)
    assert (lse[2] == -np.inf).all() and (out[2] == 0).all()  # the request with no keys


def mla_manual(q_nope, q_pe, ckvs, kpes, qo_lens, sm_scale, causal):
    """Token by token, head by head: softmax((q_nope.ckv + q_pe.kpe) * sm_scale) @ ckv."""
    out, lse = np.zeros(q_nope.shape), np.full(q_nope.shape[:2], -np.inf)
    row = 0
    for ckv, kpe, qo_len in zip(ckvs, kpes, qo_lens):
        for i in range(qo_len):
            n_keys = i + len(ckv) - qo_len + 1 if causal else len(ckv)
            for h in range(q_nope.shape[1]):
                s = (ckv[:n_keys] @ q_nope[row, h] + kpe[:n_keys] @ q_pe[row, h]) * sm_scale
                if len(s):
                    weights = np.exp(s - s.max())
                    out[row, h] = weights @ ckv[:n_keys] / weights.sum()
                    lse[row, h] = s.max() + np.log(weights.sum())
            row += 1
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
def test_mla_matches_concatenated_attend_and_manual_loop(causal):
    rng = np.random.default_rng(7)
    heads, dc, dp, page_size = 4, 512, 64, 5
    lengths = [(3, 7), (1, 1), (0, 4), (2, 0), (4, 16)]
    qo_lens, kv_lens = [lq for lq, _ in lengths], [lk for _, lk in lengths]
    q_nope = rng.standard_normal((sum(qo_lens), heads, dc))
    q_pe = rng.standard_normal((sum(qo_lens), heads, dp))
    ckvs = [rng.standard_normal((n, 1, dc)) for n in kv_lens]
    kpes = [rng.standard_normal((n, 1, dp)) for n in kv_lens]
    ckv_pool, kv_indptr, kv_indices, _ = build_paged(rng, ckvs, page_size, "NHD")
    kpe_pool, *_ = build_paged(rng, kpes, page_size, "NHD", page_ids=kv_indices)
    sm_scale = 1 / math.sqrt(128 + 64)
    out, lse = ref.mla(q_nope, q_pe, ckv_pool[:, :, 0], kpe_pool[:, :, 0], indptr(qo_lens),
                       kv_indptr, kv_indices, kv_lens=np.array(kv_lens, np.int32),
                       sm_scale=sm_scale, causal=causal)
    assert np.isfinite(out).all() and out.shape == q_nope.shape
    keys = np.concatenate([np.concatenate(ckvs), np.concatenate(kpes)], axis=-1)
    concat = ref.ragged_prefill(np.concatenate([q_nope, q_pe], -1), keys, np.concatenate(ckvs),
                                indptr(qo_lens), indptr(kv_lens), sm_scale=sm_scale,
                                causal=causal)
    np.testing.assert_allclose(out, concat[0], **TOL)
    np.testing.assert_allclose(lse, concat[1], **TOL)
    manual = mla_manual(q_nope, q_pe, [c[:, 0] for c in ckvs], [k[:, 0] for k in kpes],
                        qo_lens, sm_scale, causal)
    np.testing.assert_allclose(out, manual[0], **TOL)
    np.testing.assert_allclose(lse, manual[1], **TOL)


@pytest.mark.parametrize("split", [0, 5, 13])
def test_merge_state_of_two_key_halves_equals_full_attention(split):
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((n, h, HEAD_DIM)) for n, h in ((6, 4), (13, 2), (13, 2)))
    full = ref.attend(q, k, v)
    a, b = ref.attend(q, k[:split], v[:split]), ref.attend(q, k[split:], v[split:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = ref.merge_state(a[0], a[1], b[0], b[1])
        cuts = sorted([0, split, 9, 13])  # three parts, possibly empty, covering all keys
        parts = [ref.attend(q, k[lo:hi], v[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
        merged3 = ref.merge_states(np.stack([p[0] for p in parts], 1),
                                   np.stack([p[1] for p in parts], 1))
    for result in (merged, merged3):
        np.testing.assert_allclose(result[0], full[0], **TOL)
        np.testing.assert_allclose(result[1], full[1], **TOL)


def test_merge_empty_states_give_zero_and_minus_inf_without_warnings():
    rng = np.random.default_rng(9)
    v_b, s_b = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2))
    v_a, s_a = np.full_like(v_b, np.nan), np.full_like(s_b, -np.inf)  # empty, garbage v
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, s = ref.merge_state(v_a, s_a, v_b, s_b)
        v_none, s_none = ref.merge_state(v_a, s_a, np.zeros_like(v_b), s_a)
        v_zero, s_zero = ref.merge_states(np.zeros((3, 0, 2, 4)), np.zeros((3, 0, 2)))
    np.testing.assert_allclose(v, v_b, **TOL)
    np.testing.assert_allclose(s, s_b, **TOL)
    for out, lse in ((v_none, s_none), (v_zero, s_zero)):
        assert (out == 0).all() and out.shape == (3, 2, 4) and (lse == -np.inf).all()


def test_rows_that_see_no_key_give_zero_and_minus_inf_without_warnings():
    rng = np.random.default_rng(10)
    qs, ks, vs, _ = random_requests(rng, [(6, 2), (3, 0)], 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = ref.ragged_prefill(np.concatenate(qs), np.concatenate(ks),
                                      np.concatenate(vs), indptr([6, 3]), indptr([2, 0]),
                                      causal=True, logits_soft_cap=3.0)
        out_mask, lse_mask = ref.single_prefill(qs[0], ks[0], vs[0],
                                                custom_mask=np.zeros((6, 2), bool))
    # causal, qo_len 6 > kv_len 2: queries 0..3 see no key; request 1 has no keys at all
    empty_rows = np.r_[0:4, 6:9]
    assert (out[empty_rows] == 0).all() and (lse[empty_rows] == -np.inf).all()
    assert np.isfinite(out).all() and np.isfinite(lse[4:6]).all()
    assert (out_mask == 0).all() and (lse_mask == -np.inf).all()


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_low_precision_inputs_are_read_as_float64(dtype):
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((n, 2, HEAD_DIM)).astype(dtype) for n in (4, 9, 9))
    out, lse = ref.single_prefill(q, k, v, causal=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    expected = ref.single_prefill(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(lse, expected[1])


def test_paged_kv_lens_worked_example_and_rules():
    kv_indptr = np.array([0, 2, 2, 5], np.int32)
    lens = ref.paged_kv_lens(kv_indptr, 4, kv_last_page_len=np.array([3, 0, 4], np.int32))
    np.testing.assert_array_equal(lens, [7, 0, 12])
    assert lens.dtype == np.int64
    np.testing.assert_array_equal(ref.paged_kv_lens(kv_indptr, 4, kv_lens=lens), lens)
    for kv_lens, match in (([9, 0, 12], r"kv_lens\[0\]=9 must be in \[5, 8\]"),
                           ([4, 0, 12], r"kv_lens\[0\]=4 must be in \[5, 8\]"),
                           ([7, 1, 12], r"kv_lens\[1\]=1 must be 0 for a request with 0 pages")):
        with pytest.raises(ValueError, match=match):
            ref.paged_kv_lens(kv_indptr, 4, kv_lens=np.array(kv_lens, np.int32))
    with pytest.raises(ValueError, match=r"kv_last_page_len\[2\]=5 must be in \[1, 4\]"):
        ref.paged_kv_lens(kv_indptr, 4, kv_last_page_len=np.array([3, 0, 5], np.int32))
    with pytest.raises(ValueError, match=r"kv_last_page_len\[0\]=0 must be in \[1, 4\]"):
        ref.paged_kv_lens(kv_indptr, 4, kv_last_page_len=np.array([0, 0, 4], np.int32))
    for both in ({}, {"kv_lens": lens, "kv_last_page_len": lens}):
        with pytest.raises(ValueError, match=r"exactly one of kv_lens or kv_last_page_len"):
            ref.paged_kv_lens(kv_indptr, 4, **both)


def test_causal_with_custom_mask_is_rejected():
    rng = np.random.default_rng(12)
    qs, ks, vs, masks = random_requests(rng, [(3, 5)], 2, 2)
    match = r"custom_mask and causal=True are mutually exclusive.*encode causality"
    with pytest.raises(ValueError, match=match):
        ref.single_prefill(qs[0], ks[0], vs[0], causal=True, custom_mask=masks[0])
    with pytest.raises(ValueError, match=match):
        ref.ragged_prefill(qs[0], ks[0], vs[0], indptr([3]), indptr([5]), causal=True,
                           custom_mask=masks[0].reshape(-1))
    k_pool, kv_indptr, kv_indices, last = build_paged(rng, ks, 4, "NHD")
    packed, mask_indptr = cmask.pack(masks)
    with pytest.raises(ValueError, match=match):
        ref.paged_prefill(qs[0], k_pool, k_pool, indptr([3]), kv_indptr, kv_indices,
                          kv_last_page_len=last, causal=True, packed_custom_mask=packed,
                          mask_indptr=mask_indptr)


def test_validation_errors_name_argument_expected_and_actual():
    rng = np.random.default_rng(13)
    q, k = rng.standard_normal((3, 4, 8)), rng.standard_normal((5, 2, 8))
    cases = [
        (lambda: ref.attend(q, k[..., :6], k[..., :6]),
         r"q and k must have the same head_dim; got q.shape\[-1\]=8, k.shape\[-1\]=6"),
        (lambda: ref.attend(q[:, :3], k, k),
         r"num_qo_heads must be a multiple of num_kv_heads; got num_qo_heads=3, num_kv_heads=2"),
        (lambda: ref.single_prefill(q, k, k, custom_mask=np.ones((3, 4), bool)),
         r"custom_mask must have shape \[qo_len, kv_len\] = \[3, 5\]"),
        (lambda: ref.ragged_prefill(q, k, k, indptr([3]), np.array([0, 8, 5], np.int32)),
         r"kv_indptr must be non-decreasing; kv_indptr\[1\]=8 > kv_indptr\[2\]=5"),
        (lambda: ref.ragged_prefill(q, k, k, indptr([3]), indptr([4])),
         r"kv_indptr\[-1\] must equal k.shape\[0\]; got kv_indptr\[-1\]=4, k.shape\[0\]=5"),
        (lambda: ref.ragged_prefill(q, k, k, indptr([3]), indptr([5]),
                                    custom_mask=np.ones(14, bool)),
         r"flat_mask must have sum\(qo_len \* kv_len\) = 15 elements; got 14"),
        (lambda: ref.attend(q.astype(np.int32), k, k), r"q must be float16, bfloat16, float32"),
        (lambda: ref.single_prefill(q, k, k, kv_layout="NDH"), r"kv_layout must be one of"),
        (lambda: ref.attend(q, k, k, window_left=-2), r"window_left must be an integer >= -1"),
        (lambda: ref.paged_decode(q, k[None], k[None],
                                  indptr([1]), np.array([0], np.int32), kv_lens=[5]),
         r"q.shape\[0\] must describe batch=1 requests; got 3"),
        (lambda: ref.paged_decode(q[:1], k[None], k[None], indptr([1]),
                                  np.array([3], np.int32), kv_lens=np.array([5])),
         r"kv_indices\[0\]=3 is out of range \[0, num_pages=1\)"),
        (lambda: ref.mla(q, q, k[:, 0], k[:, 0], indptr([3]), indptr([1]),
                         np.array([0], np.int32), kv_lens=np.array([5]), sm_scale=None),
         r"sm_scale is required for mla"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
