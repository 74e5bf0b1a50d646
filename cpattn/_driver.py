"""CUDA driver entry points cpattn calls through ctypes (those CuPy does not expose): resolved
from ``libcuda.so.1`` on first use and kept."""
from __future__ import annotations

import ctypes
from functools import cache


@cache
def function(name: str, *argtypes):
    """The driver function ``name`` (a CUresult, an int, returned) taking ``argtypes``."""
    fn = getattr(ctypes.CDLL("libcuda.so.1"), name)
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn
