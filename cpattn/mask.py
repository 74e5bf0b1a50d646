"""Custom attention masks: ragged flattening, bit packing, padded -> ragged.

A custom mask is boolean, True = attend. Request ``b`` of a batch owns a row-major
``[qo_len_b, kv_len_b]`` block; the blocks of a batch are flattened and concatenated.

Two forms reach the kernels and the reference:

- unpacked: ``flat`` bool ``[sum_b qo_len_b * kv_len_b]`` with an element offset array
  ``elem_indptr`` int64 ``[batch + 1]`` (the offsets follow from the lengths);
- packed: ``packed`` uint8 with the bits of each request in little-endian order within
  each byte (``numpy.packbits(..., bitorder="little")``), each request padded to a byte
  boundary, and ``mask_indptr`` int32 ``[batch + 1]`` giving each request's first **byte**.

Worked example: a ``[2, 3]`` mask and a ``[1, 2]`` mask hold 6 and 2 bits, so each fills one
byte (padded with zero bits) and ``mask_indptr`` is ``[0, 1, 2]``.

Everything here is NumPy only; it runs on the host before a kernel launch.
"""

import numpy as np

__all__ = [
    "flatten",
    "from_padded",
    "lengths_from_indptr",
    "pack",
    "pack_flat",
    "unflatten",
    "unpack",
    "validate_packed",
]

BIT_ORDER = "little"  # bit i of a request's block is bit (i % 8) of byte (i // 8)
INT32_MAX = np.iinfo(np.int32).max


def lengths_from_indptr(indptr, name="indptr"):
    """Per-request lengths of an indptr (cu_seqlens) array.

    Parameters
    ----------
    indptr : integer ndarray, [batch + 1]
        Starts at 0, non-decreasing (int32 by contract; any integer dtype is read here).
    name : str
        Argument name used in error messages.

    Returns
    -------
    lengths : int64 ndarray, [batch]

    Example
    -------
    >>> lengths_from_indptr(np.array([0, 2, 5, 6], dtype=np.int32))
    array([2, 3, 1])
    """
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or indptr.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape [batch + 1]; got shape {indptr.shape}")
    if indptr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers (int32); got dtype {indptr.dtype}")
    indptr = indptr.astype(np.int64)
    if indptr[0] != 0:
        raise ValueError(f"{name} must start at 0; got {name}[0]={indptr[0]}")
    lengths = np.diff(indptr)
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name} must be non-decreasing; "
            f"{name}[{i}]={indptr[i]} > {name}[{i + 1}]={indptr[i + 1]}"
        )
    return lengths


def _as_bool(mask, name):
    """``mask`` as a bool array; bool, or integers that are all 0 or 1."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype.kind in "iu":
        other = (mask != 0) & (mask != 1)
        if not other.any():
            return mask.astype(np.bool_)
        raise ValueError(f"{name} must be bool (or integers 0/1); got {mask.dtype} holding "
                         f"{mask[other].flat[0]}")
    raise ValueError(f"{name} must be bool (or integers 0/1); got dtype {mask.dtype}")


def _as_lengths(lengths, name):
    """``lengths`` as an int64 ndarray [batch] of non-negative values."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape [batch]; got shape {lengths.shape}")
    if lengths.size and lengths.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers; got dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} must be >= 0; got {name}[{i}]={lengths[i]}")
    return lengths


def _as_mask_list(masks):
    """Each entry of ``masks`` as a 2-D bool array."""
    out = []
    for b, mask in enumerate(masks):
        mask = _as_bool(mask, f"masks[{b}]")
        if mask.ndim != 2:
            raise ValueError(
                f"masks[{b}] must be 2-D [qo_len, kv_len]; got shape {mask.shape}"
            )
        out.append(mask)
    return out


def flatten(masks):
    """Concatenate per-request 2-D masks into the flat (unpacked) form.

    Parameters
    ----------
    masks : list of bool ndarray, each [qo_len_b, kv_len_b]

    Returns
    -------
    flat : bool ndarray, [sum_b qo_len_b * kv_len_b]
    elem_indptr : int64 ndarray, [batch + 1]
        Offset of each request's block in ``flat`` (in elements).

    Example
    -------
    >>> flat, elem_indptr = flatten([np.array([[1, 0, 1], [1, 1, 0]], bool),
    ...                              np.array([[0, 1]], bool)])
    >>> flat.astype(int)
    array([1, 0, 1, 1, 1, 0, 0, 1])
    >>> elem_indptr
    array([0, 6, 8])
    """
    masks = _as_mask_list(masks)
    sizes = np.array([m.size for m in masks], dtype=np.int64)
    elem_indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.concatenate([m.reshape(-1) for m in masks] + [np.zeros(0, np.bool_)])
    return flat, elem_indptr


