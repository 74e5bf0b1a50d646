"""Quickstart: attention over a key set split in two halves, merged with cpattn.merge_state.

Runs anywhere: with a CUDA GPU and CuPy the merge runs on the GPU kernel; otherwise the NumPy
reference runs on the CPU at small sizes. Either way the result is checked against attention
over all keys at once.
"""
import numpy as np

import cpattn
from cpattn import reference


def on_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main() -> None:
    rng = np.random.default_rng(0)
    qo_len, kv_len, heads, head_dim = 16, 96, 4, 64
    q = rng.standard_normal((qo_len, heads, head_dim)).astype(np.float16)
    k = rng.standard_normal((kv_len, heads, head_dim)).astype(np.float16)
    v = rng.standard_normal((kv_len, heads, head_dim)).astype(np.float16)

    # Attention over each half of the keys: outputs [qo_len, heads, head_dim], lse [qo_len, heads].
    half = kv_len // 2
    o_a, s_a = reference.single_prefill(q, k[:half], v[:half])
    o_b, s_b = reference.single_prefill(q, k[half:], v[half:])
    parts = [o_a.astype(np.float16), s_a.astype(np.float32), o_b.astype(np.float16),
             s_b.astype(np.float32)]

    gpu = on_gpu()
    if gpu:
        import cupy
        parts = [cupy.asarray(p) for p in parts]
    out, lse = cpattn.merge_state(*parts)
    if gpu:
        out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)

    full_o, full_s = reference.single_prefill(q, k, v)
    err = np.linalg.norm(out - full_o) / np.linalg.norm(full_o)
    lse_err = np.abs(lse - full_s).max()
    where = "CUDA kernel on the GPU" if gpu else "NumPy reference on the CPU"
    print(f"merge_state ran on the {where}: relative error {err:.2e}, max lse error {lse_err:.2e}")
    assert err < 2e-3 and lse_err < 1e-3, "merged attention differs from the full attention"
    print("OK")


if __name__ == "__main__":
    main()
