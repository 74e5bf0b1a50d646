"""Paged KV cache: page pools, a page allocator with per-sequence page tables, and appending the
K/V of new tokens.

A pool holds ``num_pages`` pages of ``page_size`` token slots:
``[num_pages, page_size, num_kv_heads, head_dim]`` ("NHD") or
``[num_pages, num_kv_heads, page_size, head_dim]`` ("HND"). Token t of a sequence lives in slot
``t % page_size`` of its page ``t // page_size``; ``page_table()`` gives the ``kv_indptr``,
``kv_indices``, ``kv_last_page_len`` and ``kv_lens`` arrays that BatchDecode and BatchPrefillPaged
take.

Two levels:

- :class:`PagedKVCache` owns (or adopts) the pools and the page tables: ``add_sequence``,
  ``grow``, ``append``, ``free``, ``page_table``.
- :func:`append_paged_kv` writes into pools whose page tables the caller manages.

Device follows the data: CuPy pools are written by the ``append_paged_kv`` CUDA kernel, NumPy
pools by NumPy indexing, with the same result.
"""
from __future__ import annotations

import array

import numpy as np

from . import _arrays as A
from . import _kernels
from .planner import host_index, pages_per_request, positive_int

__all__ = ["KV_LAYOUTS", "OutOfPagesError", "PagedKVCache", "append_paged_kv", "page_strides",
           "pool_shape"]

KV_LAYOUTS = ("NHD", "HND")
_THREADS = 128  # threads per block of the append kernel

#: ``PageStrides`` of kernels_cu/common/paged.cuh: element strides of a pool.
PAGE_STRIDES = np.dtype([("page", np.int64), ("slot", np.int64), ("head", np.int64)])
#: ``NewStrides`` of kernels_cu/append_paged_kv.cu: element strides of the new tokens' K and V.
_NEW_STRIDES = np.dtype([(f, np.int64) for f in ("k_token", "k_head", "v_token", "v_head")])


class OutOfPagesError(RuntimeError):
    """A PagedKVCache has too few free pages for a request; nothing was allocated."""


# ---- pools -----------------------------------------------------------------------------------

def check_layout(kv_layout) -> None:
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' or 'HND'; got {kv_layout!r}")


def pool_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
               kv_layout: str = "NHD") -> tuple[int, int, int, int]:
    """Shape of a K or V pool: ``[num_pages, page_size, H, D]`` (NHD), ``[num_pages, H,
    page_size, D]`` (HND)."""
    check_layout(kv_layout)
    if kv_layout == "NHD":
        return (num_pages, page_size, num_kv_heads, head_dim)
    return (num_pages, num_kv_heads, page_size, head_dim)


def _pool_dims(kv_layout: str) -> str:
    return ("[num_pages, page_size, num_kv_heads, head_dim]" if kv_layout == "NHD"
            else "[num_pages, num_kv_heads, page_size, head_dim]")


def page_strides(pool, kv_layout: str):
    """Element strides of a pool as the kernels' ``PageStrides {page, slot, head}`` (a NumPy
    structured scalar, passed to a kernel by value)."""
    s = A.element_strides(pool)
    slot, head = (s[1], s[2]) if kv_layout == "NHD" else (s[2], s[1])
    return np.array((s[0], slot, head), dtype=PAGE_STRIDES)[()]


def check_pools(k_pages, v_pages, kv_layout: str) -> tuple[int, int, int]:
    """Validate a K and a V pool (already taken in); return ``(num_pages, page_size,
    num_kv_heads)``. They may differ in head_dim only."""
    check_layout(kv_layout)
    dims = _pool_dims(kv_layout)
    for name, pool in (("k_pages", k_pages), ("v_pages", v_pages)):
        if pool.ndim != 4:
            raise ValueError(f"{name} must have shape {dims}; got {tuple(pool.shape)}")
        A.check_dtype(pool, name, A.ATTENTION_DTYPES)
        _check_head_dim(pool.shape[3], pool.dtype, f"{name}.shape[3] (head_dim)")
        A.check_last_dim_contiguous(pool, name)
        if A.is_gpu(pool):
            A.check_vector_aligned(pool, name)
        elif not pool.flags.writeable:
            raise ValueError(f"{name} is read-only; the cache is written in place")
    A.check_same_dtype(v_pages, "v_pages", k_pages, "k_pages")
    if k_pages.shape[:3] != v_pages.shape[:3]:
        want = "(" + ", ".join(str(n) for n in k_pages.shape[:3]) + ", *)"
        raise ValueError(f"v_pages must have shape {dims} = {want} like k_pages but for "
                         f"head_dim; got {tuple(v_pages.shape)}")
    num_pages, a, b = k_pages.shape[:3]
    page_size, heads = (a, b) if kv_layout == "NHD" else (b, a)
    if num_pages > A.INT32_MAX:
        raise ValueError(f"k_pages holds {num_pages} pages; page ids are int32 (< 2^31)")
    return num_pages, page_size, heads


