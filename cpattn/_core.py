"""The launch side of ``batch_attention``: its parameter struct, the device plan buffer, and run().

Every attention entry point (single, ragged, paged, decode) comes down to the same kernel: a plan
(request-level index arrays plus a work list of items, packed into one device buffer) and a run
(pointers and strides of q, k, v and the outputs, then one launch, plus a merge when split).
"""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _arrays as A
from . import _tma
from . import _driver, _kernels, _tiles, planner

LOG2E = 1.4426950408889634

_PTR_FIELDS = ("q", "k", "v", "o", "lse", "partial_o", "partial_lse", "qo_indptr", "kv_indptr",
               "kv_indices", "kv_lens", "mask", "mask_indptr", "num_items", "item_request",
               "item_q_start", "item_kv_start", "item_kv_end", "tile_class", "item_class_offset",
               "item_state", "item_state_stride", "merge_indptr", "merge_counters")
_STRIDE_FIELDS = ("q_stride_token", "q_stride_head", "k_stride_page", "k_stride_slot",
                  "k_stride_head", "v_stride_page", "v_stride_slot", "v_stride_head")
_INT_FIELDS = ("num_qo_heads", "group_size", "page_size", "causal", "window_left")
_FLOAT_FIELDS = ("logits_scale", "soft_cap_log2")
#: ``AttentionParams`` of kernels_cu/common/attention_params.cuh, field by field (C layout).
PARAMS_DTYPE = np.dtype([(f, np.uint64) for f in _PTR_FIELDS] +
                        [(f, np.int64) for f in _STRIDE_FIELDS] +
                        [(f, np.int32) for f in _INT_FIELDS] +
                        [(f, np.float32) for f in _FLOAT_FIELDS], align=True)
#: Its field names, for membership tests (a frozenset: a tuple scan costs microseconds a plan).
PARAM_NAMES = frozenset(PARAMS_DTYPE.names)

#: The arrays of a plan, in the order they are packed into the device buffer.
PLAN_ARRAYS = ("num_items", "item_request", "item_q_start", "item_kv_start", "item_kv_end",
               "qo_indptr", "kv_indptr", "kv_indices", "kv_lens", "mask_indptr", "merge_indptr",
               "tile_class", "item_class_offset", "item_state", "item_state_stride")


@dataclass(frozen=True)
class Options:
    """Per-plan attention options (everything but the shapes)."""
    causal: bool = False
    sm_scale: Optional[float] = None
    window_left: int = -1
    logits_soft_cap: float = 0.0

    def check(self, has_mask: bool) -> None:
        check_bool(self.causal, "causal")
        if self.sm_scale is not None:
            check_number(self.sm_scale, "sm_scale")
        check_number(self.logits_soft_cap, "logits_soft_cap")
        if self.causal and has_mask:
            raise ValueError("custom_mask and causal=True are mutually exclusive: a custom mask "
                             "already says which keys each query sees; encode causality in it")
        if not isinstance(self.window_left, (int, np.integer)) or \
                isinstance(self.window_left, (bool, np.bool_)) or \
                not -1 <= self.window_left <= A.INT32_MAX:
            raise ValueError("window_left must be an int in [-1, 2^31 - 1] (-1: no window); got "
                             f"{self.window_left!r}")
        if not (math.isfinite(self.logits_soft_cap) and self.logits_soft_cap >= 0):
            raise ValueError("logits_soft_cap must be a finite number >= 0 (0: off); got "
                             f"{self.logits_soft_cap}")
        if self.sm_scale is not None and not (math.isfinite(self.sm_scale) and self.sm_scale > 0):
            raise ValueError(f"sm_scale must be a finite number > 0; got {self.sm_scale}")

    def fill(self, params, head_dim: int) -> None:
        scale = self.sm_scale if self.sm_scale is not None else head_dim ** -0.5
        cap = float(self.logits_soft_cap)
        params["causal"] = int(self.causal)
        # NOTE: a window wider than any request is no window; clamping keeps the kernel's
        # `query + diag - window_left` far from int32 overflow.
        params["window_left"] = min(self.window_left, 1 << 30)
        params["logits_scale"] = scale / cap if cap > 0 else scale * LOG2E
        params["soft_cap_log2"] = cap * LOG2E


