"""Host-side planning, in NumPy: index arrays of paged batches and the work list of batch decode.

Everything here runs on the CPU and sees only lengths and page tables, never K/V data. Index
arrays are int32 NumPy arrays; CuPy arrays are accepted where noted, at the price of a copy to
the host (which waits for the GPU). Validation errors name the argument, the expected and the
actual value.

Vocabulary (one request ``b`` of a paged batch):

- ``kv_indptr [batch + 1]``: request ``b`` owns the pages
  ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``.
- ``kv_lens [batch]``: its number of tokens; token ``t`` lives in slot ``t % page_size`` of its
  page ``t // page_size``.
- ``kv_last_page_len [batch]``: tokens in its last page,
  ``kv_len = (num_pages - 1) * page_size + last_page_len``; 0 for a request with no pages.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from . import _arrays as A

__all__ = ["DecodeWork", "check_page_table", "cu_seqlens", "last_page_len_from_lens",
           "lens_from_last_page_len", "partition_decode", "partition_tiles", "TiledWork"]

_INT32_MAX = np.iinfo(np.int32).max


# ---- argument intake -------------------------------------------------------------------------

def host_index(x, name: str, length: int | None = None) -> np.ndarray:
    """``x`` as a host int32 1-D array (``length`` entries when given).

    NumPy arrays and CPU DLPack tensors come in without a copy; a CuPy array (or CUDA DLPack
    tensor) is copied to the host with ``cupy.asnumpy``, which synchronises with the GPU.
    """
    if not isinstance(x, np.ndarray):
        x = A.intake(x, name)
        if A.is_gpu(x):
            x = A.cupy.asnumpy(x)
    A.check_index(x, name, length)
    return x


def positive_int(x, name: str, minimum: int = 1) -> int:
    """``x`` as a Python int >= ``minimum`` (TypeError for a non-integer or a bool, ValueError
    below)."""
    try:
        if isinstance(x, (bool, np.bool_)):
            raise TypeError
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer; got {type(x).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def pages_per_request(kv_indptr: np.ndarray, name: str = "kv_indptr") -> np.ndarray:
    """``kv_indptr`` (int32 ``[batch + 1]``) checked to start at 0 and never decrease; returns
    its differences as int64 ``[batch]``."""
    if kv_indptr.shape[0] < 1:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries; got 0")
    if kv_indptr[0] != 0:
        raise ValueError(f"{name} must start at 0; got {name}[0]={kv_indptr[0]}")
    # NOTE: differences in int64: an int32 difference of a negative entry can wrap around.
    wide = kv_indptr.astype(np.int64)
    counts = wide[1:] - wide[:-1]
    if counts.size and counts.min() < 0:
        i = int(np.flatnonzero(counts < 0)[0])
        raise ValueError(f"{name} must be non-decreasing; "
                         f"{name}[{i}]={kv_indptr[i]} > {name}[{i + 1}]={kv_indptr[i + 1]}")
    return counts


def _lens_checked(pages: np.ndarray, page_size: int, kv_lens, kv_last_page_len) -> np.ndarray:
    """kv_lens int32 [batch] from exactly one of the two, both checked against ``pages``
    (int64 [batch], whose sum is below 2^31)."""
    if (kv_lens is None) == (kv_last_page_len is None):
        raise ValueError("give exactly one of kv_lens or kv_last_page_len; "
                         f"got {'both' if kv_lens is not None else 'neither'}")
    batch = pages.shape[0]
    if kv_last_page_len is not None:
        last = host_index(kv_last_page_len, "kv_last_page_len", batch).astype(np.int64)
        # Fast path: every entry in [1, page_size]. Otherwise only requests with pages must be.
        if batch and (last.min() < 1 or last.max() > page_size):
            bad = ((last < 1) | (last > page_size)) & (pages > 0)
            if bad.any():
                b = int(np.flatnonzero(bad)[0])
                raise ValueError(f"kv_last_page_len[{b}]={last[b]} must be in [1, page_size="
                                 f"{page_size}] for a request with {pages[b]} pages")
        lens = (pages - 1) * page_size + last
        lens *= pages > 0  # a request with no pages holds no token, whatever its entry says
        if batch and int(pages.sum()) * page_size > _INT32_MAX and lens.max() > _INT32_MAX:
            b = int(np.argmax(lens))
            raise ValueError(f"request {b} holds {lens[b]} tokens; kv_lens must fit in int32")
        return lens.astype(np.int32)
    lens = host_index(kv_lens, "kv_lens", batch)
    # A request with p > 0 pages holds kv_len in ((p - 1) * page_size, p * page_size], that is
    # ceil(kv_len / page_size) == p; one with none holds 0. NOTE: read as uint32, a negative
    # kv_len becomes > 2^31 and needs more pages than any request has.
    wide = lens.view(np.uint32).astype(np.int64)
    if ((wide + (page_size - 1)) // page_size != pages).any():
        b = int(np.flatnonzero((wide + (page_size - 1)) // page_size != pages)[0])
        full = (pages[b] - 1) * page_size
        expected = f"in [{full + 1}, {full + page_size}]" if pages[b] else "0"
        raise ValueError(f"kv_lens[{b}]={lens[b]} must be {expected} for a request with "
                         f"{pages[b]} pages of page_size={page_size}")
    return lens


# ---- index arrays ----------------------------------------------------------------------------

def _lengths(lengths, name: str) -> np.ndarray:
    """``lengths`` as a 1-D integer array of entries >= 0 (ValueError naming ``name``)."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array; got {lengths.dtype} "
                         f"of shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        i = int(np.flatnonzero(lengths < 0)[0])
        raise ValueError(f"{name} must be >= 0; got {name}[{i}]={lengths[i]}")
    return lengths