def _packed_sizes(qo_lens, kv_lens):
    """Bytes per request: ceil(qo_len * kv_len / 8), int64 [batch]."""
    return (qo_lens * kv_lens + 7) // 8


def pack(masks):
    """Bit-pack per-request 2-D masks, each request padded to a byte boundary.

    Parameters
    ----------
    masks : list of bool ndarray, each [qo_len_b, kv_len_b]

    Returns
    -------
    packed : uint8 ndarray, [mask_indptr[-1]]
    mask_indptr : int32 ndarray, [batch + 1]
        Offset of each request's first byte in ``packed``.

    Example
    -------
    A [2, 3] mask (6 bits -> 1 byte) and a [3, 4] mask (12 bits -> 2 bytes):

    >>> packed, mask_indptr = pack([np.ones((2, 3), bool), np.ones((3, 4), bool)])
    >>> packed
    array([ 63, 255,  15], dtype=uint8)
    >>> mask_indptr
    array([0, 1, 3], dtype=int32)
    """
    masks = _as_mask_list(masks)
    chunks = [np.packbits(m.reshape(-1), bitorder=BIT_ORDER) for m in masks]
    sizes = np.array([c.size for c in chunks], dtype=np.int64)
    total = int(sizes.sum())
    if total > INT32_MAX:
        raise ValueError(
            f"packed mask needs {total} bytes; mask_indptr is int32 (at most {INT32_MAX})"
        )
    mask_indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    packed = np.concatenate(chunks + [np.zeros(0, np.uint8)])
    return packed, mask_indptr


def unflatten(flat_mask, qo_lens, kv_lens):
    """Cut a flattened ragged mask into per-request 2-D masks (the inverse of flatten).

    Parameters
    ----------
    flat_mask : bool (or 0/1 integer) ndarray, [sum_b qo_lens[b] * kv_lens[b]]
    qo_lens, kv_lens : integer array-like, [batch]
    name : str, what errors call ``packed`` (the caller's argument name)

    Returns
    -------
    masks : list of bool ndarray, each [qo_lens[b], kv_lens[b]]

    Example
    -------
    >>> [m.shape for m in unflatten(np.ones(8, bool), [2, 1], [3, 2])]
    [(2, 3), (1, 2)]
    """
    qo_lens = _as_lengths(qo_lens, "qo_lens")
    kv_lens = _as_lengths(kv_lens, "kv_lens")
    if qo_lens.shape != kv_lens.shape:
        raise ValueError(
            f"qo_lens and kv_lens must have the same shape [batch]; "
            f"got {qo_lens.shape} and {kv_lens.shape}"
        )
    flat_mask = _as_bool(flat_mask, "flat_mask")
    if flat_mask.ndim != 1:
        raise ValueError(f"flat_mask must be 1-D; got shape {flat_mask.shape}")
    sizes = qo_lens * kv_lens
    expected = int(sizes.sum())
    if flat_mask.shape[0] != expected:
        raise ValueError(
            f"flat_mask must have sum(qo_len * kv_len) = {expected} elements; "
            f"got {flat_mask.shape[0]}"
        )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [
        flat_mask[starts[b]:starts[b + 1]].reshape(int(qo_lens[b]), int(kv_lens[b]))
        for b in range(len(sizes))
    ]


def pack_flat(flat_mask, qo_indptr, kv_indptr):
    """Bit-pack a flattened ragged mask given its requests' lengths.

    Parameters
    ----------
    flat_mask : bool ndarray, [sum_b qo_len_b * kv_len_b]
        Concatenation of each request's row-major [qo_len_b, kv_len_b] block.
    qo_indptr : int32 ndarray, [batch + 1]
    kv_indptr : int32 ndarray, [batch + 1]
        Token offsets (cu_seqlens) of queries and keys; only their differences are used.

    Returns
    -------
    packed : uint8 ndarray
    mask_indptr : int32 ndarray, [batch + 1], in bytes

    Example
    -------
    >>> pack_flat(np.ones(8, bool), np.array([0, 2, 3]), np.array([0, 3, 5]))
    (array([63,  3], dtype=uint8), array([0, 1, 2], dtype=int32))
    """
    qo_lens = lengths_from_indptr(qo_indptr, "qo_indptr")
    kv_lens = lengths_from_indptr(kv_indptr, "kv_indptr")
    if qo_lens.shape != kv_lens.shape:
        raise ValueError(
            f"qo_indptr and kv_indptr must have the same shape [batch + 1]; "
            f"got {qo_lens.shape[0] + 1} and {kv_lens.shape[0] + 1}"
        )
    return pack(unflatten(flat_mask, qo_lens, kv_lens))


