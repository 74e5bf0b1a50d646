"""Programmatic dependent launch (compute capability 9.0 on): runs queued back to back, with no
sync between them, each reading the output of the run before it (read after write) or
overwriting that run's input (write after read), for decode, MLA (both tile kinds) and ragged
prefill, split (merged in the attention kernel or by merge_state's) and unsplit plans; every
run checked against the reference on the inputs it was given. CPATTN_PDL=0 launches the plain
way. The split / fused expectations assume a GPU of about 132 SMs (H100 / H200)."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import reference

from gpu_utils import assert_close
from test_decode_gpu import paged_batch
from test_mla_gpu import CKV, SM_SCALE, latent_batch, queries

pytestmark = pytest.mark.gpu

STEPS = 4


@pytest.fixture(params=["1", "0"], ids=["pdl", "plain"])
def pdl(request, monkeypatch):
    monkeypatch.setenv("CPATTN_PDL", request.param)
    return request.param == "1"


def _expect_launch(launch, pdl):
    import cupy
    assert launch.dependent == (pdl and int(cupy.cuda.Device().compute_capability) >= 90)


def _chains(run, q0, out_shape):
    """Read after write: run i reads buffer i and writes buffer i + 1. Write after read: pairs
    of runs, the second overwriting the first one's input with its own output. Returns
    (input, output) host pairs of every run, read back after the last one."""
    import cupy
    bufs = [cupy.asarray(q0)] + [cupy.full(out_shape, np.nan, q0.dtype) for _ in range(STEPS)]
    for i in range(STEPS):
        run(bufs[i], bufs[i + 1])
    pairs = []
    for i in range(STEPS):  # inputs survive: each run writes a buffer no later run reads first
        pairs.append((bufs[i], bufs[i + 1]))
    swaps = []
    for i in range(STEPS // 2):
        x, w = cupy.array(bufs[i + 1]), cupy.array(bufs[i + 2])
        y = cupy.full(out_shape, np.nan, q0.dtype)
        x_before = x.get()
        run(x, y)  # reads x
        run(w, x)  # overwrites x: must wait for the run before it to finish reading
        swaps.append((x_before, y, w, x))
    cupy.cuda.get_current_stream().synchronize()
    host = [(a.get(), b.get()) for a, b in pairs]
    for x_before, y, w, x in swaps:
        host += [(x_before, y.get()), (w.get(), x.get())]
    return host


# (kv_lens, split, merged in the attention kernel): 2 KV heads on ~132 SMs.
@pytest.mark.parametrize("kv_lens, split, fused", [([4000], True, True), ([300] * 140, False, False),
                                                   ([900, 0, 33, 2500], True, True),
                                                   ([40000], True, False)],
                         ids=["split", "unsplit", "mixed", "merge-kernel"])
def test_decode_runs_back_to_back(pdl, kv_lens, split, fused):
    dtype, hq, hkv, d, ps = A.FLOAT16, 8, 2, 128, 16
    rng = np.random.default_rng(len(kv_lens))
    k, v, kv_indptr, kv_indices, lens = paged_batch(rng, kv_lens, ps, hkv, d, dtype, "NHD")
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, None, hq, hkv, d, ps, kv_lens=lens, dtype=dtype)
    _expect_launch(wrapper._plan["launch"].launch, pdl)
    # Only the Hopper decode kernel merges a split request's states itself.
    from cpattn import _core
    assert (wrapper._plan["split"], wrapper._plan["fused"]) == (split, fused and _core.hopper_path())
    import cupy
    kd, vd = cupy.asarray(k), cupy.asarray(v)
    q0 = rng.standard_normal((len(kv_lens), hq, d)).astype(dtype)
    run = lambda q, out: wrapper.run(q, (kd, vd), out=out)
    for q, out in _chains(run, q0, q0.shape):
        ref, _ = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=lens)
        assert_close(out, ref, dtype, "out")


# (heads, kv_lens, split, how the attention kernel merges): 16 heads on the 16-row mma.sync
# tiles (every chunk a slice, in a cooperative launch, or the last chunk), 32 on Hopper's wgmma
# tiles (merge_state; the 32-row mma.sync tiles elsewhere).
@pytest.mark.parametrize("heads, kv_lens, split, fused", [
    (16, [20000], True, "slices"), (16, [40] * 150, False, None),
    (16, [5000, 0, 64, 9000], True, "slices"), (16, [3000] * 64, True, "last chunk"),
    (32, [3000, 0, 700], True, None)], ids=["split", "unsplit", "mixed", "fused", "heads32"])
def test_mla_runs_back_to_back(pdl, heads, kv_lens, split, fused):
    dtype, ps = A.BFLOAT16, 64
    rng = np.random.default_rng(len(kv_lens))
    ckv, kpe, kv_indptr, kv_indices, lens = latent_batch(rng, kv_lens, ps, dtype)
    batch = len(kv_lens)
    qo_indptr = np.arange(batch + 1, dtype=np.int32)
    wrapper = cpattn.BatchMLA()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, CKV, 64, ps, sm_scale=SM_SCALE,
                 dtype=dtype)
    _expect_launch(wrapper._plan["launch"], pdl)
    from cpattn import _core
    if heads == 16 or _core.hopper_path():
        assert (wrapper._plan["split"], wrapper._plan["fused"]) == (split, fused)
    import cupy
    q0, q_pe = queries(rng, batch, heads, dtype)
    cd, kd, q_pe_d = cupy.asarray(ckv), cupy.asarray(kpe), cupy.asarray(q_pe)
    run = lambda q, out: wrapper.run(q, q_pe_d, cd, kd, out=out)
    for q, out in _chains(run, q0, q0.shape):
        ref, _ = reference.mla(q, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, kv_lens=lens,
                               sm_scale=SM_SCALE)
        assert_close(out, ref, dtype, "out")


def test_ragged_prefill_runs_back_to_back(pdl):
    """The prefill kernels (wgmma on Hopper), causal, GQA 4: out has q's shape."""
    dtype, hq, hkv, d = A.FLOAT16, 8, 2, 128
    rng = np.random.default_rng(3)
    qo_lens, kv_lens = [300, 77, 0, 1000], [300, 500, 9, 1000]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    k = rng.standard_normal((int(kv_indptr[-1]), hkv, d)).astype(dtype)
    v = rng.standard_normal((int(kv_indptr[-1]), hkv, d)).astype(dtype)
    wrapper = cpattn.BatchPrefillRagged()
    wrapper.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=True, dtype=dtype)
    _expect_launch(wrapper._plan["launch"].launch, pdl)
    import cupy
    kd, vd = cupy.asarray(k), cupy.asarray(v)
    q0 = rng.standard_normal((int(qo_indptr[-1]), hq, d)).astype(dtype)
    run = lambda q, out: wrapper.run(q, kd, vd, out=out)
    for q, out in _chains(run, q0, q0.shape):
        ref, _ = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, causal=True)
        assert_close(out, ref, dtype, "out")
