"""Quickstart: causal attention of one request with cpattn.single_prefill, then the same keys split
in two halves whose attention states are merged with cpattn.merge_state.

Runs anywhere: with a CUDA GPU and CuPy both ops run the GPU kernels on CuPy arrays; otherwise
NumPy arrays run the NumPy reference on the CPU at small sizes. Either way each result is checked
against cpattn.reference.
"""
import numpy as np

import cpattn
from cpattn import reference



def main() -> None:
    rng = np.random.default_rng(0)
    qo_len, kv_len, heads, head_dim = 16, 96, 4, 64
    q = rng.standard_normal((qo_len, heads, head_dim)).astype(np.float16)
    k = rng.standard_normal((kv_len, heads, head_dim)).astype(np.float16)
    v = rng.standard_normal((kv_len, heads, head_dim)).astype(np.float16)
    gpu = cpattn.gpu_available()
    where = "CUDA kernel on the GPU" if gpu else "NumPy reference on the CPU"

    # The main op: attention of 16 queries over 96 keys, causal aligned bottom-right (query i
    # sees keys 0 .. i + 80). CuPy in, CuPy out; NumPy in, NumPy out.
    if gpu:
        import cupy
        out = cupy.asnumpy(cpattn.single_prefill(*(cupy.asarray(x) for x in (q, k, v)),
                                                 causal=True))
    else:
        out = cpattn.single_prefill(q, k, v, causal=True)
    ref_o, _ = reference.single_prefill(q, k, v, causal=True)
    err = np.linalg.norm(out - ref_o) / np.linalg.norm(ref_o)
    print(f"single_prefill ran on the {where}: relative error {err:.2e}")
    assert out.shape == (qo_len, heads, head_dim) and out.dtype == np.float16
    assert err < 2e-3, "single_prefill differs from the reference"

    # Attention over each half of the keys: outputs [qo_len, heads, head_dim], lse [qo_len, heads].
    half = kv_len // 2
    o_a, s_a = reference.single_prefill(q, k[:half], v[:half])
    o_b, s_b = reference.single_prefill(q, k[half:], v[half:])
    parts = [o_a.astype(np.float16), s_a.astype(np.float32), o_b.astype(np.float16),
             s_b.astype(np.float32)]

    if gpu:
        parts = [cupy.asarray(p) for p in parts]
    out, lse = cpattn.merge_state(*parts)
    if gpu:
        out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)

    full_o, full_s = reference.single_prefill(q, k, v)
    err = np.linalg.norm(out - full_o) / np.linalg.norm(full_o)
    lse_err = np.abs(lse - full_s).max()
    print(f"merge_state ran on the {where}: relative error {err:.2e}, max lse error {lse_err:.2e}")
    assert err < 2e-3 and lse_err < 1e-3, "merged attention differs from the full attention"
    print("OK")


if __name__ == "__main__":
    main()