def check_bool(value, name: str) -> None:
    """A bool (Python or NumPy): TypeError naming the argument otherwise ("no" is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def check_number(value, name: str) -> None:
    """A real number (not a bool): TypeError naming the argument otherwise."""
    if isinstance(value, (bool, np.bool_)) or \
            not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")


def check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, (bool, np.bool_)) or not isinstance(head_dim, (int, np.integer)):
        raise TypeError(f"head_dim must be an integer; got {type(head_dim).__name__}")
    if head_dim not in _tiles.HEAD_DIMS:
        raise NotImplementedError(f"head_dim {head_dim} is not supported; supported: "
                                  f"{', '.join(map(str, _tiles.HEAD_DIMS))}")


def check_heads(num_qo_heads: int, num_kv_heads: int) -> int:
    num_qo_heads = planner.positive_int(num_qo_heads, "num_qo_heads")
    num_kv_heads = planner.positive_int(num_kv_heads, "num_kv_heads")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a positive multiple of "
                         f"num_kv_heads ({num_kv_heads})")
    return num_qo_heads // num_kv_heads


_HOPPER: dict = {}


def hopper_path() -> bool:
    """Whether tiles run the sm_90a kernels (wgmma prefill, warp-specialised decode): on compute
    capability 9.0, unless ``CPATTN_ARCH_PATH=sm80`` forces the mma.sync kernels that run on any
    GPU from Ampere on."""
    if os.environ.get("CPATTN_ARCH_PATH", "").lower() == "sm80":
        return False
    try:
        import cupy
        device = cupy.cuda.Device()
        if device.id not in _HOPPER:
            _HOPPER[device.id] = _kernels.device_arch(device) == "sm_90a"
    except (ImportError, RuntimeError):  # no CuPy, driver or device (CUDARuntimeError is a
        return False                     # RuntimeError): nothing runs, argument checks still do
    return _HOPPER[device.id]


def choose_tiles(head_dim: int, group: int, max_qo_len: int):
    """Decode tiles when one CTA's 16 rows hold a request's whole (query, head) block; else the
    prefill tiles; Hopper's of either on compute capability 9.0 (``hopper_path``)."""
    hopper = hopper_path()
    decode = (_tiles.DECODE_SM90 if hopper else _tiles.DECODE)[head_dim]
    if max_qo_len * group <= decode.rows:
        return decode
    prefill = (_tiles.PREFILL_SM90 if hopper else _tiles.PREFILL)[head_dim]
    if group > prefill.rows:
        raise NotImplementedError(f"GQA group size {group} (num_qo_heads / num_kv_heads) is "
                                  f"over the {prefill.rows} rows of a CTA")
    return prefill