def _check_head_dim(head_dim: int, dtype, name: str) -> None:
    vec = 16 // np.dtype(dtype).itemsize
    if head_dim < 1 or head_dim % vec:
        raise NotImplementedError(f"{name} must be a positive multiple of {vec} for "
                                  f"{A.dtype_name(dtype)} (16-byte vectors); got {head_dim}")


def _check_new(k_new, v_new, k_pages, v_pages, num_kv_heads: int) -> None:
    """k_new / v_new [total_new, H, D] in the pools' dtype and head_dim."""
    total_new = None
    for name, new, pool in (("k_new", k_new, k_pages), ("v_new", v_new, v_pages)):
        A.check_shape(new, name, (total_new, num_kv_heads, pool.shape[3]),
                      "[total_new, num_kv_heads, head_dim]")
        total_new = new.shape[0]
        A.check_same_dtype(new, name, pool, name[0] + "_pages")
        A.check_last_dim_contiguous(new, name)
        if A.is_gpu(new):
            A.check_vector_aligned(new, name)


# ---- writing tokens --------------------------------------------------------------------------

def append_paged_kv(k_pages, v_pages, k_new, v_new, append_indptr, kv_indptr, kv_indices,
                    seq_lens_before, *, kv_layout: str = "NHD", stream=None) -> None:
    """Write the K/V of new tokens into a paged cache whose page tables the caller manages.

    The new tokens of request b, rows ``append_indptr[b]:append_indptr[b + 1]`` of k_new / v_new,
    go to its positions ``seq_lens_before[b] ...`` in the pages
    ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``, which must already hold room for them.

    Parameters
    ----------
    k_pages, v_pages : [num_pages, page_size, H, D] (NHD) or [num_pages, H, page_size, D] (HND),
        float16 / bfloat16, written in place (CuPy, NumPy, or any DLPack tensor: no copy)
    k_new, v_new : [total_new, H, D], the pools' dtype, on the pools' side (GPU or CPU)
    append_indptr : int32 [batch + 1], new tokens per request; ends at total_new
    kv_indptr : int32 [batch + 1], pages per request (after the append); ends at len(kv_indices)
    kv_indices : int32 [kv_indptr[-1]], page ids in [0, num_pages)
    seq_lens_before : int32 [batch], tokens each request held before
    kv_layout : "NHD" | "HND"
    stream : cupy.cuda.Stream, optional; default: CuPy's current stream

    Index arrays are read on the host (CuPy ones are copied there, which syncs). Everything is
    checked before the launch: each new token's page must exist (``seq_lens_before[b] + new <=
    pages * page_size``), with an id in range, and no two tokens may share a slot.
    """
    arrs, on_gpu = A.intake_all({"k_pages": k_pages, "v_pages": v_pages, "k_new": k_new,
                                 "v_new": v_new})
    k_pages, v_pages, k_new, v_new = arrs.values()
    num_pages, page_size, heads = check_pools(k_pages, v_pages, kv_layout)
    append_indptr = host_index(append_indptr, "append_indptr")
    new_counts = pages_per_request(append_indptr, "append_indptr")
    batch = new_counts.shape[0]
    total_new = int(append_indptr[-1])
    _check_new(k_new, v_new, k_pages, v_pages, heads)
    if total_new != k_new.shape[0]:
        raise ValueError(f"append_indptr must end at k_new.shape[0]={k_new.shape[0]}; "
                         f"got append_indptr[-1]={total_new}")
    kv_indptr = host_index(kv_indptr, "kv_indptr", batch + 1)
    kv_indices = host_index(kv_indices, "kv_indices")
    pages = pages_per_request(kv_indptr)
    if kv_indptr[-1] != kv_indices.shape[0]:
        raise ValueError(f"kv_indptr must end at len(kv_indices)={kv_indices.shape[0]}; "
                         f"got kv_indptr[-1]={kv_indptr[-1]}")
    before = host_index(seq_lens_before, "seq_lens_before", batch).astype(np.int64)
    if batch and before.min() < 0:
        b = int(np.flatnonzero(before < 0)[0])
        raise ValueError(f"seq_lens_before must be >= 0; got seq_lens_before[{b}]={before[b]}")
    short = np.flatnonzero(before + new_counts > pages * page_size)
    if short.size:
        b = int(short[0])
        raise ValueError(f"request {b} needs {before[b] + new_counts[b]} token slots "
                         f"(seq_lens_before[{b}]={before[b]} + {new_counts[b]} new) but owns "
                         f"{pages[b]} pages of page_size={page_size} "
                         f"({pages[b] * page_size} slots)")
    entry, slot = _token_slots(append_indptr, new_counts, kv_indptr, before, page_size)
    page = kv_indices[entry]
    if page.size and page.view(np.uint32).max() >= num_pages:  # negative ids too, as uint32
        i = int(np.flatnonzero((page < 0) | (page >= num_pages))[0])
        raise ValueError(f"kv_indices[{entry[i]}]={page[i]} is out of range [0, num_pages="
                         f"{num_pages}) (the page of new token {i})")
    _check_distinct_slots(page, slot, page_size)
    _write(k_pages, v_pages, k_new, v_new, page, slot, kv_layout, stream)


