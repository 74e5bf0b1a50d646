"""BatchDecode against reference.paged_decode: page sizes, GQA, layouts, split and unsplit plans,
NaN/Inf in every slot a request does not own, and CUDA-graph capture -> re-plan -> replay."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import reference

from gpu_utils import assert_close, poison_pool

pytestmark = pytest.mark.gpu

DTYPES = (A.FLOAT16, A.BFLOAT16)
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (1, 5, 16, 64)
GQA = (1, 4, 8)
LAYOUTS = ("NHD", "HND")
NUM_KV_HEADS = 2


def kv_lens_for(page_size):
    return [0, 1, max(page_size - 1, 1), page_size, page_size + 1, 97, 2049, 33000]


def paged_batch(rng, kv_lens, page_size, hkv, head_dim, dtype, layout, spare_pages=7):
    """Pools with a shuffled page table; every slot no request owns holds NaN or Inf."""
    pages = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages) + spare_pages
    kv_indices = rng.permutation(num_pages)[:sum(pages)].astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    shape = ((num_pages, page_size, hkv, head_dim) if layout == "NHD"
             else (num_pages, hkv, page_size, head_dim))
    k = np.full(shape, np.nan, dtype)
    v = np.full(shape, np.inf, dtype)
    for b, n in enumerate(kv_lens):
        for t in range(0, n, page_size):
            page, count = kv_indices[kv_indptr[b] + t // page_size], min(page_size, n - t)
            for pool in (k, v):
                fresh = rng.standard_normal((count, hkv, head_dim)).astype(dtype)
                if layout == "NHD":
                    pool[page, :count] = fresh
                else:
                    pool[page, :, :count] = fresh.transpose(1, 0, 2)
    return k, v, kv_indptr, kv_indices, np.asarray(kv_lens, np.int32)


def _check(out, lse, ref_o, ref_lse, dtype):
    import cupy
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_decode_matches_reference(dtype, head_dim, page_size, gqa, layout):
    import cupy
    rng = np.random.default_rng([head_dim, page_size, gqa, len(layout)])
    hq = NUM_KV_HEADS * gqa
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, kv_lens_for(page_size), page_size,
                                                       NUM_KV_HEADS, head_dim, dtype, layout)
    q = rng.standard_normal((len(kv_lens), hq, head_dim)).astype(dtype)
    ref_o, ref_lse = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=kv_lens,
                                            kv_layout=layout)
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, None, hq, NUM_KV_HEADS, head_dim, page_size,
                 kv_lens=kv_lens, dtype=dtype, kv_layout=layout)
    poison_pool(q.nbytes, q.shape[0] * hq * 4)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    _check(out, lse, ref_o, ref_lse, dtype)


@pytest.mark.parametrize("batch", (1, 3, 300))
def test_split_and_unsplit_plans(batch):
    """Small batches (1 and 3 requests x 8 KV heads cannot fill the GPU) split their keys; 300
    requests do not; all equal the reference."""
    import cupy
    rng = np.random.default_rng(batch)
    lens = rng.integers(0, 3000, batch).tolist() if batch > 1 else [20000]
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, lens, 16, 8, 128, np.float16, "NHD")
    q = rng.standard_normal((batch, 32, 128)).astype(np.float16)
    last = reference.paged_kv_lens(kv_indptr, 16, kv_lens=kv_lens)
    last_page_len = np.where(last > 0, (last - 1) % 16 + 1, 0).astype(np.int32)
    ref_o, ref_lse = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=kv_lens)
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, last_page_len, 32, 8, 128, 16)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    assert wrapper._plan["split"] == (batch < 100)
    _check(out, lse, ref_o, ref_lse, np.float16)


@pytest.mark.parametrize("num_kv_heads, length", ((8, 20000), (1, 200000)))
def test_split_merge_runs_again_and_again(num_kv_heads, length):
    """Split plans: on Hopper the kernel merges each request's states itself (a counter per
    request and head block, reset by the run) up to 32 chunks a request, merge_state beyond (one
    KV head: one request is cut into far more chunks). Every run equals the reference."""
    import cupy
    from cpattn import _core
    rng = np.random.default_rng(num_kv_heads)
    lens = [length, 0, 70, 3000]
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, lens, 16, num_kv_heads, 128,
                                                       np.float16, "NHD")
    hq = 4 * num_kv_heads
    q = rng.standard_normal((len(lens), hq, 128)).astype(np.float16)
    ref_o, ref_lse = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=kv_lens)
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, None, hq, num_kv_heads, 128, 16, kv_lens=kv_lens)
    plan = wrapper._plan
    assert plan["split"]
    assert plan["fused"] == (_core.hopper_path() and num_kv_heads == 8)
    assert (plan["merge"] is None) == plan["fused"]
    q_dev, kv = cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v))
    for _ in range(3):
        out, lse = wrapper.run(q_dev, kv, return_lse=True)
        _check(out, lse, ref_o, ref_lse, np.float16)
    out = wrapper.run(q_dev, kv)  # no lse asked for
    _check(out, lse, ref_o, ref_lse, np.float16)


def test_window_and_soft_cap():
    import cupy
    rng = np.random.default_rng(2)
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, [5, 300, 4000], 16, 2, 128,
                                                       A.BFLOAT16, "NHD")
    q = rng.standard_normal((3, 8, 128)).astype(A.BFLOAT16)
    opts = dict(window_left=100, logits_soft_cap=20.0, sm_scale=0.2)
    ref_o, ref_lse = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=kv_lens, **opts)
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, None, 8, 2, 128, 16, kv_lens=kv_lens, dtype="bfloat16", **opts)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    _check(out, lse, ref_o, ref_lse, A.BFLOAT16)


def test_cuda_graph_capture_replan_replay():
    import cupy
    rng = np.random.default_rng(4)
    max_batch, max_pages, page_size = 8, 4096, 16
    pool_pages = 5000
    shape = (pool_pages, page_size, 2, 128)
    k = cupy.asarray(rng.standard_normal(shape).astype(np.float16))
    v = cupy.asarray(rng.standard_normal(shape).astype(np.float16))
    q = cupy.asarray(rng.standard_normal((max_batch, 8, 128)).astype(np.float16))
    wrapper = cpattn.BatchDecode(use_cuda_graph=True, max_batch_size=max_batch,
                                 max_num_pages=max_pages)

    stream = cupy.cuda.Stream(non_blocking=True)

    def plan(lens):  # on the replay stream: the plan's upload is ordered before the replay
        pages = [-(-n // page_size) for n in lens]
        kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        kv_indices = rng.permutation(pool_pages)[:kv_indptr[-1]].astype(np.int32)
        kv_lens = np.asarray(lens, np.int32)
        wrapper.plan(kv_indptr, kv_indices, None, 8, 2, 128, page_size, kv_lens=kv_lens,
                     stream=stream)
        return kv_indptr, kv_indices, kv_lens

    plan([100] * max_batch)
    with stream:
        stream.begin_capture()
        wrapper.run(q, (k, v), stream=stream)
        graph = stream.end_capture()
    for lens in ([1, 2000, 17, 0, 5000, 33, 64, 65], [30000, 1, 2, 3, 4, 5, 6, 7]):
        kv_indptr, kv_indices, kv_lens = plan(lens)
        with stream:
            graph.launch(stream)
        stream.synchronize()
        out = wrapper.fixed_outputs[0][:max_batch]
        ref_o, _ = reference.paged_decode(cupy.asnumpy(q), cupy.asnumpy(k), cupy.asnumpy(v),
                                          kv_indptr, kv_indices, kv_lens=kv_lens)
        assert_close(cupy.asnumpy(out), ref_o, np.float16, f"replay {lens}")
