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

from . import _driver

#: ``KVTensorMaps`` of kernels_cu/common/tma.cuh: the K and V maps (128 bytes each, 128-byte
#: aligned), then whether the kernel may use them.
KV_MAPS_DTYPE = np.dtype({"names": ["k", "v", "enabled"],
                          "formats": [(np.uint64, 16), (np.uint64, 16), np.int32],
                          "offsets": [0, 128, 256], "itemsize": 384})

_UINT16, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_ZERO = 1, 0, 3, 3, 0


def _encoder():
    return _driver.function(
        "cuTensorMapEncodeTiled", ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int)


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


def row_boxes(k_shape, strides, kv_layout: str, paged: bool, head_dim: int, tile: int):
    """How the Hopper prefill kernel reads K and V as rows ``[rows, kv_heads, head_dim]`` by
    TMA: ``(rows, kv_heads, box_rows)``, or None when it must copy by cp.async.

    ``strides``: the (page, slot, head) element strides of K and of V (``_core.kv_strides``).
    Ragged (or single-request) keys are rows of tokens, boxes of a whole key tile. Paged: the
    slots of an NHD pool, one box a page, when the pages are contiguous runs of slots, their size
    is a power of two of at least 8 (a 128-byte swizzle atom) that divides the tile in at most 32
    pages (one producer lane copies each), and the pool has under 2^31 slots. Strides must be
    multiples of 16 bytes.

    >>> row_boxes((100, 8, 128), [(0, 1024, 128)] * 2, "NHD", False, 128, 128)
    (100, 8, 128)
    >>> row_boxes((50, 16, 8, 128), [(16384, 1024, 128)] * 2, "NHD", True, 128, 128)
    (800, 8, 16)
    >>> row_boxes((50, 5, 8, 128), [(5120, 1024, 128)] * 2, "NHD", True, 128, 128) is None
    True
    """
    nhd = kv_layout == "NHD"
    if paged:
        page_size = k_shape[1] if nhd else k_shape[2]
        rows, heads, box = k_shape[0] * page_size, k_shape[2] if nhd else k_shape[1], page_size
        fits = (nhd and page_size >= 8 and page_size & (page_size - 1) == 0
                and tile % page_size == 0 and tile // page_size <= 32
                and rows < 2 ** 31 and all(page == page_size * slot for page, slot, _ in strides))
    else:
        rows, heads = (k_shape[0], k_shape[1]) if nhd else (k_shape[1], k_shape[0])
        box, fits = tile, True
    fits = fits and rows > 0 and all(s % 8 == 0 for st in strides for s in st[1:])
    return (rows, heads, box) if fits else None


class MapsCache:
    """Encoded tensor maps by the arrays they describe (pointers, shapes, strides, box): a
    serving loop runs each layer on its own pools, and encoding two maps costs more host time
    than the rest of a run(). Keeps the last ``MOST`` keys."""
    MOST = 1024  #: 384 bytes of maps each

    def __init__(self):
        self._kept = {}

    def fill(self, out: np.ndarray, key, encode) -> None:
        """``out[...]`` = the maps kept for ``key``; else ``encode(out)``, then kept."""
        kept = self._kept.get(key)
        if kept is not None:
            out[...] = kept
            return
        encode(out)
        if len(self._kept) >= self.MOST:
            self._kept.clear()
        self._kept[key] = out.copy()


def mla_row_boxes(ckv_shape, strides, tile: int):
    """How the Hopper MLA kernel reads the latent pools by TMA: ``(rows, box_rows)`` (the pools'
    page slots as rows, one box a page), or None when it must copy by cp.async.

    ``strides``: the element strides of ckv ``[num_pages, page_size, 512]`` and kpe ``[...,
    64]``. Pages must be contiguous runs of slots, their size a power of two of at least 8 (a
    128-byte swizzle atom) that divides the tile (one producer lane copies each page), with under
    2^31 slots in all and strides multiples of 16 bytes.

    >>> mla_row_boxes((10, 64, 512), [(64 * 576, 576, 1), (64 * 576, 576, 1)], 64)
    (640, 64)
    >>> mla_row_boxes((10, 1, 512), [(576, 576, 1), (576, 576, 1)], 64) is None
    True
    """
    num_pages, page_size = ckv_shape[0], ckv_shape[1]
    rows = num_pages * page_size
    fits = (page_size >= 8 and page_size & (page_size - 1) == 0 and tile % page_size == 0
            and 0 < rows < 2 ** 31
            and all(page == page_size * slot and slot % 8 == 0 for page, slot, _ in strides))
    return (rows, page_size) if fits else None

