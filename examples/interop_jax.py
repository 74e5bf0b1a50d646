"""JAX arrays in and out of cpattn with no copy, through DLPack.

A JAX array on a CUDA device comes in through ``cupy.from_dlpack`` (zero copy) and runs the
kernels; the CuPy result goes back with ``jax.dlpack.from_dlpack(out)``, still on the same memory.
On a machine without a CUDA GPU, JAX arrays on the CPU become NumPy arrays (``np.asarray``, no
copy) and run the NumPy reference. Without JAX the script says so and exits.

Causal alignment: cpattn aligns causal masks bottom-right; ``jax.nn.dot_product_attention``
(``is_causal=True``) aligns them top-left, so the two agree only when qo_len == kv_len.
"""
import sys

import numpy as np

import cpattn
from cpattn import reference

QO_LEN, KV_LEN, HEADS_QO, HEADS_KV, HEAD_DIM = 64, 64, 8, 2, 128


def main() -> int:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("interop_jax: JAX is not installed; nothing to show (pip install jax).")
        return 0
    key_q, key_k, key_v = jax.random.split(jax.random.PRNGKey(0), 3)
    on_cuda = cpattn.gpu_available() and any(d.platform == "gpu" for d in jax.devices())
    device = jax.devices("gpu")[0] if on_cuda else jax.devices("cpu")[0]
    shape_q, shape_kv = (QO_LEN, HEADS_QO, HEAD_DIM), (KV_LEN, HEADS_KV, HEAD_DIM)
    q = jax.device_put(jax.random.normal(key_q, shape_q, jnp.float16), device)
    k = jax.device_put(jax.random.normal(key_k, shape_kv, jnp.float16), device)
    v = jax.device_put(jax.random.normal(key_v, shape_kv, jnp.float16), device)

    if on_cuda:
        import cupy
        import jax.dlpack
        out = cpattn.single_prefill(q, k, v, causal=True)   # JAX arrays in, through DLPack
        back = jax.dlpack.from_dlpack(out)                  # a JAX array on the same memory
        shared = back.unsafe_buffer_pointer() == out.data.ptr
        print(f"JAX -> cpattn -> JAX on {device}: output shares memory with the CuPy result: "
              f"{shared}")
        assert shared, "the result was copied"
        result = np.asarray(cupy.asnumpy(out))
        where = "CUDA kernel on the GPU"
    else:
        out = cpattn.single_prefill(np.asarray(q), np.asarray(k), np.asarray(v), causal=True)
        result = out
        where = "NumPy reference on the CPU"

    ref, _ = reference.single_prefill(np.asarray(q), np.asarray(k), np.asarray(v), causal=True)
    err = float(np.linalg.norm(result - ref) / np.linalg.norm(ref))
    # JAX's own attention (qo_len == kv_len, so top-left and bottom-right causal agree).
    theirs = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                          v.astype(jnp.float32), is_causal=True)
    jax_err = float(np.linalg.norm(result - np.asarray(theirs)) / np.linalg.norm(ref))
    print(f"single_prefill ran on the {where}: relative error {err:.2e} against the reference, "
          f"{jax_err:.2e} against jax.nn.dot_product_attention")
    assert err < 1e-3 and jax_err < 2e-3, "cpattn and the reference disagree"
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