def _token_slots(append_indptr, new_counts, kv_indptr, before, page_size: int):
    """For each new token: its entry in kv_indices and its slot in that page, int64 [total_new].

    New token i of request b (row ``append_indptr[b] + i``) goes to position
    ``before[b] + i``, entry ``kv_indptr[b] + position // page_size``, slot
    ``position % page_size``.
    """
    batch = new_counts.shape[0]
    request = np.arange(batch).repeat(new_counts)
    position = np.arange(int(append_indptr[-1]), dtype=np.int64)
    position += (before - append_indptr[:-1])[request]
    entry = kv_indptr[:-1][request] + position // page_size
    return entry, position % page_size


def _check_distinct_slots(page, slot, page_size: int) -> None:
    """No two new tokens may write one slot (pages shared between requests could cause it)."""
    if page.shape[0] < 2:
        return
    key = page.astype(np.int64) * page_size + slot
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order[1:]] == key[order[:-1]])
    if same.size:
        i, j = order[same[0]], order[same[0] + 1]
        raise ValueError(f"new tokens {i} and {j} would both write slot {slot[i]} of page "
                         f"{page[i]}; a slot takes one token")


def _write(k_pages, v_pages, k_new, v_new, page, slot, kv_layout: str, stream) -> None:
    """Store row t of k_new / v_new at (page[t], slot[t]); indices already checked."""
    if page.shape[0] == 0:
        return
    if not A.is_gpu(k_pages):
        if kv_layout == "NHD":
            k_pages[page, slot] = k_new
            v_pages[page, slot] = v_new
        else:  # advanced indices around a slice: the indexed axis comes first, [n, H, D]
            k_pages[page, :, slot] = k_new
            v_pages[page, :, slot] = v_new
        return
    _launch(k_pages, v_pages, k_new, v_new, page, slot, kv_layout, stream)


