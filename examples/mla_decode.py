"""MLA decode (DeepSeek-V3 latent attention with absorbed weights): an MLAPagedCache per layer,
prompts appended, then decode steps that append one token per request, plan once and run each
layer with BatchMLA. The result of the last step is checked against cpattn.reference.mla.

Needs a CUDA GPU (BatchMLA and MLAPagedCache.append run CUDA kernels). Without one it says so and
runs the same steps through the NumPy reference on a CPU cache, at small sizes.
"""
import numpy as np

import cpattn
from cpattn import reference

HEADS, CKV, KPE, PAGE = 16, 512, 64, 64  # 16 heads: one tensor-parallel-8 shard of DeepSeek-V3
SM_SCALE = 1 / np.sqrt(128 + 64)          # the head_dim before absorption: no default in MLA
DTYPE = "bfloat16"


def main() -> None:
    gpu = cpattn.gpu_available()
    xp = np
    if gpu:
        import cupy as xp
    print("BatchMLA on the GPU" if gpu else "no GPU: reference.mla on the CPU at small sizes")
    rng = np.random.default_rng(0)
    dtype = cpattn._arrays.BFLOAT16
    layers, prompts = (2, [900, 37, 2000]) if gpu else (1, [90, 7, 20])
    new = lambda *shape: xp.asarray(rng.standard_normal(shape).astype(dtype))

    caches = [cpattn.MLAPagedCache(256, PAGE, CKV, KPE, DTYPE, device="gpu" if gpu else "cpu")
              for _ in range(layers)]
    seqs = ["a", "b", "c"]
    for cache in caches:
        for s in seqs:
            cache.add_sequence(s)
        cache.append(seqs, new(sum(prompts), CKV), new(sum(prompts), KPE),
                     cpattn.planner.cu_seqlens(prompts))

    wrapper = cpattn.BatchMLA() if gpu else None
    qo_indptr = np.arange(len(seqs) + 1, dtype=np.int32)  # one query per request
    for step in range(3):
        for cache in caches:  # each layer appends the new token's latent vectors
            cache.append(seqs, new(len(seqs), CKV), new(len(seqs), KPE))
        kv_indptr, kv_indices, _, kv_lens = caches[0].page_table(seqs)
        if gpu:  # plan once per step, run every layer
            wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, HEADS, CKV, KPE, PAGE,
                         sm_scale=SM_SCALE, dtype=DTYPE)
        for cache in caches:
            q_nope, q_pe = new(len(seqs), HEADS, CKV), new(len(seqs), HEADS, KPE)
            if gpu:
                out = wrapper.run(q_nope, q_pe, cache)
            else:
                out, _ = reference.mla(q_nope, q_pe, cache.ckv_cache, cache.kpe_cache, qo_indptr,
                                       kv_indptr, kv_indices, kv_lens=kv_lens, sm_scale=SM_SCALE)
        print(f"step {step}: kv_lens {kv_lens.tolist()}, out {tuple(out.shape)}")

    # The last layer's output against the float64 reference.
    host = (lambda x: xp.asnumpy(x)) if gpu else np.asarray
    ref, _ = reference.mla(host(q_nope), host(q_pe), host(caches[-1].ckv_cache),
                           host(caches[-1].kpe_cache), qo_indptr, kv_indptr, kv_indices,
                           kv_lens=kv_lens, sm_scale=SM_SCALE)
    got = np.asarray(host(out), np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"relative error against reference.mla: {err:.2e}")
    assert err < 1e-2, "BatchMLA differs from the reference"
    print("OK")


if __name__ == "__main__":
    main()