def cu_seqlens(lengths) -> np.ndarray:
    """Exclusive prefix sum of lengths: the indptr of a ragged batch.

    Parameters
    ----------
    lengths : array-like of non-negative integers, [n]

    Returns
    -------
    int32 [n + 1]: starts at 0, ``out[i + 1] - out[i] == lengths[i]``.

    Example
    -------
    >>> cu_seqlens(np.array([2, 3, 1], dtype=np.int32))
    array([0, 2, 5, 6], dtype=int32)
    """
    lengths = _lengths(lengths, "lengths")
    if lengths.size and lengths.max() > _INT32_MAX:  # (before the sum: int64 could wrap)
        i = int(np.argmax(lengths))
        raise ValueError(f"the lengths must sum to at most {_INT32_MAX} (int32); got "
                         f"lengths[{i}]={lengths[i]}")
    out = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    if out[-1] > _INT32_MAX:
        raise ValueError(f"the lengths must sum to at most {_INT32_MAX} (int32); got {out[-1]}")
    return out.astype(np.int32)


def lens_from_last_page_len(kv_indptr, kv_last_page_len, page_size: int) -> np.ndarray:
    """Tokens per request from the pages it owns and the fill of its last page.

    Parameters
    ----------
    kv_indptr : int32 [batch + 1], pages per request as an indptr
    kv_last_page_len : int32 [batch], in [1, page_size] for a request with pages (ignored for
        one with none)
    page_size : int

    Returns
    -------
    kv_lens : int32 [batch], ``(pages - 1) * page_size + last`` or 0 for a request with no pages.

    Example
    -------
    >>> lens_from_last_page_len(np.array([0, 2, 2, 5], dtype=np.int32),
    ...                         np.array([3, 0, 4], dtype=np.int32), page_size=4)
    array([ 7,  0, 12], dtype=int32)
    """
    page_size = positive_int(page_size, "page_size")
    pages = pages_per_request(host_index(kv_indptr, "kv_indptr"))
    return _lens_checked(pages, page_size, None, kv_last_page_len)