def from_padded(mask, qo_lens, kv_lens):
    """Cut a padded batch mask into per-request 2-D masks.

    Parameters
    ----------
    mask : bool (or 0/1 integer) ndarray, [batch, max_qo_len, max_kv_len]
        Request b's mask is ``mask[b, :qo_lens[b], :kv_lens[b]]``; the rest is padding
        and is never read.
    qo_lens, kv_lens : integer array-like, [batch]
    name : str, what errors call ``packed`` (the caller's argument name)

    Returns
    -------
    masks : list of bool ndarray, each [qo_lens[b], kv_lens[b]] (copies)

    Example
    -------
    >>> padded = np.ones((2, 3, 4), bool)
    >>> [m.shape for m in from_padded(padded, [3, 1], [2, 4])]
    [(3, 2), (1, 4)]
    """
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biu":
        raise ValueError(f"mask must be bool (or integers 0/1); got dtype {mask.dtype}")
    if mask.ndim != 3:
        raise ValueError(
            f"mask must be 3-D [batch, max_qo_len, max_kv_len]; got shape {mask.shape}"
        )
    qo_lens = _as_lengths(qo_lens, "qo_lens")
    kv_lens = _as_lengths(kv_lens, "kv_lens")
    batch = mask.shape[0]
    for name, lens in (("qo_lens", qo_lens), ("kv_lens", kv_lens)):
        if lens.shape[0] != batch:
            raise ValueError(
                f"{name} must have shape [batch] = [{batch}] (mask.shape[0]); "
                f"got [{lens.shape[0]}]"
            )
    for axis, name, lens in ((1, "qo_lens", qo_lens), (2, "kv_lens", kv_lens)):
        over = np.flatnonzero(lens > mask.shape[axis])
        if over.size:
            b = int(over[0])
            raise ValueError(
                f"{name}[{b}]={lens[b]} does not fit in the padded mask: "
                f"mask.shape[{axis}]={mask.shape[axis]}"
            )
    # NOTE: only the valid region is converted, so padding may hold any value.
    return [
        _as_bool(mask[b, : qo_lens[b], : kv_lens[b]], f"mask[{b}]").copy()
        for b in range(batch)
    ]


def validate_packed(packed, mask_indptr, qo_lens, kv_lens, *, name="packed"):
    """Check a packed mask against its requests' lengths; raise ValueError if wrong.

    Parameters
    ----------
    packed : uint8 ndarray, 1-D
    mask_indptr : int32 ndarray, [batch + 1]
        Starts at 0; request b holds ``ceil(qo_lens[b] * kv_lens[b] / 8)`` bytes.
    qo_lens, kv_lens : integer array-like, [batch]
    name : str, what errors call ``packed`` (the caller's argument name)

    Example
    -------
    ``packed`` of 3 bytes, ``mask_indptr = [0, 1, 3]``, ``qo_lens = [2, 3]``,
    ``kv_lens = [3, 4]`` is valid: 6 bits fit in 1 byte, 12 bits in 2.
    """
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 ndarray; got {_describe(packed)}")
    if packed.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {packed.shape}")
    if not isinstance(mask_indptr, np.ndarray) or mask_indptr.dtype != np.int32:
        raise ValueError(f"mask_indptr must be an int32 ndarray; got {_describe(mask_indptr)}")
    qo_lens = _as_lengths(qo_lens, "qo_lens")
    kv_lens = _as_lengths(kv_lens, "kv_lens")
    if qo_lens.shape != kv_lens.shape:
        raise ValueError(
            f"qo_lens and kv_lens must have the same shape [batch]; "
            f"got {qo_lens.shape} and {kv_lens.shape}"
        )
    batch = qo_lens.shape[0]
    if mask_indptr.shape != (batch + 1,):
        raise ValueError(
            f"mask_indptr must have shape [batch + 1] = ({batch + 1},); "
            f"got {mask_indptr.shape}"
        )
    if mask_indptr[0] != 0:
        raise ValueError(f"mask_indptr must start at 0; got mask_indptr[0]={mask_indptr[0]}")
    sizes = np.diff(mask_indptr.astype(np.int64))
    expected = _packed_sizes(qo_lens, kv_lens)
    wrong = np.flatnonzero(sizes != expected)
    if wrong.size:
        b = int(wrong[0])
        raise ValueError(
            f"request {b} must hold ceil(qo_len * kv_len / 8) = "
            f"ceil({qo_lens[b]} * {kv_lens[b]} / 8) = {expected[b]} bytes; "
            f"mask_indptr[{b + 1}] - mask_indptr[{b}] = {sizes[b]}"
        )
    if mask_indptr[-1] > packed.shape[0]:
        raise ValueError(
            f"{name} is too short: mask_indptr[-1]={mask_indptr[-1]} bytes needed, "
            f"len(packed)={packed.shape[0]}"
        )


