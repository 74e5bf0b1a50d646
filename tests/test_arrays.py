"""Array intake and its checks: every error names the argument, the expected and the actual."""
import ml_dtypes
import numpy as np
import pytest

import cpattn._arrays as A

from gpu_utils import CpuDLPack


class OddDevice(CpuDLPack):
    def __dlpack_device__(self):
        return (14, 0)  # a device type cpattn does not take


def test_intake_numpy_is_identity():
    x = np.ones((2, 3), np.float16)
    assert A.intake(x, "q") is x


def test_intake_cpu_dlpack_is_zero_copy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = A.intake(CpuDLPack(x), "q")
    assert isinstance(y, np.ndarray) and np.shares_memory(x, y)


def test_intake_rejects_non_arrays():
    with pytest.raises(TypeError, match="q must be a CuPy or NumPy array or a DLPack tensor; got list"):
        A.intake([1.0], "q")


def test_intake_rejects_other_dlpack_devices():
    with pytest.raises(TypeError, match="k lives on DLPack device type 14"):
        A.intake(OddDevice(np.ones(2)), "k")


def test_intake_all_keeps_none_and_reports_side():
    arrs, on_gpu = A.intake_all({"q": np.ones(2), "custom_mask": None})
    assert arrs["custom_mask"] is None and on_gpu is False


def test_intake_all_refuses_a_missing_required_array():
    with pytest.raises(TypeError, match="k must be a CuPy or NumPy array or a DLPack tensor; got None"):
        A.intake_all({"q": np.ones(2), "k": None})


def test_bfloat16_is_an_attention_dtype():
    x = np.ones((2, 8), ml_dtypes.bfloat16)
    A.check_dtype(x, "q", A.ATTENTION_DTYPES)
    assert A.dtype_name(x.dtype) == "bfloat16"


@pytest.mark.parametrize("check, match", [
    (lambda: A.check_dtype(np.ones(2, np.float32), "q", A.ATTENTION_DTYPES),
     "q must have dtype float16, bfloat16; got float32"),
    (lambda: A.check_same_dtype(np.ones(2, np.float16), "k", np.ones(2, ml_dtypes.bfloat16), "q"),
     r"k must have the dtype of q \(bfloat16\); got float16"),
    (lambda: A.check_shape(np.ones((3, 4)), "q", (None, 4, 8), "[n, H, D]"),
     r"q must have shape \[n, H, D\] = \(\*, 4, 8\); got \(3, 4\)"),
    (lambda: A.check_shape(np.ones((3, 4, 9)), "q", (None, 4, 8), "[n, H, D]"),
     r"got \(3, 4, 9\)"),
    (lambda: A.check_last_dim_contiguous(np.ones((4, 8))[:, ::2], "v"),
     "v must be contiguous in its last dimension"),
    (lambda: A.check_index(np.zeros(3, np.int64), "kv_indptr"),
     "kv_indptr must have dtype int32; got int64"),
    (lambda: A.check_index(np.zeros((3, 1), np.int32), "kv_indptr"),
     r"kv_indptr must be one-dimensional; got shape \(3, 1\)"),
    (lambda: A.check_index(np.zeros(3, np.int32), "kv_indptr", 5),
     "kv_indptr must have 5 entries; got 3"),
    (lambda: A.check_vector_aligned(np.ones((4, 12), np.float16)[:, :8], "q"),
     "q must be 16-byte aligned"),
])
def test_check_messages(check, match):
    with pytest.raises(ValueError, match=match):
        check()


def test_checks_accept_good_input():
    x = np.zeros((4, 2, 64), np.float16)
    A.check_shape(x, "q", (None, 2, 64), "[n, H, D]")
    A.check_last_dim_contiguous(x, "q")
    A.check_vector_aligned(x, "q")
    A.check_index(np.zeros(5, np.int32), "qo_indptr", 5)
    assert A.element_strides(x) == (128, 64, 1)


@pytest.mark.gpu
def test_gpu_intake_and_mixing():
    import cupy
    g = cupy.ones(4, cupy.float16)
    arrs, on_gpu = A.intake_all({"q": g, "k": g})
    assert on_gpu and arrs["q"] is g
    with pytest.raises(ValueError, match="k is a NumPy \\(host\\) array but q is a CuPy"):
        A.intake_all({"q": g, "k": np.ones(4, np.float16)})


@pytest.mark.gpu
def test_torch_dlpack_round_trip_zero_copy():
    torch = pytest.importorskip("torch")
    import cupy
    for tdtype, ndtype in ((torch.float16, np.float16), (torch.bfloat16, A.BFLOAT16)):
        t = torch.randn(8, 4, 64, device="cuda").to(tdtype)
        c = A.intake(t, "q")
        assert isinstance(c, cupy.ndarray) and c.dtype == ndtype
        assert c.data.ptr == t.data_ptr()
        back = torch.from_dlpack(c)
        assert back.dtype == tdtype and back.data_ptr() == t.data_ptr()