def _launch(k_pages, v_pages, k_new, v_new, page, slot, kv_layout: str, stream) -> None:
    import cupy
    num_new, heads, dim_k = k_new.shape
    dim_v = v_new.shape[2]
    vec = 16 // k_new.itemsize
    threads_x = min(max(dim_k, dim_v) // vec, _THREADS)
    rows_per_block = max(1, _THREADS // threads_x)
    rows = num_new * heads
    grid = (-(-rows // rows_per_block),)
    kernel = _kernels.get_kernel("append_paged_kv", (_kernels.CTYPES[A.dtype_name(k_new.dtype)],))
    ks, vs = A.element_strides(k_new), A.element_strides(v_new)
    new_strides = np.array((ks[0], ks[1], vs[0], vs[1]), dtype=_NEW_STRIDES)[()]
    host = np.empty((2, num_new), dtype=np.int32)  # page ids, then slots: one transfer
    host[0], host[1] = page, slot
    with stream or cupy.cuda.get_current_stream():
        dev = cupy.asarray(host)
        kernel(grid, (threads_x, rows_per_block),
               (k_pages, v_pages, page_strides(k_pages, kv_layout),
                page_strides(v_pages, kv_layout), k_new, v_new, new_strides, dev[0], dev[1],
                np.int32(num_new), np.int32(heads), np.int32(dim_k), np.int32(dim_v)))


# ---- the cache -------------------------------------------------------------------------------

# A C int array of 4 bytes: page ids as int32.
_INT32_CODE = next(code for code in "ilh" if array.array(code).itemsize == 4)


def check_id_sequence(seq_ids):
    """``seq_ids`` itself when it is a sequence of ids. A str is iterable (its characters would
    pass for ids) and an int is not: either is one id, a TypeError here."""
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
        raise TypeError(f"seq_ids must be a sequence of ids (a list or an array), not one "
                        f"{type(seq_ids).__name__}; got {seq_ids!r}")
    return seq_ids


class _PageTables:
    """The page allocator: free page ids and, per sequence, its token count and page ids.

    A sequence occupies a row: its length is ``lengths[row]`` (NumPy, so a batch reads and
    writes them at once) and its pages ``pages[row]``. A sequence of n tokens holds exactly
    ``ceil(n / page_size)`` pages.

    NOTE: a row's page ids are an ``array.array``: it grows in place, and ``bytearray().join``
    concatenates a batch of them about five times faster than ``numpy.concatenate``, which is
    most of what building a page table costs.
    """

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        # Free page ids as a stack whose top is the end: page 0 is handed out first.
        self.free_ids = np.arange(num_pages - 1, -1, -1, dtype=np.int32)
        self.num_free = num_pages
        self.row_of: dict = {}
        self.pages: list[array.array] = []
        self.lengths = np.zeros(0, dtype=np.int64)
        self.spare_rows: list[int] = []

    def add(self, seq_id) -> None:
        try:
            known = seq_id in self.row_of
        except TypeError:
            raise TypeError(f"sequence ids must be hashable; got {type(seq_id).__name__}") from None
        if known:
            raise ValueError(f"sequence {seq_id!r} already exists")
        if self.spare_rows:
            row = self.spare_rows.pop()
        else:
            row = len(self.pages)
            self.pages.append(array.array(_INT32_CODE))
            if row >= self.lengths.shape[0]:
                self.lengths = np.concatenate([self.lengths, np.zeros(max(row, 16), np.int64)])
        self.lengths[row] = 0
        self.row_of[seq_id] = row

    def rows(self, seq_ids) -> np.ndarray:
        """int64 [batch]: the row of each id (one dict lookup each; errors name the id)."""
        check_id_sequence(seq_ids)
        row_of = self.row_of
        try:
            rows = [row_of[s] for s in seq_ids]
        except (KeyError, TypeError):
            for s in seq_ids:
                self.row(s)
            raise
        return np.array(rows, dtype=np.int64)

    def row(self, seq_id) -> int:
        try:
            return self.row_of[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}; add it with add_sequence()") from None
        except TypeError:
            raise TypeError(f"sequence ids must be hashable; got {type(seq_id).__name__}") from None

    def page_ids(self, row: int) -> np.ndarray:
        return np.frombuffer(self.pages[row], dtype=np.int32).copy()

    def free(self, seq_id) -> None:
        row = self.row(seq_id)
        del self.row_of[seq_id]
        self._release(row, 0)
        self.lengths[row] = 0
        self.spare_rows.append(row)

    def _release(self, row: int, keep: int) -> None:
        """Give the pages of ``row`` past its first ``keep`` back to the free list."""
        ids = self.pages[row]
        dropped = np.frombuffer(ids, dtype=np.int32)[keep:][::-1]
        self.free_ids[self.num_free:self.num_free + dropped.shape[0]] = dropped
        self.num_free += dropped.shape[0]
        del dropped  # no view of ids may outlive the resize below
        del ids[keep:]

    def grow(self, rows: np.ndarray, new_lens: np.ndarray, seq_ids) -> None:
        """Grow the sequences of ``rows`` (distinct) to ``new_lens`` tokens: all or nothing."""
        old_lens = self.lengths[rows]
        bad = np.flatnonzero((new_lens < old_lens) | (new_lens > A.INT32_MAX))
        if bad.size:
            i = int(bad[0])
            why = "cannot shrink" if new_lens[i] < old_lens[i] else "kv_lens are int32"
            raise ValueError(f"sequence {list(seq_ids)[i]!r} holds {old_lens[i]} tokens and "
                             f"cannot grow to {new_lens[i]} ({why})")
        ps = self.page_size
        extra = (new_lens + (ps - 1)) // ps - (old_lens + (ps - 1)) // ps
        needed = int(extra.sum())
        if needed > self.num_free:
            raise OutOfPagesError(f"{needed} more pages are needed but {self.num_free} of "
                                  f"{self.num_pages} are free (page_size={ps})")
        top = self.num_free
        for i in np.flatnonzero(extra).tolist():
            n = int(extra[i])
            self.pages[rows[i]].frombytes(self.free_ids[top - n:top][::-1].tobytes())
            top -= n
        self.num_free = top
        self.lengths[rows] = new_lens

    def shrink(self, rows: np.ndarray, lens: np.ndarray) -> None:
        """Undo a grow: back to ``lens`` tokens, pages past them back to the free list."""
        keep = -(-lens // self.page_size)
        for row, k in zip(rows.tolist(), keep.tolist()):
            self._release(row, k)
        self.lengths[rows] = lens

    def table(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """kv_indptr int32 [batch + 1], kv_indices int32, kv_lens int64 [batch] of ``rows``."""
        lens = self.lengths[rows]
        counts = lens + (self.page_size - 1)
        counts //= self.page_size
        kv_indptr = np.zeros(rows.shape[0] + 1, dtype=np.int32)
        counts.cumsum(out=kv_indptr[1:])
        pages = self.pages
        kv_indices = np.frombuffer(bytearray().join([pages[r] for r in rows.tolist()]),
                                   dtype=np.int32)
        return kv_indptr, kv_indices, lens


class SequencePages:
    """Per-sequence page tables over a pool of ``num_pages`` pages (the allocator side of a
    paged cache). The cache class sets ``page_size``, ``num_pages`` and ``_tables``
    (a ``_PageTables``) and implements the writing of tokens."""

    page_size: int
    _tables: _PageTables

    @property
    def num_free_pages(self) -> int:
        return self._tables.num_free

    def __len__(self) -> int:
        return len(self._tables.row_of)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._tables.row_of

    def add_sequence(self, seq_id) -> None:
        """Start an empty sequence (no pages) named by the hashable ``seq_id``."""
        self._tables.add(seq_id)

    def seq_len(self, seq_id) -> int:
        """Tokens the sequence holds."""
        return int(self._tables.lengths[self._tables.row(seq_id)])

    def seq_pages(self, seq_id) -> np.ndarray:
        """The sequence's page ids, int32 [ceil(seq_len / page_size)] (a copy)."""
        return self._tables.page_ids(self._tables.row(seq_id))

    def grow(self, seq_id, new_len: int) -> None:
        """Make the sequence hold ``new_len`` tokens, allocating the pages it needs.

        Token contents are not written (see ``append``). Raises OutOfPagesError, with
        nothing allocated, when too few pages are free; ValueError when new_len < seq_len.
        """
        new_len = positive_int(new_len, "new_len", minimum=0)
        rows = np.array([self._tables.row(seq_id)], dtype=np.int64)
        self._tables.grow(rows, np.array([new_len], dtype=np.int64), [seq_id])

    def free(self, seq_id) -> None:
        """Forget the sequence and return its pages to the free list."""
        self._tables.free(seq_id)

    def page_table(self, seq_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The page table of the given sequences, in that order (ids may repeat).

        Returns
        -------
        kv_indptr : int32 [batch + 1];  kv_indices : int32 [kv_indptr[-1]];
        kv_last_page_len : int32 [batch] (0 for an empty sequence);  kv_lens : int32 [batch]
        """
        kv_indptr, kv_indices, lens = self._tables.table(self._tables.rows(seq_ids))
        # last = len - (pages - 1) * page_size = (len - 1) % page_size + 1; 0 for len 0
        last = lens - 1
        last %= self.page_size
        last += 1
        last *= lens > 0
        return kv_indptr, kv_indices, last.astype(np.int32), lens.astype(np.int32)

    def _grow_and_write(self, seq_ids, new_name: str, total_new: int, append_indptr,
                        write) -> None:
        """Grow sequences ``seq_ids`` (distinct) by their new tokens (``total_new`` rows of the
        argument ``new_name``), all or nothing, then call ``write(page, slot)`` with the page id
        and slot of every new token (int arrays [total_new]); a failed write leaves the tables
        as they were."""
        seq_ids = list(check_id_sequence(seq_ids))
        rows = self._tables.rows(seq_ids)
        batch = rows.shape[0]
        if len(set(rows.tolist())) != batch:
            seen: set = set()
            twice = next(s for s in seq_ids if s in seen or seen.add(s))
            raise ValueError(f"seq_ids must be distinct; {twice!r} appears more than once")
        if append_indptr is None:
            if total_new != batch:
                raise ValueError(f"without append_indptr, {new_name} must hold one token per "
                                 f"sequence: shape[0] = {batch}; got {total_new}")
            append_indptr = np.arange(batch + 1, dtype=np.int32)
        append_indptr = host_index(append_indptr, "append_indptr", batch + 1)
        new_counts = pages_per_request(append_indptr, "append_indptr")
        if append_indptr[-1] != total_new:
            raise ValueError(f"append_indptr must end at {new_name}.shape[0]={total_new}; "
                             f"got append_indptr[-1]={append_indptr[-1]}")
        before = self._tables.lengths[rows]
        self._tables.grow(rows, before + new_counts, seq_ids)
        try:
            kv_indptr, kv_indices, _ = self._tables.table(rows)
            entry, slot = _token_slots(append_indptr, new_counts, kv_indptr, before,
                                       self.page_size)
            write(kv_indices[entry], slot)
        except BaseException:
            self._tables.shrink(rows, before)  # leave the cache as it was
            raise


def _default_device() -> str:
    if A.cupy is None:
        return "cpu"
    try:
        return "gpu" if A.cupy.cuda.runtime.getDeviceCount() > 0 else "cpu"
    except Exception:  # CuPy without a driver or a device
        return "cpu"


def _new_pools(device, dtype, *shapes) -> tuple[list, bool]:
    """Uninitialised pools of these shapes on ``device`` ("gpu", "cpu", or None: the GPU when
    CuPy finds one), and whether they are on the GPU."""
    on_gpu = (device or _default_device()) == "gpu"
    if on_gpu and A.cupy is None:
        raise ValueError("device='gpu' needs CuPy; install cpattn[cuda12] or [cuda13]")
    if not on_gpu:
        return [np.empty(shape, dtype) for shape in shapes], on_gpu
    try:
        return [A.cupy.empty(shape, dtype) for shape in shapes], on_gpu
    except A.cupy.cuda.runtime.CUDARuntimeError as err:  # no GPU or driver: say which argument
        raise RuntimeError(f"device='gpu' but CUDA has no usable GPU here ({err}); "
                           "pass device='cpu' for NumPy pools") from None


def _intake_pools(pools: dict, device) -> tuple[dict, bool]:
    """User-owned pools ``{name: array}`` taken in without a copy, all on one side, which must
    be ``device`` when it is given; and whether they are on the GPU."""
    arrs, on_gpu = A.intake_all(pools)
    if device is not None and (device == "gpu") != on_gpu:
        raise ValueError(f"device={device!r} but {' and '.join(pools)} live on the "
                         f"{'GPU' if on_gpu else 'CPU'}")
    return arrs, on_gpu


def _cache_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)  # "bfloat16" resolves once ml_dtypes is imported (by _arrays)
    except TypeError:
        dt = None
    if dt not in A.ATTENTION_DTYPES:
        raise ValueError(f"dtype must be float16 or bfloat16; got {dtype!r}")
    return dt


class PagedKVCache(SequencePages):
    """K and V page pools with a page allocator and per-sequence page tables.

    Parameters
    ----------
    num_pages, page_size, num_kv_heads, head_dim : int; head_dim a multiple of 8
    dtype : float16 or bfloat16 (NumPy dtype, ``ml_dtypes.bfloat16``, or "float16" / "bfloat16")
    kv_layout : "NHD" (pools ``[num_pages, page_size, H, D]``) or "HND" (``[num_pages, H,
        page_size, D]``)
    k_pages, v_pages : optional pools to adopt, as they are (CuPy, NumPy, or any DLPack tensor
        such as a torch tensor: no copy); they must match the shape and dtype above. Otherwise
        the pools are allocated, uninitialised.
    device : "gpu" | "cpu", optional; where to allocate (default: "gpu" when CuPy sees a
        device, else "cpu"). Adopted pools decide it themselves.

    Sequences are named by any hashable id. A sequence of n tokens holds ``ceil(n / page_size)``
    pages; token t is in slot ``t % page_size`` of ``pages[t // page_size]``.

    Example
    -------
    >>> cache = PagedKVCache(64, 16, 8, 128, "float16", device="cpu")
    >>> cache.add_sequence("a"); cache.add_sequence("b")
    >>> cache.grow("a", 20); cache.grow("b", 3)
    >>> kv_indptr, kv_indices, kv_last_page_len, kv_lens = cache.page_table(["a", "b"])
    >>> kv_indptr, kv_indices
    (array([0, 2, 3], dtype=int32), array([0, 1, 2], dtype=int32))
    >>> kv_last_page_len, kv_lens
    (array([4, 3], dtype=int32), array([20,  3], dtype=int32))
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype,
                 kv_layout: str = "NHD", *, k_pages=None, v_pages=None, device: str | None = None):
        check_layout(kv_layout)
        self.num_pages = positive_int(num_pages, "num_pages")
        self.page_size = positive_int(page_size, "page_size")
        self.num_kv_heads = positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = positive_int(head_dim, "head_dim")
        self.dtype = _cache_dtype(dtype)
        self.kv_layout = kv_layout
        if self.num_pages > A.INT32_MAX:
            raise ValueError(f"num_pages must be < 2^31 (int32 page ids); got {num_pages}")
        _check_head_dim(self.head_dim, self.dtype, "head_dim")
        if device not in (None, "gpu", "cpu"):
            raise ValueError(f"device must be 'gpu', 'cpu' or None; got {device!r}")
        shape = pool_shape(self.num_pages, self.page_size, self.num_kv_heads, self.head_dim,
                           kv_layout)
        if (k_pages is None) != (v_pages is None):
            raise ValueError("give both k_pages and v_pages, or neither")
        if k_pages is None:
            (k_pages, v_pages), on_gpu = _new_pools(device, self.dtype, shape, shape)
        else:
            (k_pages, v_pages), on_gpu = self._adopt(k_pages, v_pages, shape, device)
        self.k_pages, self.v_pages, self.on_gpu = k_pages, v_pages, on_gpu
        self._tables = _PageTables(self.num_pages, self.page_size)

    def _adopt(self, k_pages, v_pages, shape, device):
        arrs, on_gpu = _intake_pools({"k_pages": k_pages, "v_pages": v_pages}, device)
        dims = _pool_dims(self.kv_layout)
        for name, pool in arrs.items():
            A.check_shape(pool, name, shape, dims)
            if pool.dtype != self.dtype:
                raise ValueError(f"{name} must have dtype {A.dtype_name(self.dtype)} (the "
                                 f"cache's); got {A.dtype_name(pool.dtype)}")
        check_pools(arrs["k_pages"], arrs["v_pages"], self.kv_layout)
        return (arrs["k_pages"], arrs["v_pages"]), on_gpu

    # ---- writing -----------------------------------------------------------------------------

    def append(self, seq_ids, k_new, v_new, append_indptr=None, *, stream=None) -> None:
        """Append new tokens' K and V to sequences: grow each (all or nothing), then write.

        Parameters
        ----------
        seq_ids : sequence of distinct sequence ids, [batch]
        k_new, v_new : [total_new, num_kv_heads, head_dim], the cache's dtype, on its side
            (CuPy for a GPU cache, NumPy for a CPU one; DLPack tensors come in without a copy)
        append_indptr : int32 [batch + 1], optional; new tokens per sequence. Default: one per
            sequence (a decode step), ``[0, 1, ..., batch]``.
        stream : cupy.cuda.Stream, optional

        Sequence b's new tokens, rows ``append_indptr[b]:append_indptr[b + 1]``, become its
        tokens ``seq_len(b) ...``. Every argument is checked before any page is allocated.
        """
        arrs, _ = A.intake_all({"k_pages": self.k_pages, "k_new": k_new, "v_new": v_new})
        k_new, v_new = arrs["k_new"], arrs["v_new"]
        _check_new(k_new, v_new, self.k_pages, self.v_pages, self.num_kv_heads)
        self._grow_and_write(seq_ids, "k_new", k_new.shape[0], append_indptr, lambda page, slot: _write(
            self.k_pages, self.v_pages, k_new, v_new, page, slot, self.kv_layout, stream))

    def __repr__(self) -> str:
        side = "gpu" if self.on_gpu else "cpu"
        return (f"PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={A.dtype_name(self.dtype)}, kv_layout={self.kv_layout!r}, "
                f"device={side!r}, sequences={len(self)}, "
                f"free_pages={self.num_free_pages})")