def _describe(x):
    """Short description of a value for error messages."""
    if isinstance(x, np.ndarray):
        return f"ndarray of dtype {x.dtype}"
    return type(x).__name__


def unpack(packed, mask_indptr, qo_lens, kv_lens, *, name="packed"):
    """Unpack a bit-packed mask into per-request 2-D bool masks.

    Parameters
    ----------
    packed : uint8 ndarray, 1-D
    mask_indptr : int32 ndarray, [batch + 1], in bytes
    qo_lens, kv_lens : integer array-like, [batch]
    name : str, what errors call ``packed`` (the caller's argument name)

    Returns
    -------
    masks : list of bool ndarray, each [qo_lens[b], kv_lens[b]]

    Example
    -------
    >>> unpack(np.array([5], np.uint8), np.array([0, 1], np.int32), [1], [3])
    [array([[ True, False,  True]])]
    """
    validate_packed(packed, mask_indptr, qo_lens, kv_lens, name=name)
    qo_lens = _as_lengths(qo_lens, "qo_lens")
    kv_lens = _as_lengths(kv_lens, "kv_lens")
    masks = []
    for b in range(qo_lens.shape[0]):
        n_bits = int(qo_lens[b] * kv_lens[b])
        chunk = packed[mask_indptr[b]:mask_indptr[b + 1]]
        bits = np.unpackbits(chunk, count=n_bits, bitorder=BIT_ORDER)
        masks.append(bits.astype(np.bool_).reshape(int(qo_lens[b]), int(kv_lens[b])))
    return masks