def last_page_len_from_lens(kv_indptr, kv_lens, page_size: int) -> np.ndarray:
    """The inverse of :func:`lens_from_last_page_len`: tokens in each request's last page.

    Parameters
    ----------
    kv_indptr : int32 [batch + 1]
    kv_lens : int32 [batch], in ((pages - 1) * page_size, pages * page_size] for a request with
        pages, 0 for one with none
    page_size : int

    Returns
    -------
    kv_last_page_len : int32 [batch], in [1, page_size]; 0 for a request with no pages.

    Example
    -------
    >>> last_page_len_from_lens(np.array([0, 2, 2, 5], dtype=np.int32),
    ...                         np.array([7, 0, 12], dtype=np.int32), page_size=4)
    array([3, 0, 4], dtype=int32)
    """
    page_size = positive_int(page_size, "page_size")
    pages = pages_per_request(host_index(kv_indptr, "kv_indptr"))
    lens = _lens_checked(pages, page_size, kv_lens, None)
    return np.where(pages > 0, lens - (pages - 1) * page_size, 0).astype(np.int32)


def check_page_table(kv_indptr, kv_indices, num_pages: int, page_size: int, *, kv_lens=None,
                     kv_last_page_len=None) -> np.ndarray:
    """Validate the page table of a paged batch; return its token counts.

    Parameters
    ----------
    kv_indptr : int32 [batch + 1], starts at 0, non-decreasing, ends at ``len(kv_indices)``
    kv_indices : int32 [kv_indptr[-1]], page ids in [0, num_pages)
    num_pages, page_size : int, the pool's
    kv_lens : int32 [batch], optional
    kv_last_page_len : int32 [batch], optional; give exactly one of the two.

    NumPy arrays are read in place. CuPy arrays are copied to the host first with
    ``cupy.asnumpy``, which synchronises with the GPU: prefer host arrays in a serving loop.

    Returns
    -------
    kv_lens : int32 [batch]

    Raises
    ------
    ValueError naming the first bad entry, e.g.
    ``kv_indptr must be non-decreasing; kv_indptr[3]=40 > kv_indptr[4]=32``.

    Example
    -------
    Two requests with pages [7, 1] and [4] of page_size 4, holding 6 and 2 tokens:

    >>> kv_indptr = np.array([0, 2, 3], dtype=np.int32)
    >>> kv_indices = np.array([7, 1, 4], dtype=np.int32)
    >>> check_page_table(kv_indptr, kv_indices, num_pages=8, page_size=4,
    ...                  kv_last_page_len=np.array([2, 2], dtype=np.int32))
    array([6, 2], dtype=int32)
    """
    num_pages = positive_int(num_pages, "num_pages")
    page_size = positive_int(page_size, "page_size")
    kv_indptr = host_index(kv_indptr, "kv_indptr")
    kv_indices = host_index(kv_indices, "kv_indices")
    pages = pages_per_request(kv_indptr)
    if kv_indptr[-1] != kv_indices.shape[0]:
        raise ValueError(f"kv_indptr must end at len(kv_indices)={kv_indices.shape[0]}; "
                         f"got kv_indptr[-1]={kv_indptr[-1]}")
    _check_page_ids(kv_indices, num_pages)
    return _lens_checked(pages, page_size, kv_lens, kv_last_page_len)


def _check_page_ids(kv_indices: np.ndarray, num_pages: int) -> None:
    """Every entry of ``kv_indices`` (int32) in [0, num_pages)."""
    # NOTE: seen as uint32, a negative id is above any valid one: one reduction checks both ends.
    if kv_indices.size and kv_indices.view(np.uint32).max() >= num_pages:
        i = int(np.flatnonzero((kv_indices < 0) | (kv_indices >= num_pages))[0])
        if kv_indices[i] < 0 and num_pages == _INT32_MAX:  # plan(): no pool to name yet
            raise ValueError(f"kv_indices[{i}]={kv_indices[i]} must be >= 0 (a page id)")
        raise ValueError(f"kv_indices[{i}]={kv_indices[i]} is out of range "
                         f"[0, num_pages={num_pages})")


# ---- batch decode work list ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DecodeWork:
    """The work list of batch decode: one CTA per (item, kv head), grid = (num_items, num_kv_heads).

    Attributes
    ----------
    request : int32 [num_items], the request of each item; non-decreasing
    kv_start, kv_end : int32 [num_items], the item's token range [kv_start, kv_end) within its
        request (``kv_start == kv_end == 0`` for the single item of an empty request)
    merge_indptr : int32 [batch + 1], the items of request b are rows
        ``merge_indptr[b]:merge_indptr[b + 1]``; every request has at least one
    split : bool, True when some request is cut into more than one item (the partial states then
        need merging)
    chunk_size : int, a multiple of ``tile``; no item is longer. Item i of a request starts at
        token ``i * chunk_size``.
    """

    request: np.ndarray
    kv_start: np.ndarray
    kv_end: np.ndarray
    merge_indptr: np.ndarray
    split: bool
    chunk_size: int

    @property
    def num_items(self) -> int:
        return self.request.shape[0]


