"""merge_state / merge_states: the CPU path (NumPy -> reference), validation, and the CUDA kernel."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import reference

from gpu_utils import assert_close, poison_pool

DTYPES = (A.FLOAT16, A.BFLOAT16, A.FLOAT32)
HEAD_DIMS = (64, 128, 512)
NUM_STATES = (0, 1, 3, 8)


def _states(rng, n, num_states, heads, dim, dtype, empty_fraction=0.25):
    """Random states; about ``empty_fraction`` of them empty (lse -inf, v arbitrary finite)."""
    v = rng.standard_normal((n, num_states, heads, dim)).astype(dtype)
    s = (rng.standard_normal((n, num_states, heads)) * 3).astype(np.float32)
    s[rng.random(s.shape) < empty_fraction] = -np.inf
    return v, s


def test_merge_state_cpu_matches_reference():
    rng = np.random.default_rng(0)
    v, s = _states(rng, 5, 2, 3, 64, np.float32)
    out, lse = cpattn.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    ref_v, ref_s = reference.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    assert out.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(out, ref_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_s))


def test_merge_states_cpu_zero_states_is_empty():
    v = np.zeros((4, 0, 2, 64), np.float16)
    s = np.zeros((4, 0, 2), np.float32)
    out, lse = cpattn.merge_states(v, s)
    assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(s_a=np.zeros((4, 2), np.float16)), ValueError, "s_a must have dtype float32; got float16"),
    (dict(v_b=np.zeros((4, 2, 32), np.float16)), ValueError, r"v_b must have shape .*got \(4, 2, 32\)"),
    (dict(v_a=np.zeros((4, 2, 64), np.int8)), ValueError, "v_a must have dtype float16, bfloat16"),
    (dict(v_a=[[0.0]]), TypeError, "v_a must be a CuPy or NumPy array or a DLPack tensor; got list"),
])
def test_merge_state_validation(kwargs, error, match):
    args = dict(v_a=np.zeros((4, 2, 64), np.float16), s_a=np.zeros((4, 2), np.float32),
                v_b=np.zeros((4, 2, 64), np.float16), s_b=np.zeros((4, 2), np.float32))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cpattn.merge_state(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_merge_state_gpu(dtype, dim):
    import cupy
    rng = np.random.default_rng(dim)
    v, s = _states(rng, 37, 2, 5, dim, dtype)
    s[0, :, :] = -np.inf          # both sides empty
    s[1, 0, :] = -np.inf          # only a empty
    s[2, 1, :] = -np.inf          # only b empty
    ref_v, ref_s = reference.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    d = [cupy.asarray(x) for x in (v[:, 0], s[:, 0], v[:, 1], s[:, 1])]
    poison_pool(ref_v.size * v.itemsize, ref_s.size * 4)
    out, lse = cpattn.merge_state(*d)
    assert out.dtype == dtype and lse.dtype == np.float32
    assert_close(cupy.asnumpy(out), ref_v, dtype, "v")
    assert_close(cupy.asnumpy(lse), ref_s, A.FLOAT32, "lse")
    assert (cupy.asnumpy(out)[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_states", NUM_STATES)
def test_merge_states_gpu(dtype, num_states):
    import cupy
    rng = np.random.default_rng(num_states)
    v, s = _states(rng, 53, num_states, 4, 128, dtype)
    ref_v, ref_s = reference.merge_states(v, s)
    poison_pool(ref_v.size * v.itemsize, ref_s.size * 4)
    out, lse = cpattn.merge_states(cupy.asarray(v), cupy.asarray(s))
    assert_close(cupy.asnumpy(out), ref_v, dtype, "v")
    assert_close(cupy.asnumpy(lse), ref_s, A.FLOAT32, "lse")


@pytest.mark.gpu
def test_merge_state_strided_inputs_and_stream():
    """Views with outer strides (a slice of a bigger buffer) work without a copy."""
    import cupy
    rng = np.random.default_rng(7)
    v, s = _states(rng, 16, 2, 8, 128, np.float16)
    big_v = cupy.asarray(np.concatenate([v, v], axis=2))  # [n, 2, 16, D]: heads 0..7 used
    big_s = cupy.asarray(np.concatenate([s, s], axis=2))
    stream = cupy.cuda.Stream(non_blocking=True)
    out, lse = cpattn.merge_state(big_v[:, 0, :8], big_s[:, 0, :8], big_v[:, 1, :8],
                                  big_s[:, 1, :8], stream=stream)
    stream.synchronize()
    ref_v, ref_s = reference.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    assert_close(cupy.asnumpy(out), ref_v, np.float16, "v")
    assert_close(cupy.asnumpy(lse), ref_s, A.FLOAT32, "lse")


@pytest.mark.gpu
def test_merge_state_kernel_head_dim_limits():
    import cupy
    v = cupy.zeros((4, 2, 12), np.float16)
    s = cupy.zeros((4, 2), np.float32)
    with pytest.raises(NotImplementedError, match="head_dim must be a multiple of 8 from 8"):
        cpattn.merge_state(v, s, v, s)


def test_merge_state_reference_path_takes_any_head_dim():
    v = np.ones((4, 2, 12), np.float16)
    s = np.zeros((4, 2), np.float32)
    out, lse = cpattn.merge_state(v, s, v, s)
    assert out.shape == (4, 2, 12) and np.allclose(lse, np.log(2))


@pytest.mark.gpu
def test_merge_state_mixed_devices_rejected():
    import cupy
    v = np.zeros((2, 1, 64), np.float16)
    s = np.zeros((2, 1), np.float32)
    with pytest.raises(ValueError, match="never copies between host and device"):
        cpattn.merge_state(cupy.asarray(v), s, v, s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (A.FLOAT32, A.BFLOAT16))
@pytest.mark.parametrize("n, num_states, dim", [(1, 130, 512), (2, 17, 128), (300, 2, 512)])
def test_merge_states_gpu_launch_shapes(dtype, n, num_states, dim):
    """Few rows of many states (dims cut into slices, 16 lanes, two batches a lane) and many
    rows of two (one lane); empty states hold NaN in v, which must not reach the output."""
    import cupy
    from cpattn.merge import launch_shape
    rng = np.random.default_rng(num_states)
    v, s = _states(rng, n, num_states, 3, dim, dtype)
    v[np.isneginf(s)] = np.nan
    s[0, :, 1] = -np.inf  # a row with no state
    shape = launch_shape(n * 3, dim, 16 // np.dtype(dtype).itemsize, num_states)
    if num_states == 130:
        assert shape.slices > 1 and shape.lanes == 16, shape
    ref_v, ref_s = reference.merge_states(np.nan_to_num(v), s)
    poison_pool(ref_v.size * v.itemsize, ref_s.size * 4)
    out, lse = cpattn.merge_states(cupy.asarray(v), cupy.asarray(s))
    assert_close(cupy.asnumpy(out), ref_v, dtype, "v")
    assert_close(cupy.asnumpy(lse), ref_s, A.FLOAT32, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("dim", (128, 512))
def test_varlen_merge_rows_of_many_and_few_states(dim):
    """Split-KV partials [states, heads, dim] fp32 merged per row by an indptr: rows of 0 to
    140 states, the launch shape picked from the fullest (and the shape for an unknown count)."""
    import cupy
    from cpattn.merge import VarlenMerge, launch_shape
    counts = np.array([0, 1, 2, 9, 140, 3], np.int32)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    heads, rows = 2, len(counts)
    rng = np.random.default_rng(dim)
    v, s = _states(rng, 1, int(indptr[-1]), heads, dim, np.float32)
    v, s = v[0], s[0]  # [states, heads, dim], [states, heads]
    v[np.isneginf(s)] = np.nan
    ref = [reference.merge_states(np.nan_to_num(v[None, a:b]), s[None, a:b])
           for a, b in zip(indptr[:-1], indptr[1:])]
    ref_v = np.concatenate([r[0] for r in ref])
    ref_s = np.concatenate([r[1] for r in ref])
    d_v, d_s, d_indptr = cupy.asarray(v), cupy.asarray(s), cupy.asarray(indptr)
    for most in (int(counts.max()), None):
        shape = launch_shape(rows * heads, dim, 4, most)
        merge = VarlenMerge(d_v, d_s, 1, d_indptr.data.ptr, rows, np.float16, shape)
        out = cupy.full((rows, heads, dim), np.nan, np.float16)
        lse = cupy.full((rows, heads), np.nan, np.float32)
        merge(out, lse)
        assert_close(cupy.asnumpy(out), ref_v, np.float16, f"v (shape {shape})")
        assert_close(cupy.asnumpy(lse), ref_s, A.FLOAT32, f"lse (shape {shape})")


@pytest.mark.parametrize("rows", (1, 3, 16, 600, 5000))
@pytest.mark.parametrize("dim, vec", [(512, 4), (128, 4), (128, 8), (256, 8), (40, 8), (8, 8)])
@pytest.mark.parametrize("max_states", (None, 0, 1, 2, 8, 9, 40, 128, 1000))
def test_merge_launch_shape_covers_every_row_and_dim(rows, dim, vec, max_states):
    """Blocks of at most 1024 threads whose slices tile each row's dims exactly; one lane for
    up to 8 states, and dims sliced only while a block holds a single row."""
    from cpattn.merge import launch_shape
    shape = launch_shape(rows, dim, vec, max_states, num_sms=132)
    x, per_block, lanes = shape.block()
    assert x * per_block * lanes <= 1024
    assert shape.slices * x * vec == dim
    assert shape.grid(rows)[0] * per_block >= rows
    if max_states is not None and max_states <= 8:
        assert lanes == 1
    if shape.slices > 1:
        assert per_block == 1 and x >= 8
