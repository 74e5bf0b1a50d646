"""cpattn: attention for LLM inference on NVIDIA GPUs, on CuPy, with no PyTorch.

CuPy arrays (or DLPack tensors on a CUDA device) run the CUDA kernels; NumPy arrays run the
float64 NumPy reference (``cpattn.reference``) with the same semantics.
"""
from . import mask, planner, reference
from ._arrays import gpu_available
from ._kernels import KernelError
from .attention import BatchPrefillRagged, single_decode, single_prefill, varlen_attention
from .cascade import CascadeAttention
from .decode import BatchDecode
from .merge import merge_state, merge_states
from .mla import BatchMLA, MLAPagedCache
from .paged import OutOfPagesError, PagedKVCache, append_paged_kv
from .paged_prefill import BatchPrefillPaged

__version__ = "0.1.0"
__all__ = ["BatchDecode", "BatchMLA", "BatchPrefillPaged", "BatchPrefillRagged",
           "CascadeAttention", "KernelError", "MLAPagedCache", "OutOfPagesError", "PagedKVCache",
           "append_paged_kv", "gpu_available", "mask", "merge_state", "merge_states", "planner",
           "reference", "single_decode", "single_prefill", "varlen_attention"]