def most_states(merge_indptr: np.ndarray) -> int:
    """States of the fullest row of a split plan (``merge_indptr [rows + 1]``, host): what sizes
    a merge's launch and decides whether a kernel merges its rows itself.

    >>> most_states(np.array([0, 2, 7, 8]))
    5
    """
    return int(np.diff(merge_indptr).max(initial=0))


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def partition_decode(kv_lens, num_kv_heads: int, *, num_sms: int, ctas_per_sm: int = 2,
                     min_chunk: int = 256, tile: int = 16, max_items: int | None = None,
                     balance_waves: bool = False) -> DecodeWork:
    """Cut the requests of a decode batch into items (kv chunks) that fill the GPU.

    Heuristic. The GPU has ``slots = num_sms * ctas_per_sm`` CTA slots; each item runs
    ``num_kv_heads`` CTAs, so ``budget = slots // num_kv_heads`` items fill it once.

    - ``batch * num_kv_heads >= slots``: the batch alone fills the GPU, so each request is one
      item ``[0, kv_len)`` and ``split`` is False.
    - otherwise (split-KV): ``chunk_size`` is the smallest multiple of ``tile``, at least
      ``min_chunk``, for which ``sum_b max(1, ceil(kv_len_b / chunk_size)) <= budget``: as many
      items as fit in one wave, never more. Request b gets ``max(1, ceil(kv_len_b / chunk_size))``
      items of ``chunk_size`` tokens (its last one shorter), an empty request one empty item.
      If every request ends up with one item, ``split`` is False.

    With ``split`` False, ``chunk_size`` is the longest request rounded up to ``tile``.
    Chunks start at multiples of ``chunk_size``: pass ``tile = lcm(tile, page_size)`` for chunks
    that begin on a page boundary.

    ``balance_waves``: a batch that fills the GPU is still cut (longest request in 2 to 4
    chunks) when that fills the last wave of CTAs much better; see ``_wave_chunk``.

    ``max_items`` (the capacity of fixed buffers under CUDA-graph capture) lowers the budget:
    chunk_size grows until the items fit. If ``batch > max_items`` it cannot fit (every request
    needs an item): ValueError.

    Parameters
    ----------
    kv_lens : int32 [batch], host (a CuPy array is copied to the host, with a sync)
    num_kv_heads, num_sms, ctas_per_sm, min_chunk, tile : int >= 1
    max_items : int >= 1, optional

    Returns
    -------
    DecodeWork

    Example
    -------
    One KV head on a 4-SM GPU with 2 CTAs per SM (budget: 8 items), requests of 1000, 10 and 0
    tokens, min_chunk 128: chunk_size 176 is the smallest multiple of 16 giving at most 8 items,
    ceil(1000 / 176) + 1 + 1 = 8 (160 would give 7 + 1 + 1 = 9):

    >>> w = partition_decode(np.array([1000, 10, 0], dtype=np.int32), 1, num_sms=4,
    ...                      min_chunk=128)
    >>> w.chunk_size, w.split
    (176, True)
    >>> w.request
    array([0, 0, 0, 0, 0, 0, 1, 2], dtype=int32)
    >>> w.kv_start
    array([  0, 176, 352, 528, 704, 880,   0,   0], dtype=int32)
    >>> w.kv_end
    array([ 176,  352,  528,  704,  880, 1000,   10,    0], dtype=int32)
    >>> w.merge_indptr
    array([0, 6, 7, 8], dtype=int32)
    """
    kv_lens = host_index(kv_lens, "kv_lens")
    num_kv_heads = positive_int(num_kv_heads, "num_kv_heads")
    slots = positive_int(num_sms, "num_sms") * positive_int(ctas_per_sm, "ctas_per_sm")
    min_chunk, tile = positive_int(min_chunk, "min_chunk"), positive_int(tile, "tile")
    batch = kv_lens.shape[0]
    # NOTE: seen as uint32 a negative length is above 2^31: one reduction finds it or the longest.
    longest = int(kv_lens.view(np.uint32).max()) if batch else 0
    if longest > _INT32_MAX:
        b = int(np.flatnonzero(kv_lens < 0)[0])
        raise ValueError(f"kv_lens must be >= 0; got kv_lens[{b}]={kv_lens[b]}")
    budget = slots // num_kv_heads
    if max_items is not None:
        max_items = positive_int(max_items, "max_items")
        if batch > max_items:
            raise ValueError(f"max_items={max_items} is below batch={batch}: every request "
                             "needs at least one work item")
        budget = min(budget, max_items)
    if batch * num_kv_heads >= slots or batch >= budget or longest == 0:
        if balance_waves and max_items is None and longest > 0:
            chunk = _wave_chunk(kv_lens, num_kv_heads, slots, _round_up(min_chunk, tile), tile)
            if chunk is not None:
                return _split_by_chunk(kv_lens, np.maximum(kv_lens - 1, 0), chunk)
        return _one_item_per_request(kv_lens, _round_up(max(longest, 1), tile))
    # ceil(kv_len / c) == (kv_len - 1) // c + 1 for kv_len >= 1; max(1, .) for an empty one.
    lens_minus_1 = np.maximum(kv_lens - 1, 0)  # int32
    chunk = _fit_chunk(lens_minus_1, int(kv_lens.sum(dtype=np.int64)), budget,
                       _round_up(min_chunk, tile), tile)
    if chunk >= longest:
        return _one_item_per_request(kv_lens, _round_up(longest, tile))
    return _split_by_chunk(kv_lens, lens_minus_1, chunk)


