"""Array intake: CuPy, NumPy and any ``__dlpack__`` producer, with checks that name the argument.

Device follows the data: CuPy arrays (or DLPack tensors on a CUDA device) run the CUDA kernels,
NumPy arrays (or DLPack tensors on the CPU) run the NumPy reference. Intake never copies, and
never moves data between host and device.
"""
from __future__ import annotations

import numpy as np
import ml_dtypes

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
INT32 = np.dtype(np.int32)
INT32_MAX = 2 ** 31 - 1
#: dtypes of q / k / v and of paged caches.
ATTENTION_DTYPES = (FLOAT16, BFLOAT16)

_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_DLPACK_CUDA_HOST = 3
_DLPACK_CUDA_MANAGED = 13

try:  # CuPy is optional: without it, only the NumPy reference runs.
    import cupy
except ImportError:  # pragma: no cover - exercised on machines without CuPy
    cupy = None


def dtype_name(dt) -> str:
    return "bfloat16" if np.dtype(dt) == BFLOAT16 else np.dtype(dt).name


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        return cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, or a driver without devices
        return False


def is_gpu(x) -> bool:
    """True for a CuPy array."""
    return cupy is not None and isinstance(x, cupy.ndarray)


def intake(x, name: str):
    """Return ``x`` as a NumPy or CuPy array, with no copy.

    DLPack producers (PyTorch, JAX, ...) come in through ``cupy.from_dlpack`` on CuPy's current
    stream when they live on a CUDA device, and through ``numpy.from_dlpack`` on the CPU.
    """
    if isinstance(x, np.ndarray) or is_gpu(x):
        return x
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be a CuPy or NumPy array or a DLPack tensor; "
                        f"got {type(x).__name__}")
    device_type = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else _DLPACK_CUDA
    if device_type == _DLPACK_CPU:
        return np.from_dlpack(x)
    if device_type in (_DLPACK_CUDA, _DLPACK_CUDA_HOST, _DLPACK_CUDA_MANAGED):
        if cupy is None:
            raise TypeError(f"{name} is a CUDA tensor but CuPy is not installed; "
                            "install cpattn[cuda12] or cpattn[cuda13]")
        return cupy.from_dlpack(x)
    raise TypeError(f"{name} lives on DLPack device type {device_type}; "
                    "cpattn takes CUDA or CPU tensors")


def intake_all(arrays: dict, optional=("out", "custom_mask")) -> tuple[dict, bool]:
    """Take in a dict ``{name: array}``; return it converted and whether it runs on the GPU.

    Entries named in ``optional`` may be None and stay None; any other None is a TypeError. All
    arrays must live on one side (and, on the GPU, on one device); mixing raises ValueError
    rather than copying.
    """
    if _all_cupy_on_one_device(arrays, optional):  # run()'s steady state: nothing to convert
        return arrays, True
    for k, v in arrays.items():
        if v is None and k not in optional:
            raise TypeError(f"{k} must be a CuPy or NumPy array or a DLPack tensor; got None")
    out = {k: (None if v is None else intake(v, k)) for k, v in arrays.items()}
    present = [(k, v) for k, v in out.items() if v is not None]
    first_name, first = present[0]
    on_gpu = is_gpu(first)
    for k, v in present[1:]:
        if is_gpu(v) != on_gpu:
            where = lambda a: "a CuPy (GPU) array" if is_gpu(a) else "a NumPy (host) array"
            raise ValueError(f"{k} is {where(v)} but {first_name} is {where(first)}; "
                             "cpattn never copies between host and device")
        if on_gpu and v.device.id != first.device.id:
            raise ValueError(f"{k} is on GPU {v.device.id} but {first_name} is on GPU "
                             f"{first.device.id}; all arrays must be on one device")
    return out, on_gpu


def _all_cupy_on_one_device(arrays: dict, optional) -> bool:
    """True when every entry is a CuPy array (or None where allowed), all on one device."""
    if cupy is None:
        return False
    device = None
    for k, v in arrays.items():
        if type(v) is cupy.ndarray:
            if device is None:
                device = v.data.device_id
            elif v.data.device_id != device:
                return False
        elif v is not None or k not in optional:
            return False
    return device is not None


def check_dtype(x, name: str, allowed) -> None:
    if x.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise ValueError(f"{name} must have dtype {names}; got {dtype_name(x.dtype)}")


def check_same_dtype(x, name: str, ref, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({dtype_name(ref.dtype)}); "
                         f"got {dtype_name(x.dtype)}")


def check_shape(x, name: str, expected: tuple, dims: str) -> None:
    """Check ``x.shape`` against ``expected``, where None matches any size.

    ``dims`` names the axes for the message, e.g. ``"[total_q, num_qo_heads, head_dim]"``.
    """
    ok = x.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {dims} = {want}; got {tuple(x.shape)}")


def check_last_dim_contiguous(x, name: str) -> None:
    if x.size and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride "
                         f"{x.itemsize} bytes); got stride {x.strides[-1]} bytes")


def check_index(x, name: str, length=None) -> None:
    """An index array: int32, one-dimensional, of ``length`` entries when given."""
    if x.dtype != INT32:
        raise ValueError(f"{name} must have dtype int32; got {dtype_name(x.dtype)}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries; got {x.shape[0]}")


def element_strides(x) -> tuple:
    """Strides in elements (what kernels take)."""
    return tuple(s // x.itemsize for s in x.strides)


def check_vector_aligned(x, name: str, nbytes: int = 16) -> None:
    """Kernels move ``nbytes``-wide vectors: the base address and every stride but the last
    must be multiples of it (a contiguous array of a 16-byte multiple row always is)."""
    if x.size == 0:
        return
    base = x.data.ptr if is_gpu(x) else x.ctypes.data
    bad = [s for s in x.strides[:-1] if s % nbytes]
    if base % nbytes or bad:
        raise ValueError(f"{name} must be {nbytes}-byte aligned in its base address and outer "
                         f"strides; got address %{nbytes}={base % nbytes}, strides {x.strides}")
