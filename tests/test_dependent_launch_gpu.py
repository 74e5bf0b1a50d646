"""Programmatic dependent launch (compute capability 9.0 on): runs queued back to back, with no
sync between them, each reading the output of the run before it (read after write) or
overwriting that run's input (write after read), for decode and MLA, split (fused merge and
merge kernel) and unsplit plans; every run checked against the reference on the inputs it was
given. CPATTN_PDL=0 launches the plain way."""
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


@pytest.mark.parametrize("kv_lens, split", [([4000], True), ([300] * 140, False),
                                            ([900, 0, 33, 2500], True)],
                         ids=["split", "unsplit", "mixed"])
def test_decode_runs_back_to_back(pdl, kv_lens, split):
    dtype, hq, hkv, d, ps = A.FLOAT16, 8, 2, 128, 16
    rng = np.random.default_rng(len(kv_lens))
    k, v, kv_indptr, kv_indices, lens = paged_batch(rng, kv_lens, ps, hkv, d, dtype, "NHD")
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, None, hq, hkv, d, ps, kv_lens=lens, dtype=dtype)
    _expect_launch(wrapper._plan["launch"].launch, pdl)
    assert wrapper._plan["split"] == split
    import cupy
    kd, vd = cupy.asarray(k), cupy.asarray(v)
    q0 = rng.standard_normal((len(kv_lens), hq, d)).astype(dtype)
    run = lambda q, out: wrapper.run(q, (kd, vd), out=out)
    for q, out in _chains(run, q0, q0.shape):
        ref, _ = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=lens)
        assert_close(out, ref, dtype, "out")


@pytest.mark.parametrize("kv_lens, split", [([20000], True), ([40] * 150, False),
                                            ([5000, 0, 64, 9000], True)],
                         ids=["split", "unsplit", "mixed"])
def test_mla_runs_back_to_back(pdl, kv_lens, split):
    dtype, heads, ps = A.BFLOAT16, 16, 64
    rng = np.random.default_rng(len(kv_lens))
    ckv, kpe, kv_indptr, kv_indices, lens = latent_batch(rng, kv_lens, ps, dtype)
    batch = len(kv_lens)
    qo_indptr = np.arange(batch + 1, dtype=np.int32)
    wrapper = cpattn.BatchMLA()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, CKV, 64, ps, sm_scale=SM_SCALE,
                 dtype=dtype)
    _expect_launch(wrapper._plan["launch"], pdl)
    assert wrapper._plan["split"] == split
    import cupy
    q0, q_pe = queries(rng, batch, heads, dtype)
    cd, kd, q_pe_d = cupy.asarray(ckv), cupy.asarray(kpe), cupy.asarray(q_pe)
    run = lambda q, out: wrapper.run(q, q_pe_d, cd, kd, out=out)
    for q, out in _chains(run, q0, q0.shape):
        ref, _ = reference.mla(q, q_pe, ckv, kpe, qo_indptr, kv_indptr, kv_indices, kv_lens=lens,
                               sm_scale=SM_SCALE)
        assert_close(out, ref, dtype, "out")