def classify_tiles(masks, item_request, item_q_start, queries_per_item, tile, packed=None,
                   mask_indptr=None):
    """Class of every (work item, key tile) of a custom mask: 0 empty, 1 full, 2 partial.

    A work item covers queries ``[q_start, q_start + queries_per_item)`` of its request; key tile
    i covers keys ``[tile * i, tile * (i + 1))``. Keys past a request's end do not count (they
    are masked by bounds anyway). Kernels skip empty tiles, run full tiles without reading the
    mask, and read bits only in partial tiles.

    Parameters
    ----------
    masks : list of bool [qo_len_b, kv_len_b], one per request
    item_request, item_q_start : int [num_items]
    queries_per_item, tile : int
    packed, mask_indptr : optional, the same masks packed (host uint8, ``pack``) and each
        request's first byte; requests whose key length is whole tiles are then classified
        from the bits (an eighth of the bytes of a bool mask)

    Returns
    -------
    classes : int32 [sum over items of ceil(kv_len / tile)], the items' classes back to back
    offsets : int32 [num_items], where each item's classes start
    key_range : int32 [num_items, 2], keys from the first to past the last non-empty tile
        ([0, 0] when every tile is empty): the only keys the item needs to load
    work : int32 [num_items], non-empty tiles of each item (its cost)

    Example
    -------
    >>> m = np.tril(np.ones((4, 4), bool))
    >>> classes, offsets, key_range, work = classify_tiles([m], np.array([0, 0]),
    ...                                                    np.array([0, 2]), 2, 2)
    >>> classes.tolist(), offsets.tolist(), key_range.tolist(), work.tolist()
    ([2, 0, 1, 2], [0, 2], [[0, 2], [0, 4]], [1, 2])
    """
    # Per request: class of every (block of queries_per_item queries from 0, key tile) [nq, nk],
    # and per query row whether each key tile has any / only visible keys (for items whose first
    # query is not a multiple of queries_per_item).
    blocks, rows = [], []
    for b, m in enumerate(masks):
        bits = None if packed is None else packed[int(mask_indptr[b]):int(mask_indptr[b + 1])]
        tile_any, tile_all = _row_tiles(m, tile, bits)
        qo_len, n_tiles = tile_any.shape
        nq = -(-qo_len // queries_per_item)
        pad = nq * queries_per_item - qo_len  # rows past the request do not count
        block_any = np.pad(tile_any, ((0, pad), (0, 0)), constant_values=False)
        block_all = np.pad(tile_all, ((0, pad), (0, 0)), constant_values=True)
        block_any = block_any.reshape(nq, queries_per_item, n_tiles).any(axis=1)
        block_all = block_all.reshape(nq, queries_per_item, n_tiles).all(axis=1)
        blocks.append(_tile_classes(block_any, block_all))
        rows.append((tile_any, tile_all))
    item_classes = []
    for b, q0 in zip(np.asarray(item_request).tolist(), np.asarray(item_q_start).tolist()):
        if q0 % queries_per_item == 0:
            item_classes.append(blocks[b][q0 // queries_per_item])
        else:
            tile_any, tile_all = rows[b]
            span = slice(q0, q0 + queries_per_item)
            item_classes.append(_tile_classes(tile_any[span].any(axis=0),
                                              tile_all[span].all(axis=0)))
    sizes = np.array([c.size for c in item_classes], np.int64)
    offsets = np.cumsum(sizes) - sizes
    flat = np.concatenate(item_classes) if item_classes else np.zeros(0, np.int32)
    # Non-empty tiles of each item: their count, the first and one past the last.
    used = flat != 0
    item_of = np.repeat(np.arange(len(sizes)), sizes)
    work = np.bincount(item_of[used], minlength=len(sizes))
    tile_index = np.arange(flat.size) - np.repeat(offsets, sizes)
    first = np.full(len(sizes), flat.size, np.int64)
    last = np.full(len(sizes), -1, np.int64)
    np.minimum.at(first, item_of[used], tile_index[used])
    np.maximum.at(last, item_of[used], tile_index[used])
    kv_lens = np.array([m.shape[1] for m in masks], np.int64)[np.asarray(item_request, np.int64)] \
        if len(sizes) else np.zeros(0, np.int64)
    key_range = np.stack([first * tile, np.minimum(kv_lens, (last + 1) * tile)], axis=1)
    key_range[work == 0] = 0
    return (flat.astype(np.int32), offsets.astype(np.int32), key_range.astype(np.int32),
            work.astype(np.int32))


_ONE_BYTES = np.uint64(0x0101010101010101)


def _row_tiles(m, tile, bits=None):
    """Per query row of ``m [qo_len, kv_len]`` and key tile: (any key visible, every key
    visible), bool [qo_len, ceil(kv_len / tile)]; keys past kv_len count as neither hidden nor
    visible. With ``bits`` (m packed, little-endian) and whole tiles of whole bytes, the bits are
    reduced a word at a time; else whole tiles of 8-key words of the bools (a bool is a byte)."""
    qo_len, kv_len = m.shape
    n_tiles = -(-kv_len // tile)
    if bits is not None and kv_len % tile == 0 and tile % 8 == 0 and qo_len and kv_len:
        word = next(w for w in (np.uint64, np.uint32, np.uint16, np.uint8)
                    if (tile // 8) % np.dtype(w).itemsize == 0)  # rows start on whole words
        words = bits[:qo_len * kv_len // 8].view(word).reshape(qo_len, n_tiles, -1)
        any_bits, all_bits = words[:, :, 0].copy(), words[:, :, 0].copy()
        for i in range(1, words.shape[2]):  # a few words a tile: elementwise beats reduce
            any_bits |= words[:, :, i]
            all_bits &= words[:, :, i]
        return any_bits != 0, all_bits == np.iinfo(word).max
    if kv_len % tile == 0 and tile % 8 == 0 and qo_len and kv_len:
        raw = np.ascontiguousarray(m).view(np.uint8)
        if raw.max() <= 1:  # bytes 0 / 1 (a bool made by a view could hold any nonzero byte)
            words = raw.view(np.uint64).reshape(qo_len, n_tiles, tile // 8)
            tile_any = np.bitwise_or.reduce(words, axis=2) != 0
            tile_all = np.bitwise_and.reduce(words, axis=2) == _ONE_BYTES  # every byte 1
            return tile_any, tile_all
    pad = n_tiles * tile - kv_len
    tile_any = np.pad(m, ((0, 0), (0, pad)), constant_values=False)
    tile_all = np.pad(m, ((0, 0), (0, pad)), constant_values=True)
    return (tile_any.reshape(qo_len, n_tiles, tile).any(axis=2),
            tile_all.reshape(qo_len, n_tiles, tile).all(axis=2))


def _tile_classes(has_any, is_full):
    """0 empty, 1 full, 2 partial."""
    return np.where(is_full, 1, np.where(has_any, 2, 0)).astype(np.int32)
