"""BatchPrefillPaged against reference.paged_prefill: chunked prefill over paged KV with causal,
window, soft cap and custom masks, GQA, page sizes, kv_len >= and < qo_len, empty requests, and
NaN/Inf in every slot a request does not own."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import mask as cmask
from cpattn import reference

from gpu_utils import assert_close, poison_pool
from test_decode_gpu import paged_batch

pytestmark = pytest.mark.gpu

DTYPES = (A.FLOAT16, A.BFLOAT16)
PAGE_SIZES = (1, 5, 16)
GQA = (1, 4, 8)
MODES = ("causal", "window", "soft_cap", "custom_mask")
NUM_KV_HEADS = 2
QO_LENS = (1, 17, 127, 577, 0, 40)
KV_LENS = (33, 17, 300, 577, 9, 20)   # kv_len >= qo_len, equal, and one request with kv < qo


def _options(mode, rng):
    if mode == "causal":
        return dict(causal=True)
    if mode == "window":
        return dict(causal=True, window_left=31)
    if mode == "soft_cap":
        return dict(causal=True, logits_soft_cap=8.0)
    masks = [rng.random((q, k)) < 0.6 for q, k in zip(QO_LENS, KV_LENS)]
    return dict(custom_mask=cmask.flatten(masks)[0])


# Every mode x dtype x head_dim, with page size and GQA ratio rotating through their values;
# and every page size x GQA ratio at head_dim 128 with a causal mask.
CASES = [(dtype, head_dim, PAGE_SIZES[(i + m) % 3], GQA[(i + 2 * m) % 3], mode)
         for i, (dtype, head_dim) in enumerate((d, h) for d in DTYPES for h in (64, 128, 256))
         for m, mode in enumerate(MODES)]
CASES += [(A.FLOAT16, 128, ps, gqa, "causal") for ps in PAGE_SIZES for gqa in GQA]


@pytest.mark.parametrize("dtype, head_dim, page_size, gqa, mode", CASES)
def test_batch_prefill_paged_matches_reference(dtype, head_dim, page_size, gqa, mode):
    import cupy
    rng = np.random.default_rng([head_dim, page_size, gqa, MODES.index(mode)])
    hq = NUM_KV_HEADS * gqa
    layout = "NHD" if page_size != 5 else "HND"
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, KV_LENS, page_size, NUM_KV_HEADS,
                                                       head_dim, dtype, layout)
    qo_indptr = np.concatenate([[0], np.cumsum(QO_LENS)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], hq, head_dim)).astype(dtype)
    opts = _options(mode, rng)
    ref_o, ref_lse = reference.paged_prefill(q, k, v, qo_indptr, kv_indptr, kv_indices,
                                             kv_lens=kv_lens, kv_layout=layout, **opts)
    wrapper = cpattn.BatchPrefillPaged()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, None, hq, NUM_KV_HEADS, head_dim, page_size,
                 kv_lens=kv_lens, dtype=dtype, kv_layout=layout, **opts)
    poison_pool(q.nbytes, qo_indptr[-1] * hq * 4)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


def test_paged_prefill_with_paged_kv_cache_and_layers():
    """The serving pattern: PagedKVCache.append the new tokens, plan once, run two layers."""
    import cupy
    rng = np.random.default_rng(1)
    caches = [cpattn.PagedKVCache(64, 16, 2, 128, "float16") for _ in range(2)]
    seqs, prompt = ["a", "b", "c"], [40, 1, 100]
    for cache in caches:
        for s in seqs:
            cache.add_sequence(s)
        k_new = cupy.asarray(rng.standard_normal((sum(prompt), 2, 128)).astype(np.float16))
        v_new = cupy.asarray(rng.standard_normal((sum(prompt), 2, 128)).astype(np.float16))
        cache.append(seqs, k_new, v_new, cpattn.planner.cu_seqlens(prompt))
    kv_indptr, kv_indices, last, _ = caches[0].page_table(seqs)
    qo_indptr = cpattn.planner.cu_seqlens(prompt)
    wrapper = cpattn.BatchPrefillPaged()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, 8, 2, 128, 16, causal=True)
    for cache in caches:
        q = rng.standard_normal((qo_indptr[-1], 8, 128)).astype(np.float16)
        out = wrapper.run(cupy.asarray(q), cache)
        ref, _ = reference.paged_prefill(q, cupy.asnumpy(cache.k_pages), cupy.asnumpy(cache.v_pages),
                                         qo_indptr, kv_indptr, kv_indices, kv_last_page_len=last,
                                         causal=True)
        assert_close(cupy.asnumpy(out), ref, np.float16, "layer")