def _split_by_chunk(kv_lens: np.ndarray, lens_minus_1: np.ndarray, chunk: int) -> DecodeWork:
    """Request b becomes ``max(1, ceil(kv_len_b / chunk))`` items of ``chunk`` tokens."""
    batch = kv_lens.shape[0]
    items = lens_minus_1 // chunk
    items += 1
    merge_indptr = np.zeros(batch + 1, dtype=np.int32)
    np.add.accumulate(items, out=merge_indptr[1:])  # (the ufunc: cheaper than cumsum here)
    request = np.arange(batch, dtype=np.int32).repeat(items)
    kv_start = np.arange(merge_indptr[-1], dtype=np.int32)
    kv_start -= merge_indptr[request]  # index of the item within its request
    kv_start *= np.int32(chunk)
    # Every item but the last of its request is a whole chunk; the last one ends at kv_len.
    # (kv_start + chunk may wrap around int32 there, for requests near 2^31 tokens: overwritten.)
    kv_end = kv_start + np.int32(chunk)
    kv_end[merge_indptr[1:] - 1] = kv_lens
    return DecodeWork(request, kv_start, kv_end, merge_indptr, True, int(chunk))


def _wave_chunk(kv_lens: np.ndarray, num_kv_heads: int, slots: int, smallest: int,
                tile: int) -> int | None:
    """A chunk that cuts a GPU-filling batch into items whose CTAs fill the last wave better.

    With one item per request the grid has ``batch * num_kv_heads`` CTAs; when the last of its
    waves of ``slots`` CTAs is mostly empty (64 x 8 = 512 CTAs on 396 slots: 1.3 waves), cutting
    the longest requests in 2 to 4 chunks can fill it (1536 CTAs: 3.9 waves). Returns that chunk
    when it raises the filled fraction of the waves by at least 0.1, else None. From two waves
    on, cutting costs more (merge, start-up of the extra CTAs) than the last wave wastes (H200,
    B128 L2048 32/8: 3808 GB/s whole, 3510 cut in three).
    """
    fill = lambda ctas: ctas / (-(-ctas // slots) * slots)
    ctas = kv_lens.shape[0] * num_kv_heads
    if ctas >= 2 * slots:  # the last wave is a small part of the run already
        return None
    smallest = max(smallest, 512)  # shorter items pay their start-up and merge for too few keys
    lens_minus_1 = np.maximum(kv_lens.astype(np.int64) - 1, 0)
    best_fill, best_chunk = fill(ctas), None
    start = best_fill
    longest = int(kv_lens.max())
    for pieces in (2, 3, 4):
        chunk = _round_up(-(-longest // pieces), tile)
        if chunk < smallest:
            break
        ctas = int((lens_minus_1 // chunk + 1).sum()) * num_kv_heads
        if fill(ctas) > best_fill:
            best_fill, best_chunk = fill(ctas), chunk
    return best_chunk if best_fill >= start + 0.1 else None


def _one_item_per_request(kv_lens: np.ndarray, chunk_size: int) -> DecodeWork:
    batch = kv_lens.shape[0]
    rows = np.arange(batch + 1, dtype=np.int32)
    return DecodeWork(rows[:-1], np.zeros(batch, dtype=np.int32), kv_lens.copy(), rows, False,
                      int(chunk_size))


def _fit_chunk(lens_minus_1: np.ndarray, total_tokens: int, budget: int, smallest: int,
               tile: int) -> int:
    """The smallest chunk, a multiple of ``tile`` and >= ``smallest``, that cuts the requests
    into at most ``budget`` items, ``max(1, ceil(kv_len / chunk))`` each.

    ``lens_minus_1`` is ``max(kv_len - 1, 0)``, int32 [batch]; ``budget > batch``.
    Request b needs more than k items exactly when ``chunk < ceil(kv_len_b / k)``: call those
    values its thresholds. A chunk c gives ``batch + #{thresholds > c}`` items, so the smallest
    chunk that fits is the (budget - batch + 1)-th largest threshold of the batch. Only
    thresholds >= ``base`` (a lower bound of the answer) are listed: about ``budget`` of them.
    """
    room = budget - lens_minus_1.shape[0]  # thresholds allowed above the chunk
    base = max(smallest, -(-total_tokens // budget))  # items >= total_tokens / chunk
    # Request b has the thresholds ceil(kv_len / k) >= base for k = 1 .. count[b].
    # (With base 1, an empty request lists a threshold 1, which no chunk >= 1 is below.)
    count = lens_minus_1 + 1 if base == 1 else lens_minus_1 // (base - 1)
    ends = np.add.accumulate(count)  # int32: at most about 2 * budget thresholds
    total = int(ends[-1])
    if total <= room:
        return _round_up(base, tile)
    k = np.arange(1, total + 1, dtype=np.int32)
    k -= (ends - count).repeat(count)
    # NOTE: (kv_len - 1) / k in float64 orders exactly like its floor, and its floor is exact
    # for kv_len < 2^53; float division is several times faster than integer division.
    quotients = lens_minus_1.repeat(count) / k
    pick = total - room - 1
    quotients.partition(pick)
    exact = int(quotients[pick]) + 1  # ceil(kv_len / k) = floor((kv_len - 1) / k) + 1
    return _round_up(exact, tile)


# ---- query tiles cut into key chunks (MLA) ---------------------------------------------------

@dataclass(frozen=True, eq=False)
class TiledWork:
    """Work list of a batch whose requests are cut into query tiles, each tile into key chunks.

    Attributes
    ----------
    request, q_start, kv_start, kv_end : int32 [num_items]; item i computes queries
        ``[q_start, q_start + queries_per_item)`` of its request over keys ``[kv_start, kv_end)``
    state, state_stride : int32 [num_items]; split-KV bookkeeping: query j of item i writes its
        partial state to row ``state[i] + j * state_stride[i]``, so the states of one token are
        consecutive rows
    merge_indptr : int32 [total_q + 1]; token t's states are rows
        ``merge_indptr[t]:merge_indptr[t + 1]`` (at least one each)
    num_states : int, rows of partial states
    split : bool, True when some query tile is cut into more than one item
    """

    request: np.ndarray
    q_start: np.ndarray
    kv_start: np.ndarray
    kv_end: np.ndarray
    state: np.ndarray
    state_stride: np.ndarray
    merge_indptr: np.ndarray
    num_states: int
    split: bool

    @property
    def num_items(self) -> int:
        return self.request.shape[0]


def partition_tiles(qo_lens, kv_lens, queries_per_item: int, causal: bool, ctas_per_item: int, *,
                    num_sms: int, ctas_per_sm: int = 1, tile: int = 64,
                    max_items: int | None = None) -> TiledWork:
    """Cut each request into query tiles of ``queries_per_item``, then each tile's keys into
    chunks with :func:`partition_decode` (a tile plays the part of a decode request; with
    ``causal`` its keys are those its last query sees).

    Requests with no query get no item; each CTA runs ``ctas_per_item`` CTAs (head blocks).

    Example: one request of 3 queries over 1000 keys, 2 queries per item, on a GPU of 4 slots:
    two tiles, each cut in two chunks.

    >>> w = partition_tiles(np.array([3]), np.array([1000]), 2, False, 1, num_sms=4, tile=16)
    >>> w.q_start.tolist(), w.kv_start.tolist(), w.kv_end.tolist()
    ([0, 0, 2, 2], [0, 512, 0, 512], [512, 1000, 512, 1000])
    >>> w.state.tolist(), w.state_stride.tolist(), w.merge_indptr.tolist()
    ([0, 1, 4, 5], [2, 2, 2, 2], [0, 2, 4, 6])
    """
    qo_lens, kv_lens = _lengths(qo_lens, "qo_lens"), _lengths(kv_lens, "kv_lens")
    if qo_lens.shape != kv_lens.shape:
        raise ValueError(f"qo_lens and kv_lens must have one entry a request; got "
                         f"{qo_lens.shape[0]} and {kv_lens.shape[0]}")
    qo_lens, kv_lens = qo_lens.astype(np.int64), kv_lens.astype(np.int64)
    qpi = positive_int(queries_per_item, "queries_per_item")
    tiles = -(-qo_lens // qpi)
    unit_request = np.repeat(np.arange(len(qo_lens)), tiles)
    first_tile = np.repeat(np.cumsum(tiles) - tiles, tiles)
    unit_q0 = (np.arange(len(unit_request)) - first_tile) * qpi
    unit_queries = np.minimum(qpi, qo_lens[unit_request] - unit_q0)
    unit_kv = kv_lens[unit_request]
    if causal:  # keys seen by the tile's last query
        seen = unit_q0 + unit_queries + unit_kv - qo_lens[unit_request]
        unit_kv = np.clip(seen, 0, unit_kv)
    if max_items is not None and len(unit_kv) > max_items:
        raise ValueError(f"the batch has {len(unit_kv)} query tiles (ceil(qo_len / "
                         f"{qpi}) per request) but max_items={max_items}: every tile needs a "
                         "work item")
    work = partition_decode(unit_kv.astype(np.int32), ctas_per_item, num_sms=num_sms,
                            ctas_per_sm=ctas_per_sm, tile=tile, max_items=max_items,
                            balance_waves=max_items is None)
    chunks = np.diff(work.merge_indptr).astype(np.int64)  # items of each unit
    unit_states = unit_queries * chunks
    unit_state0 = np.cumsum(unit_states) - unit_states
    unit = work.request
    chunk_index = np.arange(work.num_items) - work.merge_indptr[unit]
    # Token j of unit u: states unit_state0[u] + j * chunks[u] ... + chunks[u].
    total_q = int(unit_queries.sum())
    token_unit = np.repeat(np.arange(len(unit_queries)), unit_queries)
    j = np.arange(total_q) - np.repeat(np.cumsum(unit_queries) - unit_queries, unit_queries)
    merge_indptr = np.empty(total_q + 1, np.int32)
    merge_indptr[:-1] = unit_state0[token_unit] + j * chunks[token_unit]
    merge_indptr[-1] = int(unit_states.sum())
    as32 = lambda x: np.ascontiguousarray(x, dtype=np.int32)
    return TiledWork(as32(unit_request[unit]), as32(unit_q0[unit]), work.kv_start, work.kv_end,
                     as32(unit_state0[unit] + chunk_index), as32(chunks[unit]), merge_indptr,
                     int(merge_indptr[-1]), work.split)