def partition_prefill(qo_lens, kv_lens, queries_per_item: int, causal: bool):
    """Work list of a prefill: one item per (request, tile of ``queries_per_item`` queries),
    each over the request's whole key range, the costliest first.

    >>> r, qs, ks, ke = partition_prefill(np.array([3, 0, 5]), np.array([3, 4, 9]), 4, False)
    >>> r.tolist(), qs.tolist(), ke.tolist()
    ([2, 2, 0], [0, 4, 0], [9, 9, 3])
    """
    qo_lens = np.asarray(qo_lens, dtype=np.int64)
    kv_lens = np.asarray(kv_lens, dtype=np.int64)
    tiles = -(-qo_lens // queries_per_item)
    request = np.repeat(np.arange(len(qo_lens)), tiles)
    first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
    q_start = (np.arange(len(request)) - first_tile) * queries_per_item
    kv_end = kv_lens[request]
    cost = kv_end
    if causal:  # keys visible to the tile's last query
        last = np.minimum(q_start + queries_per_item, qo_lens[request])
        cost = np.clip(last + kv_end - qo_lens[request], 0, kv_end)
    order = np.argsort(-cost, kind="stable")
    as32 = lambda x: np.ascontiguousarray(x[order], dtype=np.int32)
    return as32(request), as32(q_start), np.zeros(len(order), np.int32), as32(kv_end)


_SMEM_PER_SM = 227 * 1024  # usable shared memory of one SM (Ampere A100 163 KB: fewer CTAs fit)
_NUM_SMS: dict = {}


def num_sms() -> int:
    """Streaming multiprocessors of the current device (read once per device)."""
    import cupy
    device = cupy.cuda.Device()
    if device.id not in _NUM_SMS:
        _NUM_SMS[device.id] = device.attributes["MultiProcessorCount"]
    return _NUM_SMS[device.id]


def ctas_per_sm(cfg, head_dim: int) -> int:
    """CTAs of these tiles resident on one SM: decode tiles are capped by shared memory (up to
    4), prefill tiles by their 255 registers a thread (2), Hopper's by their launch bounds (1)."""
    if isinstance(cfg, _tiles.PERSISTENT):
        return cfg.ctas
    by_smem = max(1, _SMEM_PER_SM // cfg.smem_bytes(head_dim))
    return min(4, by_smem) if cfg.warps_kv > 1 else min(2, by_smem)


def split_prefill(qo_lens, kv_lens, queries_per_item: int, causal: bool, num_kv_heads: int,
                  cfg: _tiles.TileConfig, head_dim: int):
    """Split-KV work for a prefill whose query tiles alone would leave SMs idle (few requests,
    long keys: a shared prefix read by all queries of a cascade, one long request): a
    ``planner.TiledWork`` whose tiles are cut into key chunks, or None when the unsplit work
    list fills the GPU."""
    qo_lens = np.asarray(qo_lens, np.int64)
    tiles = int((-(-qo_lens // queries_per_item)).sum())
    sms, per_sm = num_sms(), ctas_per_sm(cfg, head_dim)
    if tiles * num_kv_heads >= sms * per_sm:
        return None
    work = planner.partition_tiles(qo_lens, kv_lens, queries_per_item, causal, num_kv_heads,
                                   num_sms=sms, ctas_per_sm=per_sm, tile=cfg.tile)
    return work if work.split else None


class SplitMerge:
    """Split-KV partial states ``[states, heads, head_dim]`` fp32 and the merge of them into the
    outputs, kept across a wrapper's plans: the buffers grow as needed, the merge launch is
    rebuilt only when they or its row count change (only its indptr follows the plan buffer).
    With ``fixed`` (CUDA-graph mode) the first buffers must serve every plan: their addresses are
    captured."""

    def __init__(self, wrapper: str, fixed: bool):
        self.wrapper, self.fixed = wrapper, fixed
        self.buffers = None
        self._merge = self._key = None
        self._counters = None
        self.lse_scratch = []  # the lse a merge writes when run() is not asked for one

    def partials(self, states: int, heads: int, head_dim: int, stream=None):
        """The buffers, grown to ``states`` rows on the plan's ``stream`` (the one its runs
        use: buffers replaced here go back to that stream's pool, behind its last run)."""
        import cupy
        have = self.buffers
        if have is None or have[0].shape[0] < states or have[0].shape[1:] != (heads, head_dim):
            if have is not None and self.fixed:
                raise ValueError(f"a CUDA-graph {self.wrapper} keeps the heads and head_dim of "
                                 "its first plan")
            states = max(states, 1)
            with stream or cupy.cuda.get_current_stream():
                self.buffers = (cupy.empty((states, heads, head_dim), np.float32),
                                cupy.empty((states, heads), np.float32))
        return self.buffers

    def counters(self, count: int, stream=None):
        """The counters of a merge fused into the attention kernel (common/fused_merge.cuh),
        ``count`` of them, zero between runs (each run's last chunks set theirs back); grown on
        the plan's stream."""
        import cupy
        if self._counters is None or self._counters.size < count:
            with stream or cupy.cuda.get_current_stream():
                self._counters = cupy.zeros(max(count, 1), np.int32)
        return self._counters

    def merge(self, indptr_ptr: int, rows: int, dtype, merge_indptr=None):
        """The merge of ``rows`` rows; ``merge_indptr`` (host) sizes its launch to the fullest
        row (None: the count is not known, as in a CUDA-graph plan, whose later plans may hold
        more states a row)."""
        from .merge import VarlenMerge, launch_shape
        max_states = None if merge_indptr is None else planner.most_states(merge_indptr)
        v = self.buffers[0]
        shape = launch_shape(rows * v.shape[1], v.shape[2], 16 // v.itemsize, max_states,
                             num_sms())
        key = (id(v), rows, dtype, shape)
        if self._key != key:
            self._merge = VarlenMerge(*self.buffers, 1, indptr_ptr, rows, dtype, shape)
            self._key = key
        self._merge.set_indptr(indptr_ptr)
        return self._merge


_RETIRED: list = []  # (copy event, pinned block) of plan buffers dropped before their copy ran


class PlanBuffer:
    """The plan's int32 arrays in one device buffer, sent by one async copy from pinned memory.

    With ``capacities`` (CUDA graphs) the layout is fixed, so the device pointers a captured
    graph holds stay valid across plans; otherwise the buffer grows as needed.
    """

    def __init__(self, capacities: Optional[dict] = None):
        self.capacities = capacities
        self._device = None
        self._host = None
        self._copied = None  # event after the last copy: the pinned buffer is free again
        self._pinned = None  # the pinned block behind _host
        self._sizes_key = self._offsets = None  # _layout's last sizes and their offsets

    def __del__(self):
        # The pinned block must not return to CuPy's pool (and be handed to another plan) while
        # the last copy from it may still be queued: park it until that copy has run.
        if self._copied is not None and self._pinned is not None and _RETIRED is not None:
            _RETIRED.append((self._copied, self._pinned))

    def upload(self, arrays: dict, stream=None) -> dict:
        """Copy ``arrays`` (name -> 1-D int32 NumPy) to the device; return name -> pointer."""
        import cupy
        sizes = self.capacities or {n: len(a) for n, a in arrays.items()}
        for name, arr in arrays.items():
            if len(arr) > sizes.get(name, -1):
                raise ValueError(f"{name} needs {len(arr)} entries but the fixed plan buffer "
                                 f"holds {sizes.get(name, 0)}; raise the maximum given at "
                                 "construction")
        offsets, total = self._layout(sizes)
        if self._copied is not None:  # the previous copy has read the pinned buffer
            self._copied.synchronize()
        _RETIRED[:] = [(event, block) for event, block in _RETIRED if not event.done]
        if self._device is None or self._device.size < total:
            self._device = cupy.empty(total if self.capacities else int(total * 1.5) + 64, np.int32)
            self._pinned = cupy.cuda.alloc_pinned_memory(self._device.nbytes)
            self._host = np.frombuffer(self._pinned, np.int32, self._device.size)
        for name, arr in arrays.items():
            self._host[offsets[name]:offsets[name] + len(arr)] = arr
        stream = stream or cupy.cuda.get_current_stream()
        self._device.data.copy_from_host_async(self._host.ctypes.data, total * 4, stream)
        if self._copied is None:  # one event, recorded by every plan (no timing: cheaper)
            self._copied = cupy.cuda.Event(disable_timing=True)
        self._copied.record(stream)
        base = self._device.data.ptr
        return {name: base + 4 * off if name in arrays else 0 for name, off in offsets.items()}

    def _layout(self, sizes: dict) -> tuple[dict, int]:
        """Offsets (in int32) of the arrays in the buffer, and its length: 16-byte aligned
        sub-arrays in PLAN_ARRAYS order. Kept for the last sizes (a serving loop's plans often
        repeat them, and capacities never change)."""
        key = tuple(sizes.items())
        if key != self._sizes_key:
            offsets, total = {}, 0
            for name in PLAN_ARRAYS:
                if name in sizes:
                    offsets[name] = total
                    total += -(-max(sizes[name], 1) // 4) * 4
            self._sizes_key, self._offsets = key, (offsets, total)
        return self._offsets


def paged_inputs(q, kv, out, wrapper: str, reference_op: str, kv_layout: str):
    """Take in q, a pool pair (a PagedKVCache or ``(k_pages, v_pages)``) and out: all on the GPU.
    A PagedKVCache's own layout must be the planned one (shapes alone can agree: page_size ==
    num_kv_heads)."""
    layout = getattr(kv, "kv_layout", kv_layout)
    if layout != kv_layout:
        raise ValueError(f"the cache's kv_layout is {layout!r} but the plan was made for "
                         f"{kv_layout!r}")
    if hasattr(kv, "k_pages"):
        k_pages, v_pages = kv.k_pages, kv.v_pages
    elif isinstance(kv, (tuple, list)) and len(kv) == 2:
        k_pages, v_pages = kv
    else:
        raise TypeError("kv must be a PagedKVCache or a (k_pages, v_pages) pair; got "
                        f"{type(kv).__name__}" + (f" of {len(kv)}" if isinstance(kv, (tuple, list))
                                                  else ""))
    arrs, on_gpu = A.intake_all({"q": q, "k_pages": k_pages, "v_pages": v_pages, "out": out})
    if not on_gpu:
        raise TypeError(f"{wrapper} runs CuPy (GPU) arrays; cpattn.reference.{reference_op} is "
                        "the NumPy path")
    return tuple(arrs.values())


def check_paged_run(plan: dict, q, k_pages, v_pages, q_rows: int, q_dims: str) -> None:
    """Run-time checks of q and a paged pool pair against the plan. Full checks the first time
    a layout is seen; afterwards only the 16-byte alignment of the base addresses (the layers
    of a model share shapes and strides, not addresses)."""
    seen = (q.dtype, q.shape, q.strides, k_pages.dtype, k_pages.shape, k_pages.strides,
            v_pages.dtype, v_pages.shape, v_pages.strides)
    if seen == plan.get("checked"):
        if (q.data.ptr | k_pages.data.ptr | v_pages.data.ptr) & 15:
            raise ValueError("q, k_pages and v_pages must be 16-byte aligned")
        return
    hq, hkv = plan["heads"]
    d, ps = plan["head_dim"], plan["page_size"]
    if q.dtype != plan["dtype"]:
        raise ValueError(f"q must have the planned dtype {A.dtype_name(plan['dtype'])}; "
                         f"got {A.dtype_name(q.dtype)}")
    A.check_shape(q, "q", (q_rows, hq, d), q_dims)
    nhd = plan["kv_layout"] == "NHD"
    pool = (None, ps, hkv, d) if nhd else (None, hkv, ps, d)
    dims = ("[num_pages, page_size, num_kv_heads, head_dim]" if nhd
            else "[num_pages, num_kv_heads, page_size, head_dim]")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        A.check_same_dtype(x, name, q, "q")
        A.check_shape(x, name, pool, dims)
        A.check_last_dim_contiguous(x, name)
        A.check_vector_aligned(x, name)
        if plan["max_page"] >= x.shape[0]:
            raise ValueError(f"kv_indices refers to page {plan['max_page']} but {name} has "
                             f"{x.shape[0]} pages")
    A.check_last_dim_contiguous(q, "q")
    A.check_vector_aligned(q, "q")
    plan["checked"] = seen


def kv_strides(pool, kv_layout: str, paged: bool) -> tuple[int, int, int]:
    """(page, slot, head) element strides of a K or V pool / ragged array."""
    s = A.element_strides(pool)
    if not paged:  # ragged [tokens, H, D] or single-request HND [H, tokens, D]
        return (0, s[0], s[1]) if kv_layout == "NHD" else (0, s[1], s[0])
    return (s[0], s[1], s[2]) if kv_layout == "NHD" else (s[0], s[2], s[1])


def run_outputs(q, q_name: str, shape: tuple, dims: str, out, return_lse: bool, need_lse: bool,
                scratch: list):
    """(out, lse) a run() writes: ``out`` checked (dtype of q, ``shape``, C-contiguous, 16-byte
    aligned) or allocated; lse ``shape[:2]`` fp32 when asked for, else, when the launch must
    write one anyway (``need_lse``: split-KV merges do), a reused scratch array from
    ``scratch`` (the wrapper's list, see scratch_lse), else None."""
    import cupy
    if out is None:
        out = cupy.empty(shape, q.dtype)
    elif not (out.dtype == q.dtype and out.shape == shape and out.flags.c_contiguous
              and not out.data.ptr & 15):  # (the steady state passes this one test)
        A.check_same_dtype(out, "out", q, q_name)
        A.check_shape(out, "out", shape, dims)
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        A.check_vector_aligned(out, "out")  # kernels store 16-byte chunks
    if return_lse:
        return out, cupy.empty(shape[:2], np.float32)
    return out, scratch_lse(scratch, shape[:2]) if need_lse else None


def scratch_lse(scratch: list, shape: tuple, stream=None):
    """An fp32 lse ``shape`` (rows, heads) nobody reads, from ``scratch`` (a list the wrapper
    owns: [buffer, the view last handed out]; grown when too small, on ``stream`` or the
    current one)."""
    if scratch:
        have, view = scratch
        if view.shape == shape:
            return view
    else:
        have = None
    if have is None or have.shape[0] < shape[0] or have.shape[1] != shape[1]:
        import cupy
        with stream or cupy.cuda.get_current_stream():
            have = cupy.empty(shape, np.float32)
    scratch[:] = [have, have[:shape[0]]]
    return scratch[1]


def fixed_outputs(outputs, out, wrapper: str):
    """CUDA-graph mode: the wrapper's own (out, lse) buffers; a caller's out= is refused."""
    if out is not None:
        raise ValueError(f"a CUDA-graph {wrapper} writes its own fixed output buffer; out= is "
                         "not accepted")
    return outputs


_SMEM_SET: set = set()
_SMEM_LIMITS: dict = {}


def _smem_limit():
    """Opt-in shared memory per block of the current device (read once per device)."""
    import cupy
    device = cupy.cuda.Device()
    if device.id not in _SMEM_LIMITS:
        _SMEM_LIMITS[device.id] = device.attributes.get("MaxSharedMemoryPerBlockOptin")
    return _SMEM_LIMITS[device.id]


def load_kernel(op: str, targs: tuple, smem: int, what: str, registers: int | None = None):
    """The compiled kernel, its dynamic shared-memory limit raised once; ``what`` names the
    configuration in the error raised when this GPU has too little shared memory for it.

    ``registers``: a warp-specialised kernel's registers a thread at launch. Its warpgroups trade
    registers (setmaxnreg) within the launch's share: built with another share, its consumers
    would wait forever for registers the producer never frees, so that is an error here."""
    limit = _smem_limit()
    if limit is not None and smem > limit:
        raise NotImplementedError(f"{what} needs {smem} bytes of shared memory per block; this "
                                  f"GPU allows {limit}")
    kernel = _kernels.get_kernel(op, targs)
    if registers is not None and kernel.num_regs != registers:
        raise RuntimeError(f"{_kernels.name_expression(op, targs)} was built with "
                           f"{kernel.num_regs} registers a thread; its register split assumes "
                           f"{registers}")
    if id(kernel) not in _SMEM_SET:
        kernel.max_dynamic_shared_size_bytes = smem
        _SMEM_SET.add(id(kernel))
    return kernel


def _attention_kernel(cfg, dtype, head_dim: int):
    return load_kernel(cfg.op, cfg.targs(_kernels.CTYPES[A.dtype_name(dtype)], head_dim),
                       cfg.smem_bytes(head_dim), f"head_dim {head_dim} with these tiles",
                       getattr(cfg, "launch_registers", None))


def preload(cfg: _tiles.TileConfig, dtype, head_dim: int) -> None:
    """Compile and load what run() will launch, so that run() (and a graph capture of it)
    never compiles."""
    _attention_kernel(cfg, dtype, head_dim)


_launch_kernel = _current_stream = None  # CuPy's cuLaunchKernel and current stream (DirectLaunch)

#: ``CUlaunchConfig`` (cuda.h): grid, block, dynamic shared memory, stream, attributes.
LAUNCH_CONFIG_DTYPE = np.dtype({
    "names": ["grid", "block", "smem", "stream", "attrs", "num_attrs"],
    "formats": [(np.uint32, 3), (np.uint32, 3), np.uint32, np.uint64, np.uint64, np.uint32],
    "offsets": [0, 12, 24, 32, 40, 48], "itemsize": 56})
#: ``CUlaunchAttribute``: its id, then its value (a 64-byte union) at offset 8.
LAUNCH_ATTRIBUTE_DTYPE = np.dtype({"names": ["id", "value"], "formats": [np.uint32, np.int32],
                                   "offsets": [0, 8], "itemsize": 72})
_COOPERATIVE = 2  # CU_LAUNCH_ATTRIBUTE_COOPERATIVE
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def launch_attributes(cooperative: bool, dependent: bool) -> np.ndarray:
    """The ``CUlaunchAttribute`` array of a launch, each set to 1.

    >>> launch_attributes(True, True)["id"].tolist(), launch_attributes(False, False).size
    ([2, 6], 0)
    """
    ids = [_COOPERATIVE] * cooperative + [_PROGRAMMATIC_STREAM_SERIALIZATION] * dependent
    attributes = np.zeros(len(ids), LAUNCH_ATTRIBUTE_DTYPE)
    attributes["id"], attributes["value"] = ids, 1
    return attributes


COOPERATIVE_LAUNCH_TOO_LARGE = 720  # CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE


class CooperativeLaunchTooLarge(RuntimeError):
    """A cooperative launch whose CTAs cannot all be resident at once (a GPU shared with other
    processes, under MPS: fewer SMs than the device has); nothing was launched."""


def dependent_launch() -> bool:
    """Whether DirectLaunch launches with programmatic dependent launch: by default on compute
    capability 9.0 (Hopper, where the GPU tests run it, CUDA-graph capture included);
    ``CPATTN_PDL=1`` asks for it on any GPU that has it (9.0 and later), ``CPATTN_PDL=0`` turns
    it off. A kernel so launched may start while the kernel before it in the stream runs its
    last CTAs; it waits for that kernel (all its writes visible) before its first global access
    (kernels_cu/common/grid_dependency.cuh), so only its launch and the set-up of its CTAs
    overlap. Read when a launch is built: a wrapper's first plan of a shape (later plans of
    that shape reuse the launch)."""
    import cupy
    return pdl_for(os.environ.get("CPATTN_PDL", ""), cupy.cuda.Device().compute_capability)


def pdl_for(setting: str, compute_capability: str) -> bool:
    """``dependent_launch`` given the ``CPATTN_PDL`` setting and a CuPy compute capability.

    >>> pdl_for("", "90"), pdl_for("", "100"), pdl_for("1", "100"), pdl_for("1", "86")
    (True, False, True, False)
    >>> pdl_for("0", "90")
    False
    """
    capability = int(compute_capability)
    if setting == "0" or capability < 90:
        return False
    return setting == "1" or capability == 90


class DirectLaunch:
    """``cuLaunchKernel`` on arguments that live in host memory between launches.

    CuPy re-inspects a structured (struct) argument's dtype on every launch, which costs tens of
    microseconds; here each argument is a 0-d NumPy array whose address is taken once, so a launch
    is one driver call. The driver copies the argument bytes when the launch is enqueued, so they
    may be changed right after. Where ``dependent_launch()`` holds, or with ``cooperative`` (every
    CTA resident at once, or the launch fails: CTAs that wait for each other), the call is
    ``cuLaunchKernelEx`` with programmatic stream serialization and / or the cooperative
    attribute (its config kept here too; a launch writes only the stream into it).
    """

    def __init__(self, kernel, grid, block, smem: int, args, cooperative: bool = False):
        global _launch_kernel, _current_stream
        import cupy
        from cupy_backends.cuda.api import driver
        _launch_kernel, _current_stream = driver.launchKernel, cupy.cuda.get_current_stream
        self._check = driver.check_status
        self.func = kernel.kernel.ptr
        self.block = tuple(block) + (1,) * (3 - len(block))
        self.smem = smem
        self.args = [np.asarray(a) for a in args]  # 0-d arrays owning the argument bytes
        self._pointers = np.array([a.ctypes.data for a in self.args], np.uint64)
        self._pointers_address = self._pointers.ctypes.data
        self.dependent = dependent_launch()
        self._configure(cooperative)
        self.grid = grid

    def _configure(self, cooperative: bool) -> None:
        self.cooperative = bool(cooperative)
        self._attribute = launch_attributes(self.cooperative, self.dependent)
        self.extended = self._attribute.size > 0  # launched by cuLaunchKernelEx
        if self.extended:
            self._config = np.zeros((), LAUNCH_CONFIG_DTYPE)
            self._config["block"] = self.block
            self._config["smem"], self._config["num_attrs"] = self.smem, self._attribute.size
            self._config["attrs"] = self._attribute.ctypes.data
            self._config_words = self._config.reshape(1).view(np.uint64)  # [4]: the stream
            self._config_address = self._config.ctypes.data
            # config, function, kernel parameters, extra
            self._launch_ex = _driver.function("cuLaunchKernelEx", *[ctypes.c_void_p] * 4)

    def drop_cooperative(self) -> None:
        """Launch without the cooperative attribute from now on."""
        self._configure(False)
        self.grid = self._grid

    @property
    def grid(self) -> tuple:
        return self._grid

    @grid.setter
    def grid(self, grid) -> None:
        """Set by plans that reuse the launch (``Launcher.set_grid``)."""
        self._grid = tuple(grid) + (1,) * (3 - len(grid))
        if self.extended:
            self._config["grid"] = self._grid

    def __call__(self, stream=None) -> None:
        if self._grid[0] == 0:
            return
        stream = (stream or _current_stream()).ptr
        if self.extended:
            self._config_words[4] = stream
            status = self._launch_ex(self._config_address, self.func, self._pointers_address, None)
            if status == COOPERATIVE_LAUNCH_TOO_LARGE:
                raise CooperativeLaunchTooLarge(
                    f"cooperative launch of {self._grid[0]} CTAs: they cannot all be resident")
            if status:
                self._check(status)
            return
        _launch_kernel(self.func, *self._grid, *self.block, self.smem, stream,
                       self._pointers_address, 0)


class Launcher:
    """One planned launch of batch_attention: kernel, grid and parameter block are fixed by
    plan(); a run only writes the pointers (and, when they change, the strides) of its arrays.
    """

    def __init__(self, params, cfg: _tiles.TileConfig, dtype, head_dim: int, grid_items: int,
                 num_kv_heads: int, kv_layout: str, paged: bool):
        preload(cfg, dtype, head_dim)
        self.params = params
        self._pointers = params.reshape(1).view(np.uint64)[:5]  # q, k, v, o, lse: the first fields
        self.num_kv_heads = num_kv_heads
        # Persistent kernels loop over the works (item, kv head), any grid; the others take one
        # from blockIdx.x (work_item.cuh).
        persistent = isinstance(cfg, _tiles.PERSISTENT)  # the sm_90a kernels
        self._most_ctas = num_sms() * cfg.ctas if persistent else None
        # Hopper: K / V tensor maps for its bulk copies (encoded at run(), _encode_maps).
        self.maps = np.zeros((), _tma.KV_MAPS_DTYPE) if persistent else None
        self._maps_of = None  # (pointers, shapes, strides) the maps were encoded for
        self._maps_kept = _tma.MapsCache()  # such keys -> their maps
        self._box_rows, self.head_dim = cfg.tile, head_dim
        self.launch = DirectLaunch(_attention_kernel(cfg, dtype, head_dim),
                                   self._grid(grid_items), (cfg.threads,),
                                   cfg.smem_bytes(head_dim),
                                   [params] if self.maps is None else [params, self.maps])
        self.kv_layout, self.paged = kv_layout, paged
        self._layout_of = None  # (strides of q, shape and strides of k, v) the strides were set for
        self.merge = None  # split-KV: (VarlenMerge, partial buffers) set by set_split()
        self._lse_scratch = []  # the lse of split runs asked for none (set_split: the wrapper's)

    def set_split(self, work, split: SplitMerge, num_qo_heads: int, head_dim: int,
                  indptr_ptr: int, dtype, stream=None) -> None:
        """Write fp32 partial states per the split ``work`` (a planner.TiledWork whose arrays
        were uploaded with the plan) and merge them into the outputs after each launch, with the
        partials, merge and scratch lse of ``split`` (a wrapper's, kept across its plans; grown
        on the plan's ``stream``, the one its runs use)."""
        partial_o, partial_lse = split.partials(work.num_states, num_qo_heads, head_dim, stream)
        self.params["partial_o"], self.params["partial_lse"] = (partial_o.data.ptr,
                                                                partial_lse.data.ptr)
        rows = work.merge_indptr.shape[0] - 1
        self.merge = (split.merge(indptr_ptr, rows, dtype, work.merge_indptr), partial_o,
                      partial_lse)
        self._lse_scratch = split.lse_scratch

    def _encode_maps(self, k, v) -> None:
        """Tensor maps of K and V (``_tma.row_boxes``), re-encoded when an array changes (kept
        per pair of arrays: ``_tma.MapsCache``); disabled (the kernel copies by cp.async) when
        the layout does not suit them."""
        seen = (k.data.ptr, v.data.ptr, k.shape, v.shape, k.strides, v.strides)
        if seen == self._maps_of:
            return
        self._maps_kept.fill(self.maps, seen, lambda maps: self._encode_maps_now(k, v))
        self._maps_of = seen

    def _encode_maps_now(self, k, v) -> None:
        strides = [kv_strides(x, self.kv_layout, self.paged) for x in (k, v)]
        boxes = [_tma.row_boxes(x.shape, strides, self.kv_layout, self.paged, self.head_dim,
                                self._box_rows) for x in (k, v)]  # K and V: their own rows
        enabled = all(b is not None for b in boxes)
        if enabled:
            try:
                for name, x, (rows, heads, box), (_, slot, head) in zip(("k", "v"), (k, v), boxes,
                                                                         strides):
                    _tma.encode_rows(self.maps[name], x.data.ptr, rows, heads, self.head_dim,
                                     slot, head, box)
            except RuntimeError:  # a layout the driver's limits reject: copy by cp.async
                enabled = False
        self.maps["enabled"] = int(enabled)

    def _grid(self, grid_items: int) -> tuple[int, int, int]:
        ctas = grid_items * self.num_kv_heads
        return (ctas if self._most_ctas is None else min(ctas, self._most_ctas), 1, 1)

    def set_grid(self, grid_items: int) -> None:
        self.launch.grid = self._grid(grid_items)

    def __call__(self, q, k, v, out, lse, stream=None) -> None:
        params = self.params
        layout = (q.strides, k.shape, k.strides, v.strides)
        if layout != self._layout_of:
            qs = A.element_strides(q)
            params["q_stride_token"], params["q_stride_head"] = qs[0], qs[1]
            for prefix, x in (("k", k), ("v", v)):
                page, slot, head = kv_strides(x, self.kv_layout, self.paged)
                params[prefix + "_stride_page"] = page
                params[prefix + "_stride_slot"] = slot
                params[prefix + "_stride_head"] = head
            self._layout_of = layout
        if self.maps is not None:
            self._encode_maps(k, v)
        if self.merge is not None:  # the kernel writes partial states; the merge, out and lse
            if lse is None:  # (a scratch lse, allocated on the launch stream once)
                lse = scratch_lse(self._lse_scratch, out.shape[:2], stream)
            self._pointers[:] = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, 0)
            self.launch(stream)
            self.merge[0](out, lse, stream)
            return
        self._pointers[:] = (q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr,
                             0 if lse is None else lse.data.ptr)
        self.launch(stream)


def require_graph_limits(**limits) -> None:
    """use_cuda_graph=True: every named maximum must be given (the buffers a captured graph
    uses are sized once, at construction or first plan)."""
    missing = [name for name, value in limits.items() if value is None]
    if missing:
        raise ValueError(f"use_cuda_graph=True needs {', '.join(limits)}; missing: "
                         f"{', '.join(missing)} (the buffers a captured graph uses are sized once)")
    for name, value in limits.items():
        planner.positive_int(value, name)


def check_graph_fits(wrapper: str, batch: int, total_q: int, num_pages: int,
                     max_batch_size: int, max_total_q: int, max_num_pages: int) -> None:
    """CUDA-graph mode: a plan must fit the buffers sized at construction (checked before the
    first plan fixes anything)."""
    for what, have, most, name in (("batch", batch, max_batch_size, "max_batch_size"),
                                   ("qo_indptr[-1]", total_q, max_total_q, "max_total_q"),
                                   ("kv_indptr[-1]", num_pages, max_num_pages, "max_num_pages")):
        if have > most:
            raise ValueError(f"{what}={have} is over {name}={most} of this CUDA-graph {wrapper}")


def check_graph_pages(pool_pages, kv_indices) -> None:
    """CUDA-graph mode: a replay skips run()'s checks, so plan() checks the page ids against
    the pools the first run saw (``pool_pages``; None before it, when run() checks them)."""
    if pool_pages is not None and kv_indices.size and int(kv_indices.max()) >= pool_pages:
        raise ValueError(f"kv_indices refers to page {int(kv_indices.max())} but the pools this "
                         f"CUDA-graph wrapper runs on have {pool_pages} pages")


class GraphPrefill:
    """The fixed side of a CUDA-graph prefill wrapper: the plan buffer's capacities, one launch
    whose parameters later plans rewrite in place, the split-KV partials and their merge, and
    the outputs. A captured run() replays after any later plan that fits them.

    Everything is sized and allocated by the first plan (never inside a capture); later plans
    must keep its shapes and options. Every plan takes the split path over a fixed grid, so the
    launch arguments a graph holds stay valid.
    """

    def __init__(self, max_batch_size: int, max_num_pages: int, max_total_q: int,
                 max_items: int = 0):
        for name, value in (("max_batch_size", max_batch_size), ("max_num_pages", max_num_pages),
                            ("max_total_q", max_total_q)):
            planner.positive_int(value, name)
        planner.positive_int(max_items, "max_items", 0)  # 0: the default
        self.max_batch_size, self.max_num_pages = max_batch_size, max_num_pages
        self.max_total_q, self.max_items = max_total_q, max_items
        self.key = None
        self.buffer = self.launch = self.outputs = None
        self.pool_pages = None  # pages of the pools the first run saw
        self.items = self.states = 0

    def setup(self, key, cfg: _tiles.TileConfig, dtype, head_dim: int, num_qo_heads: int,
              num_kv_heads: int, kv_layout: str) -> None:
        if self.key is not None:
            if key != self.key:
                raise ValueError("a CUDA-graph wrapper keeps the heads, head_dim, page_size, "
                                 "dtype, layout and options (causal, sm_scale, window_left, "
                                 "logits_soft_cap) of its first plan; make a new one")
            return
        import cupy
        per_item = cfg.rows // (num_qo_heads // num_kv_heads)
        slots = num_sms() * ctas_per_sm(cfg, head_dim)
        tiles = self.max_batch_size + self.max_total_q // per_item  # query tiles, at most
        self.items = self.max_items or tiles + slots
        # Cut tiles add states only while the GPU is underfilled (fewer tiles than slots).
        self.states = self.max_total_q + per_item * slots
        items = self.items
        self.buffer = PlanBuffer(dict(
            num_items=1, qo_indptr=self.max_batch_size + 1, kv_indptr=self.max_batch_size + 1,
            kv_indices=self.max_num_pages, kv_lens=self.max_batch_size,
            merge_indptr=self.max_total_q + 1,
            **{n: items for n in ("item_request", "item_q_start", "item_kv_start", "item_kv_end",
                                  "item_state", "item_state_stride")}))
        params = np.zeros((), PARAMS_DTYPE)
        self.launch = Launcher(params, cfg, dtype, head_dim, items, num_kv_heads, kv_layout,
                               paged=True)
        split = SplitMerge("BatchPrefillPaged", fixed=True)
        partial_o, partial_lse = split.partials(self.states, num_qo_heads, head_dim)
        params["partial_o"], params["partial_lse"] = partial_o.data.ptr, partial_lse.data.ptr
        self.launch.merge = (split.merge(0, self.max_total_q, dtype), partial_o, partial_lse)
        self.outputs = (cupy.empty((self.max_total_q, num_qo_heads, head_dim), dtype),
                        cupy.empty((self.max_total_q, num_qo_heads), np.float32))
        self.key = key

    def check(self, batch: int, total_q: int, num_pages: int) -> None:
        check_graph_fits("BatchPrefillPaged", batch, total_q, num_pages, self.max_batch_size,
                         self.max_total_q, self.max_num_pages)
