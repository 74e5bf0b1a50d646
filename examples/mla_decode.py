"""MLA decode (DeepSeek-V3 latent attention with absorbed weights): an MLAPagedCache per layer,
prompts appended, then decode steps that append one token per request, plan once and run each
layer with BatchMLA. The result of the last step is checked against cpattn.reference.mla.

BatchMLA and MLAPagedCache.append run CUDA kernels on a GPU. Without one the script says so and
runs the same steps through the NumPy reference (reference.mla) on a CPU cache, at small sizes;
it then checks the reference against the attention written out densely below (dense_mla).
"""
import numpy as np

import cpattn
from cpattn import reference

HEADS, CKV, KPE, PAGE = 16, 512, 64, 64  # 16 heads: one tensor-parallel-8 shard of DeepSeek-V3
SM_SCALE = 1 / np.sqrt(128 + 64)          # the head_dim before absorption: no default in MLA
DTYPE = "bfloat16"


def dense_mla(q_nope, q_pe, ckv_cache, kpe_cache, pages, kv_len):
    """One request's MLA written out: gather its tokens from its pages, then softmax attention
    with V = ckv. q_nope [n, HEADS, CKV], q_pe [n, HEADS, KPE]; the pools ckv_cache
    [num_pages, PAGE, CKV], kpe_cache [num_pages, PAGE, KPE]; pages: its page ids. Decode
    queries (n = 1) see every key. Returns [n, HEADS, CKV] float64."""
    ckv = np.asarray(ckv_cache[pages], np.float64).reshape(-1, CKV)[:kv_len]  # [kv_len, CKV]
    kpe = np.asarray(kpe_cache[pages], np.float64).reshape(-1, KPE)[:kv_len]  # [kv_len, KPE]
    q_nope, q_pe = np.asarray(q_nope, np.float64), np.asarray(q_pe, np.float64)
    s = (q_nope @ ckv.T + q_pe @ kpe.T) * SM_SCALE       # scores [n, HEADS, kv_len]
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ ckv      # [n, HEADS, CKV]


def main() -> None:
    gpu = cpattn.gpu_available()
    xp = np
    if gpu:
        import cupy as xp
    print("mla_decode: BatchMLA (CUDA kernels) on the GPU" if gpu else
          "mla_decode: no CUDA GPU found; the NumPy reference (reference.mla) on the CPU, at "
          "small sizes")
    rng = np.random.default_rng(0)
    dtype = cpattn._arrays.BFLOAT16
    layers, prompts = (2, [900, 37, 2000]) if gpu else (1, [90, 7, 20])
    new = lambda *shape: xp.asarray(rng.standard_normal(shape).astype(dtype))

    caches = [cpattn.MLAPagedCache(256, PAGE, CKV, KPE, DTYPE, device="gpu" if gpu else "cpu")
              for _ in range(layers)]
    seqs = ["a", "b", "c"]
    for cache in caches:
        cache.ckv_cache.fill(np.nan)  # slots no request owns (page tails) must not be read
        cache.kpe_cache.fill(np.nan)
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

    if gpu:  # the last layer's output against the float64 reference
        host = xp.asnumpy
        ref, _ = reference.mla(host(q_nope), host(q_pe), host(caches[-1].ckv_cache),
                               host(caches[-1].kpe_cache), qo_indptr, kv_indptr, kv_indices,
                               kv_lens=kv_lens, sm_scale=SM_SCALE)
        got, what, tolerance = np.asarray(host(out), np.float64), "reference.mla", 1e-2
    else:  # the reference's output against the dense computation, request by request
        cache = caches[-1]
        ref = np.concatenate([
            dense_mla(q_nope[b:b + 1], q_pe[b:b + 1], cache.ckv_cache, cache.kpe_cache,
                      kv_indices[kv_indptr[b]:kv_indptr[b + 1]], kv_lens[b])
            for b in range(len(seqs))])
        got, what, tolerance = out, "a dense computation", 1e-9
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"relative error against {what}: {err:.2e}")
    assert err < tolerance, f"the last step differs from {what}"
    print("OK")


if __name__ == "__main__":
    main()
