"""Merging attention states computed over disjoint sets of keys.

A state of one (token, head) is ``(v, s)``: the attention output over some keys and the natural-log
``lse = log(sum(exp(scores)))`` over them. The state over the union of two key sets is::

    s = log(exp(s_a) + exp(s_b))
    v = (exp(s_a - s) * v_a) + (exp(s_b - s) * v_b)

An empty state (``s = -inf``) contributes nothing; merging only empty states gives ``v = 0`` and
``s = -inf``. Split-KV decode and cascade (shared-prefix) attention both end with a merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _arrays as A
from . import _kernels, reference

#: dtypes of v (lse is always float32).
MERGE_DTYPES = (A.FLOAT16, A.BFLOAT16, A.FLOAT32)
_ROW_THREADS = 128  # threads per block: rows_per_block = 128 // (head_dim / VEC) (one state lane)
_STATE_LANES = 4  # lanes of threads sharing a row's states when their count is not known
_MOST_LANES = 16  # lanes when it is: one batch of _BATCH states a lane, up to 16 x 8 = 128 states
_BATCH = 8  # states a thread loads before merging them: merge_view's BATCH

#: Strides (in elements) of one input view of the kernel: ``StateView`` in merge_state.cu.
_STATE_VIEW = np.dtype([(f, np.int64) for f in
                        ("v_token", "v_state", "v_head", "s_token", "s_state", "s_head")] +
                       [("indptr", np.uint64)], align=True)


def merge_state(v_a, s_a, v_b, s_b, *, stream=None):
    """Merge two attention states of the same tokens and heads.

    Parameters
    ----------
    v_a, v_b : array [n, num_heads, head_dim], float16 / bfloat16 / float32 (one dtype)
    s_a, s_b : array [n, num_heads], float32, natural-log lse (``-inf`` for an empty state)
    stream : cupy.cuda.Stream, optional; default: CuPy's current stream

    Returns
    -------
    (v [n, num_heads, head_dim] in v_a's dtype, s [n, num_heads] float32)
    """
    arrs, on_gpu = A.intake_all({"v_a": v_a, "s_a": s_a, "v_b": v_b, "s_b": s_b})
    v_a, s_a, v_b, s_b = arrs.values()
    _check_v(v_a, "v_a", ndim=3, on_gpu=on_gpu)
    n, heads, dim = v_a.shape
    A.check_shape(v_b, "v_b", (n, heads, dim), "[n, num_heads, head_dim]")
    A.check_same_dtype(v_b, "v_b", v_a, "v_a")
    for name, s in (("s_a", s_a), ("s_b", s_b)):
        A.check_shape(s, name, (n, heads), "[n, num_heads]")
        A.check_dtype(s, name, (A.FLOAT32,))
    if not on_gpu:
        v, s = reference.merge_state(v_a, s_a, v_b, s_b)
        return v.astype(v_a.dtype), s.astype(np.float32)
    A.check_last_dim_contiguous(v_b, "v_b")
    A.check_vector_aligned(v_b, "v_b")
    view_a = _view(v_a[:, None], s_a[:, None])
    view_b = _view(v_b[:, None], s_b[:, None])
    return _launch(v_a, s_a, view_a, 1, v_b, s_b, view_b, 1, (n, heads, dim), stream)


def merge_states(v, s, *, stream=None):
    """Merge ``num_states`` attention states of each token and head into one.

    Parameters
    ----------
    v : array [n, num_states, num_heads, head_dim], float16 / bfloat16 / float32
    s : array [n, num_states, num_heads], float32, natural-log lse
    stream : cupy.cuda.Stream, optional

    Returns
    -------
    (v [n, num_heads, head_dim] in v's dtype, s [n, num_heads] float32); with ``num_states = 0``
    every row is empty: ``v = 0``, ``s = -inf``.
    """
    arrs, on_gpu = A.intake_all({"v": v, "s": s})
    v, s = arrs["v"], arrs["s"]
    _check_v(v, "v", ndim=4, on_gpu=on_gpu)
    n, num_states, heads, dim = v.shape
    A.check_shape(s, "s", (n, num_states, heads), "[n, num_states, num_heads]")
    A.check_dtype(s, "s", (A.FLOAT32,))
    if not on_gpu:
        out, lse = reference.merge_states(v, s)
        return out.astype(v.dtype), lse.astype(np.float32)
    return _launch(v, s, _view(v, s), num_states, v, s, _view(v, s), 0, (n, heads, dim), stream)


def _check_v(v, name: str, ndim: int, on_gpu: bool) -> None:
    """dtype and rank always; what the kernel's 16-byte vectors need only on the GPU."""
    A.check_dtype(v, name, MERGE_DTYPES)
    if v.ndim != ndim:
        dims = "[n, num_heads, head_dim]" if ndim == 3 else "[n, num_states, num_heads, head_dim]"
        raise ValueError(f"{name} must have shape {dims}; got {tuple(v.shape)}")
    if not on_gpu:
        return
    vec = 16 // v.itemsize
    if v.shape[-1] < vec or v.shape[-1] % vec or v.shape[-1] // vec > _ROW_THREADS * 8:
        raise NotImplementedError(f"{name}: head_dim must be a multiple of {vec} from {vec} to "
                                  f"{_ROW_THREADS * 8 * vec} for {A.dtype_name(v.dtype)}; "
                                  f"got {v.shape[-1]}")
    A.check_last_dim_contiguous(v, name)
    A.check_vector_aligned(v, name)


@dataclass(frozen=True)
class LaunchShape:
    """How merge_state_kernel covers ``rows`` rows of ``dim`` elements (merge_state.cu): blocks
    of ``threads_x`` x ``rows_per_block`` x ``lanes`` threads, ``slices`` blocks across a row's
    dims."""
    threads_x: int
    rows_per_block: int
    lanes: int
    slices: int

    def grid(self, rows: int) -> tuple[int, int]:
        return (-(-rows // self.rows_per_block), self.slices)

    def block(self) -> tuple[int, int, int]:
        return (self.threads_x, self.rows_per_block, self.lanes)

    def smem_bytes(self, vec: int) -> int:
        """The lanes' normalised states (VEC values + lse a thread), when there are lanes."""
        if self.lanes == 1:
            return 0
        return self.lanes * self.rows_per_block * self.threads_x * (vec + 1) * 4


def launch_shape(rows: int, dim: int, vec: int, max_states: Optional[int],
                 num_sms: int = 132) -> LaunchShape:
    """The mapping for rows of at most ``max_states`` states (None: not known, as a CUDA-graph
    plan's): enough lanes that each loads one batch of 8 states (a few states: one lane, small
    blocks, many of them on an SM); and when the rows are few (a long request split over the
    keys), their dims cut into slices of at least 8 threads toward ``4 num_sms`` blocks.
    On an H200, MLA with 16 heads (partials of 512 fp32 dims), against 4 lanes of whole rows
    for every merge: B64 L4096 (1024 rows of 2 states) 2783 -> 3213 GB/s, 0.76x -> 0.88x
    FlashInfer; B1 L32768 (16 rows of 128 states) 1201 -> 1447 GB/s (benchmarks/NOTES.md v17)."""
    threads_x = dim // vec
    if max_states is None:
        lanes = _STATE_LANES
    else:
        lanes = min(_MOST_LANES, max(1, -(-max_states // _BATCH)))
    slices = 1  # (only while a block holds one row: halving it otherwise packs more rows)
    while (rows * slices < 4 * num_sms and threads_x % 2 == 0 and threads_x >= 16
           and threads_x * lanes >= 2 * _ROW_THREADS):
        threads_x //= 2
        slices *= 2
    while threads_x * lanes > 1024:
        lanes //= 2
    rows_per_block = max(1, _ROW_THREADS // (threads_x * lanes))
    return LaunchShape(threads_x, rows_per_block, lanes, slices)


def _view(v, s):
    """Element strides of v [n, S, H, D] and s [n, S, H] as the kernel's StateView."""
    vs, ss = A.element_strides(v), A.element_strides(s)
    return np.array((vs[0], vs[1], vs[2], ss[0], ss[1], ss[2], 0), dtype=_STATE_VIEW)[()]


class VarlenMerge:
    """A planned merge of variable-length states into ``[rows, H, D]`` outputs.

    Row n's states are ``indptr[n]:indptr[n + 1]`` (a device int32 array at ``indptr_ptr``) of
    ``v [*, H, D]`` fp32 / ``s [*, H]`` viewed with ``state_stride`` rows between states: split-KV
    partials, where each request was cut into its own number of chunks. Built for a shape and
    kept across plans (``set_indptr`` follows the plan buffer); a call only passes the outputs.
    """

    def __init__(self, v, s, state_stride: int, indptr_ptr: int, rows: int, out_dtype,
                 shape: LaunchShape):
        heads, dim = v.shape[-2], v.shape[-1]
        view = np.array((0, state_stride * heads * dim, dim, 0, state_stride * heads, 1,
                         indptr_ptr), dtype=_STATE_VIEW)[()]
        no_states = np.zeros((), dtype=_STATE_VIEW)[()]  # view b: nothing (its indptr is null)
        kernel = _kernels.get_kernel(
            "merge_state", (_kernels.CTYPES[A.dtype_name(v.dtype)],
                            _kernels.CTYPES[A.dtype_name(np.dtype(out_dtype))]))
        pointer = lambda x: np.uint64(x.data.ptr)
        self._out = [np.uint64(0), np.uint64(0)]  # v_out, s_out: set on each call
        args = [pointer(v), pointer(s), view, np.int32(0), pointer(v), pointer(s), no_states,
                np.int32(0), *self._out, np.int32(rows), np.int32(heads), np.int32(dim)]
        from ._core import DirectLaunch
        self.launch = DirectLaunch(kernel, shape.grid(rows * heads), shape.block(),
                                   shape.smem_bytes(16 // v.itemsize), args)
        self._out = self.launch.args[8:10]

    def set_indptr(self, indptr_ptr: int) -> None:
        self.launch.args[2]["indptr"] = indptr_ptr

    def __call__(self, v_out, s_out, stream=None) -> None:
        self._out[0][()] = v_out.data.ptr
        self._out[1][()] = s_out.data.ptr
        self.launch(stream)


def _launch(v_a, s_a, view_a, states_a, v_b, s_b, view_b, states_b, shape, stream):
    import cupy
    n, heads, dim = shape
    v_out = cupy.empty((n, heads, dim), dtype=v_a.dtype)
    s_out = cupy.empty((n, heads), dtype=np.float32)
    rows = n * heads
    if rows == 0:
        return v_out, s_out
    from ._core import num_sms
    vec = 16 // v_a.itemsize
    shape = launch_shape(rows, dim, vec, states_a + states_b, num_sms())
    kernel = _kernels.get_kernel("merge_state", (_kernels.CTYPES[A.dtype_name(v_a.dtype)],
                                                 _kernels.CTYPES[A.dtype_name(v_out.dtype)]))
    args = (v_a, s_a, view_a, np.int32(states_a), v_b, s_b, view_b, np.int32(states_b),
            v_out, s_out, np.int32(n), np.int32(heads), np.int32(dim))
    with stream or cupy.cuda.get_current_stream():
        kernel(shape.grid(rows), shape.block(), args, shared_mem=shape.smem_bytes(vec))
    return v_out, s_out
