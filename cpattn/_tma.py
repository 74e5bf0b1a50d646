"""Tensor maps (CUtensorMap) for the Hopper bulk tensor copy (TMA), encoded by the CUDA driver.

A tensor map describes a strided array in global memory and the box one copy moves; the kernel
receives it as a ``__grid_constant__`` parameter (kernels_cu/common/tma.cuh). The maps here cover
rows of 16-bit elements, ``[rows, heads, head_dim]`` with any row and head strides, copied as
boxes of ``box_rows`` rows x 64 elements of one head (128 bytes: the 128-byte swizzle the wgmma
tiles use). Rows past the end read as zero.
"""
from __future__ import annotations

import ctypes

import numpy as np

#: ``KVTensorMaps`` of kernels_cu/common/tma.cuh: the K and V maps (128 bytes each, 128-byte
#: aligned), then whether the kernel may use them.
KV_MAPS_DTYPE = np.dtype({"names": ["k", "v", "enabled"],
                          "formats": [(np.uint64, 16), (np.uint64, 16), np.int32],
                          "offsets": [0, 128, 256], "itemsize": 384})

_UINT16, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_ZERO = 1, 0, 3, 3, 0
_encode = None


def _encoder():
    global _encode
    if _encode is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                       ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _encode = fn
    return _encode


def encode_rows(out: np.ndarray, ptr: int, rows: int, heads: int, head_dim: int,
                row_stride: int, head_stride: int, box_rows: int) -> None:
    """Write into ``out`` (16 uint64) the map of ``[rows, heads, head_dim]`` 16-bit elements at
    ``ptr`` (strides in elements; head_dim contiguous), boxes of ``box_rows`` x 64."""
    dims = (ctypes.c_uint64 * 3)(head_dim, heads, rows)
    strides = (ctypes.c_uint64 * 2)(head_stride * 2, row_stride * 2)
    box = (ctypes.c_uint32 * 3)(64, 1, box_rows)
    unit = (ctypes.c_uint32 * 3)(1, 1, 1)
    status = _encoder()(_ALIGNED.ctypes.data, _UINT16, 3, ctypes.c_void_p(ptr), dims, strides,
                        box, unit, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_ZERO)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({status}) for [{rows}, {heads}, "
                           f"{head_dim}] with strides ({row_stride}, {head_stride})")
    out[:] = _ALIGNED


def _aligned_map() -> np.ndarray:
    """16 uint64 at a 128-byte aligned address (the driver writes the map there)."""
    raw = np.zeros(32, np.uint64)
    skip = (-raw.ctypes.data % 128) // 8
    return raw[skip:skip + 16]


_ALIGNED = _aligned_map()
