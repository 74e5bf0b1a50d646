"""BatchMLA against reference.mla: heads x page sizes x kv_len x qo_len x dtypes, shuffled page
tables, NaN/Inf in every slot and page a request does not own, split and unsplit plans, causal,
pools as views of one [..., 576] array, MLAPagedCache.append, CUDA-graph capture -> re-plan ->
replay."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import reference

from gpu_utils import assert_close, poison_pool

pytestmark = pytest.mark.gpu

DTYPES = (A.FLOAT16, A.BFLOAT16)
HEADS = (16, 32, 64, 128)
PAGE_SIZES = (1, 16, 32, 64)
KV_LENS = (0, 1, 13, 63, 64, 65, 4097)
QO_LENS = (1, 2, 4)
CKV, KPE = 512, 64
SM_SCALE = 1 / np.sqrt(128 + 64)


def latent_batch(rng, kv_lens, page_size, dtype, spare_pages=5, poison=True):
    """ckv / kpe pools with a shuffled page table; every slot no request owns (the tails of
    last pages, pages nobody references) holds NaN or Inf."""
    pages = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages) + spare_pages
    kv_indices = rng.permutation(num_pages)[:sum(pages)].astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    ckv = np.full((num_pages, page_size, CKV), np.nan if poison else 0, dtype)
    kpe = np.full((num_pages, page_size, KPE), np.inf if poison else 0, dtype)
    if poison:
        ckv[::2, :, ::3] = np.inf
        kpe[1::2, :, ::5] = np.nan
    for b, n in enumerate(kv_lens):
        for t in range(0, n, page_size):
            page, count = kv_indices[kv_indptr[b] + t // page_size], min(page_size, n - t)
            ckv[page, :count] = rng.standard_normal((count, CKV)).astype(dtype)
            kpe[page, :count] = rng.standard_normal((count, KPE)).astype(dtype)
    return ckv, kpe, kv_indptr, kv_indices, np.asarray(kv_lens, np.int32)


def queries(rng, total_q, heads, dtype):
    return (rng.standard_normal((total_q, heads, CKV)).astype(dtype),
            rng.standard_normal((total_q, heads, KPE)).astype(dtype))


def run_and_check(rng, heads, page_size, kv_lens, qo_lens, dtype, causal=False, wrapper=None):
    import cupy
    ckv, kpe, kv_indptr, kv_indices, kv_lens = latent_batch(rng, kv_lens, page_size, dtype)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q_nope, q_pe = queries(rng, int(qo_indptr[-1]), heads, dtype)
    ref_o, ref_lse = reference.mla(q_nope, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices,
                                   kv_lens=kv_lens, sm_scale=SM_SCALE, causal=causal)
    wrapper = wrapper or cpattn.BatchMLA()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, heads, CKV, KPE, page_size,
                 causal=causal, sm_scale=SM_SCALE, dtype=dtype)
    out = cupy.full((int(qo_indptr[-1]), heads, CKV), np.nan, dtype)  # poisoned output
    poison_pool(int(qo_indptr[-1]) * heads * 4)
    out, lse = wrapper.run(cupy.asarray(q_nope), cupy.asarray(q_pe), cupy.asarray(ckv),
                           cupy.asarray(kpe), out=out, return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")
    return wrapper


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("qo_len", QO_LENS)
def test_mla_matches_reference(dtype, heads, page_size, qo_len):
    """One batch holds every kv_len of the grid (0 gives 0 and -inf), each with qo_len queries,
    causal for multi-token queries."""
    rng = np.random.default_rng([heads, page_size, qo_len, np.dtype(dtype).num])
    run_and_check(rng, heads, page_size, KV_LENS, [qo_len] * len(KV_LENS), dtype,
                  causal=qo_len > 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_partly_filled_last_page_never_breaks(dtype):
    """page_size 4, kv_len 13: the last page holds 1 token and 3 slots of NaN / Inf."""
    rng = np.random.default_rng(13)
    for heads in (16, 128):
        for causal in (False, True):
            run_and_check(rng, heads, 4, [13], [1], dtype, causal=causal)
            run_and_check(rng, heads, 4, [13, 13], [3, 1], dtype, causal=causal)


@pytest.mark.parametrize("heads", (16, 128))
@pytest.mark.parametrize("batch", (1, 2, 200))
def test_split_and_unsplit_plans(heads, batch):
    """Small batches of long requests are split over the keys and merged; big ones are not."""
    rng = np.random.default_rng([heads, batch])
    kv_lens = rng.integers(0, 9000 if batch < 100 else 300, batch)
    wrapper = run_and_check(rng, heads, 16, kv_lens, [1] * batch, A.BFLOAT16)
    if batch == 1:
        assert wrapper._plan["split"]


@pytest.mark.parametrize("mode", ("last chunk", "slices", None))
def test_split_merged_in_the_kernel_or_by_merge_state(mode, monkeypatch):
    """How a split query tile is merged on the mma.sync tiles: by the CTA of its last chunk
    ("last chunk", here at any chunk count), by every chunk a slice ("slices", a cooperative
    launch: here from 2 chunks on) or by merge_state (None; the wgmma tiles always). 16 heads of
    one query, 4 heads of 4 causal queries a CTA, 80 heads (five 16-row head blocks), 64 heads
    (two 32-row head blocks on the sm80 path; the wgmma tiles on Hopper), one request of 40000
    keys (a chunk an SM) beside empty and short ones; lse asked for or not; the same plan run
    three times into poisoned outputs, its counters back at 0."""
    import cupy
    from cpattn import _tiles, mla
    monkeypatch.setattr(_tiles, "MLA_FUSED_MOST_CHUNKS", 1000 if mode == "last chunk" else 0)
    if mode is None:
        monkeypatch.setattr(mla, "fused_merge", lambda *args: None)
    rng = np.random.default_rng(len(mode or ""))
    expected = lambda plan: mode if plan["maps"] is None else None  # the mma.sync tiles
    for heads, kv_lens, qo_lens, causal in ((16, [1500, 0, 700, 13], [1, 1, 1, 1], False),
                                            (4, [1500, 600, 4], [4, 3, 2], True),
                                            (80, [500, 300], [1, 1], False),
                                            (64, [900, 5], [1, 1], False),
                                            (16, [40000, 0, 77], [1, 1, 1], False)):
        wrapper = run_and_check(rng, heads, 16, kv_lens, qo_lens, A.BFLOAT16, causal=causal)
        plan = wrapper._plan
        assert plan["split"] and plan["fused"] == expected(plan)
        assert plan["launch"].cooperative == (plan["fused"] == "slices")
    ckv, kpe, kv_indptr, kv_indices, kv_lens = latent_batch(rng, [9000, 33], 32, A.FLOAT16)
    q_nope, q_pe = queries(rng, 2, 16, A.FLOAT16)
    ref_o, _ = reference.mla(q_nope, q_pe, ckv, kpe, np.arange(3, dtype=np.int32), kv_indptr,
                             kv_indices, kv_lens=kv_lens, sm_scale=SM_SCALE)
    wrapper = cpattn.BatchMLA()
    wrapper.plan(np.arange(3, dtype=np.int32), kv_indptr, kv_indices, kv_lens, 16, CKV, KPE, 32,
                 sm_scale=SM_SCALE, dtype=A.FLOAT16)
    assert wrapper._plan["fused"] == mode
    args = [cupy.asarray(x) for x in (q_nope, q_pe, ckv, kpe)]
    for _ in range(3):
        out = cupy.full((2, 16, CKV), np.nan, A.FLOAT16)
        assert_close(cupy.asnumpy(wrapper.run(*args, out=out)), ref_o, A.FLOAT16, "out")
    if mode is not None:
        assert not wrapper._split.counters(1).get().any()


def test_slices_fall_back_to_the_last_chunk_where_ctas_cannot_all_be_resident(monkeypatch):
    """A plan made for more SMs than the GPU has (as under MPS): its cooperative launch is
    refused before it starts, and the run merges by the last chunk of each tile instead."""
    from cpattn import _core
    sms = _core.num_sms()
    monkeypatch.setattr(_core, "num_sms", lambda: 4 * sms)
    rng = np.random.default_rng(4)
    wrapper = run_and_check(rng, 16, 64, [80000, 5], [1, 1], A.BFLOAT16)
    plan = wrapper._plan
    assert plan["split"] and plan["fused"] == "last chunk" and not plan["launch"].cooperative
    assert plan["launch"].grid[0] > 2 * sms
    assert not wrapper._split.counters(1).get().any()


@pytest.mark.parametrize("heads, qo, page_size, dtype", [(16, 1, 16, A.BFLOAT16),
                                                         (8, 2, 5, A.FLOAT16)])
def test_large_batches_take_two_ctas_an_sm(heads, qo, page_size, dtype):
    """A batch of two 16-row tiles for every SM (one wave of pairs) runs _tiles.MLA_MANY (4 warps,
    32-key tiles, two CTAs an SM), unsplit: short and long requests, zero-length ones, causal
    query pairs."""
    from cpattn import _core, _tiles
    rng = np.random.default_rng([heads, qo, page_size])
    batch = 2 * _core.num_sms()
    kv_lens = rng.integers(0, 200, batch)
    kv_lens[::50], kv_lens[3], kv_lens[4] = 0, 1000, 33
    wrapper = run_and_check(rng, heads, page_size, kv_lens, [qo] * batch, dtype, causal=qo > 1)
    assert wrapper._plan["tile"] == _tiles.MLA_MANY.tile and not wrapper._plan["split"]


def test_non_causal_multi_token_and_long_queries():
    """Queries longer than a tile of rows (prefill with absorbed weights), causal and not,
    kv_len shorter than qo_len included."""
    rng = np.random.default_rng(5)
    for causal in (False, True):
        run_and_check(rng, 16, 16, [300, 40, 0, 7], [37, 50, 3, 7], A.FLOAT16, causal=causal)
        run_and_check(rng, 128, 32, [129, 5], [9, 2], A.BFLOAT16, causal=causal)


def test_other_head_counts():
    """8 heads (two queries share a 16-row CTA), 4 heads of 4 queries, and 48 (three 16-head
    blocks; one 64-row block of the wgmma kernel on Hopper)."""
    rng = np.random.default_rng(48)
    run_and_check(rng, 8, 16, [100, 1], [1, 1], A.FLOAT16)
    run_and_check(rng, 48, 16, [100, 1], [2, 1], A.FLOAT16, causal=True)
    # 16 rows of several queries each (causal inside a CTA's rows): pages of 5 (cp.async) and
    # 64 (TMA on Hopper)
    run_and_check(rng, 8, 5, [70, 2, 0], [2, 2, 1], A.BFLOAT16, causal=True)
    run_and_check(rng, 4, 64, [300, 129], [4, 3], A.FLOAT16, causal=True)


def test_views_of_one_576_array_and_cache_append():
    """MLAPagedCache over one [num_pages, page_size, 576] array, filled by append (GPU), equals
    the same cache built on the CPU."""
    import cupy
    rng = np.random.default_rng(576)
    dtype = A.BFLOAT16
    kv = cupy.full((40, 16, CKV + KPE), np.nan, dtype)
    cache = cpattn.MLAPagedCache(40, 16, dtype=dtype, kv_cache=kv)
    host = cpattn.MLAPagedCache(40, 16, dtype=dtype, device="cpu")
    lens = [100, 1, 33]
    for c in (cache, host):
        for s in range(3):
            c.add_sequence(s)
    ckv_new = rng.standard_normal((sum(lens), CKV)).astype(dtype)
    kpe_new = rng.standard_normal((sum(lens), KPE)).astype(dtype)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    cache.append([0, 1, 2], cupy.asarray(ckv_new), cupy.asarray(kpe_new), indptr)
    host.append([0, 1, 2], ckv_new, kpe_new, indptr)
    step = rng.standard_normal((3, CKV)).astype(dtype), rng.standard_normal((3, KPE)).astype(dtype)
    cache.append([0, 1, 2], *map(cupy.asarray, step))
    host.append([0, 1, 2], *step)
    kv_indptr, kv_indices, _, kv_lens = cache.page_table([0, 1, 2])
    q_nope, q_pe = queries(rng, 3, 64, dtype)
    ref_o, ref_lse = reference.mla(q_nope, q_pe, host.ckv_cache, host.kpe_cache,
                                   np.arange(4, dtype=np.int32), kv_indptr, kv_indices,
                                   kv_lens=kv_lens, sm_scale=SM_SCALE)
    wrapper = cpattn.BatchMLA()
    wrapper.plan(np.arange(4, dtype=np.int32), kv_indptr, kv_indices, kv_lens, 64, CKV, KPE, 16,
                 sm_scale=SM_SCALE, dtype=dtype)
    out, lse = wrapper.run(cupy.asarray(q_nope), cupy.asarray(q_pe), cache, return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("heads", (16, 128))
def test_cuda_graph_replay_after_replan(heads):
    import cupy
    rng = np.random.default_rng(heads)
    dtype = A.BFLOAT16
    page_size, num_pages = 16, 800
    ckv = rng.standard_normal((num_pages, page_size, CKV)).astype(dtype)
    kpe = rng.standard_normal((num_pages, page_size, KPE)).astype(dtype)
    d_ckv, d_kpe = cupy.asarray(ckv), cupy.asarray(kpe)
    max_batch = 8
    q_nope, q_pe = queries(rng, max_batch * 2, heads, dtype)
    d_q_nope, d_q_pe = cupy.asarray(q_nope), cupy.asarray(q_pe)
    wrapper = cpattn.BatchMLA(use_cuda_graph=True, max_batch_size=max_batch,
                              max_num_pages=num_pages, max_total_q=2 * max_batch)
    stream = cupy.cuda.Stream(non_blocking=True)

    def plan(kv_lens, qo_len):
        pages = [-(-n // page_size) for n in kv_lens]
        kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        kv_indices = rng.permutation(num_pages)[:kv_indptr[-1]].astype(np.int32)
        qo_indptr = (np.arange(len(kv_lens) + 1) * qo_len).astype(np.int32)
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, np.asarray(kv_lens, np.int32), heads,
                     CKV, KPE, page_size, causal=True, sm_scale=SM_SCALE, dtype=dtype,
                     stream=stream)
        return qo_indptr, kv_indptr, kv_indices

    def expected(qo_indptr, kv_indptr, kv_indices, kv_lens):
        total = int(qo_indptr[-1])
        return reference.mla(q_nope[:total], q_pe[:total], ckv, kpe, qo_indptr, kv_indptr,
                             kv_indices, kv_lens=np.asarray(kv_lens, np.int32),
                             sm_scale=SM_SCALE, causal=True)

    first = [3000, 17, 0, 900]
    plan(first, 2)  # the longest query length first: it fixes the tiles
    # The graph holds q's address: later plans read their rows from the same buffer.
    args = (d_q_nope[:8], d_q_pe[:8], d_ckv, d_kpe)
    with stream:
        wrapper.run(*args)  # warm-up: compile and allocate
        stream.begin_capture()
        wrapper.run(*args)
        graph = stream.end_capture()
    for kv_lens, qo_len in ((first, 2), ([5000, 1, 1, 77, 4000, 0, 12, 800], 1), ([64], 2)):
        tables = plan(kv_lens, qo_len)
        graph.launch(stream)
        stream.synchronize()
        out, lse = wrapper.fixed_outputs
        total = int(tables[0][-1])
        ref_o, ref_lse = expected(*tables, kv_lens)
        assert_close(cupy.asnumpy(out[:total]), ref_o, dtype, "out")
        assert_close(cupy.asnumpy(lse[:total]), ref_lse, A.FLOAT32, "lse")
        assert np.isneginf(cupy.asnumpy(lse[total:])).all()
