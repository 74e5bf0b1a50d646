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


@pytest.mark.parametrize("gqa", (1, 4))
def test_split_kv_prefill(gqa):
    """Few query tiles over long keys (one chunked-prefill request, a shared prefix read by all
    queries): the keys are split into chunks and merged per query, causal and not."""
    import cupy
    rng = np.random.default_rng(gqa)
    hq = 2 * gqa
    for qo_lens, kv_lens, causal in (([64], [20000], True), ([1, 200], [9000, 5000], False),
                                     ([577], [577], True)):
        k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, kv_lens, 16, 2, 128, A.FLOAT16,
                                                           "NHD")
        qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
        q = rng.standard_normal((qo_indptr[-1], hq, 128)).astype(A.FLOAT16)
        ref_o, ref_lse = reference.paged_prefill(q, k, v, qo_indptr, kv_indptr, kv_indices,
                                                 kv_lens=kv_lens, causal=causal)
        wrapper = cpattn.BatchPrefillPaged()
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, None, hq, 2, 128, 16, kv_lens=kv_lens,
                     causal=causal)
        out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)),
                               return_lse=True)
        if qo_lens == [64]:
            assert wrapper._plan["launch"].merge is not None  # the split path ran
        assert_close(cupy.asnumpy(out), ref_o, A.FLOAT16, "out")
        assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


def test_cuda_graph_replay_after_replan():
    """Capture run() once; re-plan other batches (qo_len 1 to 577, kv < qo, empty requests) and
    replay: the fixed outputs equal the reference each time."""
    import cupy
    rng = np.random.default_rng(7)
    dtype, hq, hkv, d, ps = A.BFLOAT16, 8, 2, 128, 5
    num_pages = 3000
    k = rng.standard_normal((num_pages, ps, hkv, d)).astype(dtype)
    v = rng.standard_normal((num_pages, ps, hkv, d)).astype(dtype)
    dk, dv = cupy.asarray(k), cupy.asarray(v)
    max_q = 1200
    q = rng.standard_normal((max_q, hq, d)).astype(dtype)
    dq = cupy.asarray(q)
    wrapper = cpattn.BatchPrefillPaged(use_cuda_graph=True, max_batch_size=8,
                                       max_num_pages=num_pages, max_total_q=max_q)
    stream = cupy.cuda.Stream(non_blocking=True)

    def plan(qo_lens, kv_lens):
        pages = [-(-n // ps) for n in kv_lens]
        kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        kv_indices = rng.permutation(num_pages)[:kv_indptr[-1]].astype(np.int32)
        qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
        kv_lens = np.asarray(kv_lens, np.int32)
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, None, hq, hkv, d, ps, kv_lens=kv_lens,
                     causal=True, dtype=dtype, stream=stream)
        return qo_indptr, kv_indptr, kv_indices, kv_lens

    plan([17, 1], [100, 1])
    args = (dq[:18], (dk, dv))
    with stream:
        wrapper.run(*args)  # warm-up: compile, allocate
        stream.begin_capture()
        wrapper.run(*args)
        graph = stream.end_capture()
    for qo_lens, kv_lens in (([17, 1], [100, 1]), ([577, 1, 0, 127], [2000, 9000, 50, 100]),
                             ([1], [12000]), ([300, 300], [200, 400])):
        qo_indptr, kv_indptr, kv_indices, kv_lens = plan(qo_lens, kv_lens)
        graph.launch(stream)
        stream.synchronize()
        total = int(qo_indptr[-1])
        ref_o, ref_lse = reference.paged_prefill(q[:total], k, v, qo_indptr, kv_indptr,
                                                 kv_indices, kv_lens=kv_lens, causal=True)
        out, lse = wrapper.fixed_outputs
        assert_close(cupy.asnumpy(out[:total]), ref_o, dtype, "out")
        assert_close(cupy.asnumpy(lse[:total]), ref_lse, A.FLOAT32, "lse")
        assert np.isneginf(cupy.asnumpy(lse[total:])).all()
