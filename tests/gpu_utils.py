"""Helpers shared by the tests: tolerances, poisoning, comparison with the float64 reference,
a CPU DLPack producer."""
import numpy as np

import cpattn._arrays as A

#: Relative error allowed against the float64 reference, by dtype of the compared output.
RTOL = {A.FLOAT16: 1e-3, A.BFLOAT16: 1e-2, A.FLOAT32: 1e-5}


def poison_pool(*nbytes: int) -> None:
    """Fill the next blocks CuPy's pool hands out with NaN, so unwritten outputs show.

    Allocates one NaN-filled array of each size in ``nbytes`` (those of the outputs the call under
    test will allocate) and frees them: CuPy's pool hands those blocks out again for requests of
    the same sizes.
    """
    import cupy
    blocks = [cupy.full(max(1, -(-n // 4)), np.nan, dtype=np.float32) for n in nbytes]
    cupy.cuda.get_current_stream().synchronize()
    del blocks


def assert_close(actual, expected, dtype, name="output"):
    """``|actual - expected| / |expected|`` (Frobenius) under RTOL[dtype]; never NaN or Inf
    where the reference is finite; -inf exactly where the reference has -inf."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    inf = np.isneginf(expected)
    assert np.array_equal(np.isneginf(actual), inf), f"{name}: -inf pattern differs"
    a, e = actual[~inf], expected[~inf]
    assert np.isfinite(a).all(), f"{name}: {np.count_nonzero(~np.isfinite(a))} non-finite values"
    err = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
    assert err <= RTOL[np.dtype(dtype)], f"{name}: relative error {err:.3g} > {RTOL[np.dtype(dtype)]}"


def to_device(*arrays):
    import cupy
    return [None if a is None else cupy.asarray(a) for a in arrays]


def random_qkv(rng, total_q, total_kv, hq, hkv, head_dim, dtype):
    """Fresh random q [total_q, hq, D], k / v [total_kv, hkv, D] (never zeros)."""
    q = rng.standard_normal((total_q, hq, head_dim)).astype(dtype)
    k = rng.standard_normal((total_kv, hkv, head_dim)).astype(dtype)
    v = rng.standard_normal((total_kv, hkv, head_dim)).astype(dtype)
    return q, k, v


class CpuDLPack:
    """A minimal CPU DLPack producer (stands for a torch / JAX CPU tensor)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()
