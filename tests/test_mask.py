"""CPU tests of cpattn.mask: flattening, bit packing, padded -> ragged, validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn import mask

MAX_QO_LEN = 6
MAX_KV_LEN = 13
MAX_BATCH = 6
HYPOTHESIS_EXAMPLES = 200

request_shapes = st.lists(
    st.tuples(st.integers(0, MAX_QO_LEN), st.integers(0, MAX_KV_LEN)), max_size=MAX_BATCH
)
seeds = st.integers(0, 2**32 - 1)


def random_masks(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.random(shape) < 0.5 for shape in shapes]


def lens_of(masks):
    qo_lens = np.array([m.shape[0] for m in masks], dtype=np.int64)
    kv_lens = np.array([m.shape[1] for m in masks], dtype=np.int64)
    return qo_lens, kv_lens


def indptr_of(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def assert_masks_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == np.bool_
        np.testing.assert_array_equal(a, e)


# ------------------------------------------------------------------- property tests


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None)
@given(request_shapes, seeds)
def test_pack_unpack_round_trip(shapes, seed):
    masks = random_masks(shapes, seed)
    qo_lens, kv_lens = lens_of(masks)
    packed, mask_indptr = mask.pack(masks)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert mask_indptr.dtype == np.int32 and mask_indptr.shape == (len(masks) + 1,)
    # each request padded to a byte boundary
    np.testing.assert_array_equal(np.diff(mask_indptr), (qo_lens * kv_lens + 7) // 8)
    assert mask_indptr[-1] == packed.shape[0]
    mask.validate_packed(packed, mask_indptr, qo_lens, kv_lens)
    assert_masks_equal(mask.unpack(packed, mask_indptr, qo_lens, kv_lens), masks)


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None)
@given(request_shapes, seeds)
def test_flatten_round_trip_and_pack_flat(shapes, seed):
    masks = random_masks(shapes, seed)
    qo_lens, kv_lens = lens_of(masks)
    flat, elem_indptr = mask.flatten(masks)
    assert flat.dtype == np.bool_ and flat.shape == (int(np.sum(qo_lens * kv_lens)),)
    assert elem_indptr.dtype == np.int64
    np.testing.assert_array_equal(elem_indptr, indptr_of(qo_lens * kv_lens))
    assert_masks_equal(mask.unflatten(flat, qo_lens, kv_lens), masks)
    packed, mask_indptr = mask.pack(masks)
    packed_flat, mask_indptr_flat = mask.pack_flat(flat, indptr_of(qo_lens), indptr_of(kv_lens))
    np.testing.assert_array_equal(packed_flat, packed)
    np.testing.assert_array_equal(mask_indptr_flat, mask_indptr)


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None)
@given(request_shapes, seeds, st.integers(0, 3), st.integers(0, 3))
def test_from_padded_round_trip(shapes, seed, extra_qo, extra_kv):
    masks = random_masks(shapes, seed)
    qo_lens, kv_lens = lens_of(masks)
    max_qo = int(qo_lens.max(initial=0)) + extra_qo
    max_kv = int(kv_lens.max(initial=0)) + extra_kv
    rng = np.random.default_rng(seed + 1)
    padded = rng.random((len(masks), max_qo, max_kv)) < 0.5  # padding holds garbage
    for b, m in enumerate(masks):
        padded[b, : m.shape[0], : m.shape[1]] = m
    assert_masks_equal(mask.from_padded(padded, qo_lens, kv_lens), masks)


# ------------------------------------------------------------------ worked examples


def test_packbits_little_bit_order():
    # bit i of a request is bit (i % 8) of its byte: 1 + 2 + 8 = 11 (big order would be 208)
    packed, _ = mask.pack([np.array([[True, True, False, True]])])
    np.testing.assert_array_equal(packed, np.array([11], dtype=np.uint8))
    # the 9th element starts the second byte
    packed, _ = mask.pack([np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=bool)])
    np.testing.assert_array_equal(packed, np.array([1, 1], dtype=np.uint8))


def test_pack_worked_example_mask_indptr_in_bytes():
    a = np.array([[1, 0, 1], [1, 1, 0]], dtype=bool)  # 6 bits -> 1 byte: 1+4+8+16 = 29
    b = np.eye(3, 4, dtype=bool)  # 12 bits (set: 0, 5, 10) -> 2 bytes: 1+32 = 33, 4
    c = np.zeros((0, 5), dtype=bool)  # 0 bits -> 0 bytes
    d = np.ones((1, 1), dtype=bool)  # 1 bit -> 1 byte
    packed, mask_indptr = mask.pack([a, b, c, d])
    np.testing.assert_array_equal(packed, np.array([29, 33, 4, 1], dtype=np.uint8))
    np.testing.assert_array_equal(mask_indptr, np.array([0, 1, 3, 3, 4], dtype=np.int32))
    unpacked = mask.unpack(packed, mask_indptr, [2, 3, 0, 1], [3, 4, 5, 1])
    assert_masks_equal(unpacked, [a, b, c, d])


def test_flatten_worked_example():
    flat, elem_indptr = mask.flatten([np.array([[1, 0, 1], [1, 1, 0]], dtype=bool),
                                      np.array([[0, 1]], dtype=bool)])
    np.testing.assert_array_equal(flat, np.array([1, 0, 1, 1, 1, 0, 0, 1], dtype=bool))
    np.testing.assert_array_equal(elem_indptr, [0, 6, 8])


def test_empty_batch():
    flat, elem_indptr = mask.flatten([])
    assert flat.shape == (0,) and list(elem_indptr) == [0]
    packed, mask_indptr = mask.pack([])
    assert packed.shape == (0,) and packed.dtype == np.uint8
    assert mask_indptr.dtype == np.int32 and list(mask_indptr) == [0]
    assert mask.unpack(packed, mask_indptr, [], []) == []


def test_lengths_from_indptr():
    np.testing.assert_array_equal(
        mask.lengths_from_indptr(np.array([0, 2, 5, 6], dtype=np.int32)), [2, 3, 1]
    )
    with pytest.raises(ValueError, match=r"kv_indptr must be non-decreasing; "
                                         r"kv_indptr\[3\]=40 > kv_indptr\[4\]=32"):
        mask.lengths_from_indptr(np.array([0, 8, 16, 40, 32], np.int32), "kv_indptr")
    with pytest.raises(ValueError, match=r"qo_indptr must start at 0; got qo_indptr\[0\]=1"):
        mask.lengths_from_indptr(np.array([1, 2], np.int32), "qo_indptr")
    with pytest.raises(ValueError, match=r"indptr must hold integers"):
        mask.lengths_from_indptr(np.array([0.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[batch \+ 1\]"):
        mask.lengths_from_indptr(np.zeros((2, 2), np.int32))


# ---------------------------------------------------------------------- from_padded


def test_from_padded_different_qo_and_kv_lengths():
    padded = np.arange(2 * 4 * 5).reshape(2, 4, 5) % 3 == 0
    masks = mask.from_padded(padded, qo_lens=[4, 1], kv_lens=[2, 5])
    assert [m.shape for m in masks] == [(4, 2), (1, 5)]
    np.testing.assert_array_equal(masks[0], padded[0, :4, :2])
    np.testing.assert_array_equal(masks[1], padded[1, :1, :5])


def test_from_padded_accepts_0_1_integers_and_ignores_padding():
    padded = np.full((1, 3, 3), 7, dtype=np.int8)  # padding may hold anything
    padded[0, :2, :2] = [[1, 0], [0, 1]]
    (m,) = mask.from_padded(padded, [2], [2])
    np.testing.assert_array_equal(m, np.eye(2, dtype=bool))


@pytest.mark.parametrize(
    "qo_lens, kv_lens, match",
    [
        ([4, 5], [2, 2], r"qo_lens\[1\]=5 does not fit in the padded mask: mask.shape\[1\]=4"),
        ([1, 1], [6, 2], r"kv_lens\[0\]=6 does not fit in the padded mask: mask.shape\[2\]=5"),
        ([1], [1], r"qo_lens must have shape \[batch\] = \[2\] \(mask.shape\[0\]\); got \[1\]"),
        ([1, -1], [1, 1], r"qo_lens must be >= 0; got qo_lens\[1\]=-1"),
    ],
)
def test_from_padded_errors(qo_lens, kv_lens, match):
    with pytest.raises(ValueError, match=match):
        mask.from_padded(np.ones((2, 4, 5), dtype=bool), qo_lens, kv_lens)


def test_from_padded_rejects_non_3d_and_non_binary():
    with pytest.raises(ValueError, match=r"mask must be 3-D"):
        mask.from_padded(np.ones((4, 5), dtype=bool), [4], [5])
    with pytest.raises(ValueError, match=r"mask\[0\] must be bool \(or integers 0/1\)"):
        mask.from_padded(np.full((1, 2, 2), 2), [2], [2])
    with pytest.raises(ValueError, match=r"mask must be bool"):
        mask.from_padded(np.ones((1, 2, 2), dtype=np.float32), [2], [2])


# ------------------------------------------------------------------ validate_packed

# two requests: [2, 3] (1 byte) and [3, 4] (2 bytes)
QO_LENS = [2, 3]
KV_LENS = [3, 4]
GOOD_PACKED = np.array([29, 33, 4], dtype=np.uint8)
GOOD_INDPTR = np.array([0, 1, 3], dtype=np.int32)


@pytest.mark.parametrize(
    "packed, mask_indptr, match",
    [
        (GOOD_PACKED.astype(np.int8), GOOD_INDPTR, r"packed must be a uint8 ndarray; got .*int8"),
        ([29, 33, 4], GOOD_INDPTR, r"packed must be a uint8 ndarray; got list"),
        (GOOD_PACKED, GOOD_INDPTR.astype(np.int64),
         r"mask_indptr must be an int32 ndarray; got ndarray of dtype int64"),
        (GOOD_PACKED, np.array([0, 3], np.int32),
         r"mask_indptr must have shape \[batch \+ 1\] = \(3,\); got \(2,\)"),
        (GOOD_PACKED, np.array([1, 2, 4], np.int32),
         r"mask_indptr must start at 0; got mask_indptr\[0\]=1"),
        (GOOD_PACKED, np.array([0, 2, 3], np.int32),
         r"request 0 must hold ceil\(qo_len \* kv_len / 8\) = ceil\(2 \* 3 / 8\) = 1 bytes; "
         r"mask_indptr\[1\] - mask_indptr\[0\] = 2"),
        (GOOD_PACKED[:2], GOOD_INDPTR,
         r"packed is too short: mask_indptr\[-1\]=3 bytes needed, len\(packed\)=2"),
    ],
    ids=["dtype", "not-array", "indptr-dtype", "indptr-length", "start", "size", "short"],
)
def test_validate_packed_errors(packed, mask_indptr, match):
    with pytest.raises(ValueError, match=match):
        mask.validate_packed(packed, mask_indptr, QO_LENS, KV_LENS)
    with pytest.raises(ValueError, match=match):
        mask.unpack(packed, mask_indptr, QO_LENS, KV_LENS)


def test_validate_packed_accepts_good_and_longer_buffer():
    assert mask.validate_packed(GOOD_PACKED, GOOD_INDPTR, QO_LENS, KV_LENS) is None
    longer = np.concatenate([GOOD_PACKED, np.array([255], np.uint8)])
    mask.validate_packed(longer, GOOD_INDPTR, QO_LENS, KV_LENS)


def test_unflatten_and_pack_flat_size_errors():
    with pytest.raises(ValueError, match=r"flat_mask must have sum\(qo_len \* kv_len\) = 18 "
                                         r"elements; got 17"):
        mask.unflatten(np.ones(17, dtype=bool), QO_LENS, KV_LENS)
    with pytest.raises(ValueError, match=r"qo_indptr and kv_indptr must have the same shape"):
        mask.pack_flat(np.ones(6, dtype=bool), np.array([0, 2]), np.array([0, 3, 4]))


def test_pack_rejects_non_2d_masks():
    with pytest.raises(ValueError, match=r"masks\[1\] must be 2-D \[qo_len, kv_len\]; "
                                         r"got shape \(3,\)"):
        mask.pack([np.ones((2, 2), bool), np.ones(3, bool)])


def _classify_query_tiles(masks, shapes, queries_per_item, tile):
    """Items = every request's query tiles; (items, classify_tiles of them)."""
    items = [(b, q0) for b, (q, _) in enumerate(shapes) for q0 in range(0, q, queries_per_item)]
    request = np.array([b for b, _ in items], np.int64)
    q_start = np.array([q0 for _, q0 in items], np.int64)
    return items, mask.classify_tiles(masks, request, q_start, queries_per_item, tile)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=4),
       st.integers(1, 8), st.sampled_from([4, 8, 16, 32]), st.integers(0, 2 ** 31 - 1))
def test_classify_tiles_matches_brute_force(shapes, queries_per_item, tile, seed):
    rng = np.random.default_rng(seed)
    # Masks with whole empty and full blocks as well as random ones.
    masks = [rng.random((q, k)) < rng.choice([0.0, 0.5, 1.0]) for q, k in shapes]
    items, (classes, offsets, key_range, work) = _classify_query_tiles(masks, shapes,
                                                                       queries_per_item, tile)
    for i, (b, q0) in enumerate(items):
        m = masks[b][q0:q0 + queries_per_item]
        for t in range(-(-m.shape[1] // tile)):
            block = m[:, t * tile:(t + 1) * tile]
            want = 1 if block.all() else (2 if block.any() else 0)
            assert classes[offsets[i] + t] == want
        keys = np.flatnonzero(m.any(axis=0))
        assert work[i] == len({k // tile for k in keys})
        if keys.size:  # every visible key lies inside the item's key range
            assert key_range[i, 0] <= keys[0] and keys[-1] < key_range[i, 1]
        else:
            assert tuple(key_range[i]) == (0, 0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 6)), min_size=1, max_size=4),
       st.integers(1, 8), st.sampled_from([8, 16, 32]), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_classify_tiles_of_whole_word_tiles(shapes, queries_per_item, tile, odd_bytes, seed):
    """Key lengths that are whole tiles take the word-wise path; a bool mask whose True bytes
    are not 1 (a view of other bytes) must classify the same."""
    rng = np.random.default_rng(seed)
    masks = [rng.random((q, k * tile)) < rng.choice([0.0, 0.5, 0.97, 1.0]) for q, k in shapes]
    if odd_bytes:
        masks = [(m.view(np.uint8) * 3).view(bool) for m in masks]
    items, (classes, offsets, key_range, work) = _classify_query_tiles(masks, shapes,
                                                                       queries_per_item, tile)
    for i, (b, q0) in enumerate(items):
        m = masks[b][q0:q0 + queries_per_item] != 0
        n_tiles = m.shape[1] // tile
        blocks = m.reshape(m.shape[0], n_tiles, tile)
        want = np.where(blocks.all(axis=(0, 2)), 1, np.where(blocks.any(axis=(0, 2)), 2, 0))
        assert classes[offsets[i]:offsets[i] + n_tiles].tolist() == want.tolist()
        assert work[i] == int((want != 0).sum())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), min_size=1, max_size=4),
       st.integers(1, 8), st.sampled_from([8, 16, 32, 64, 128]), st.booleans(),
       st.integers(0, 2 ** 31 - 1))
def test_classify_tiles_from_packed_bits_matches_the_bools(shapes, queries_per_item, tile,
                                                           ragged_keys, seed):
    """Given the packed bits, whole-tile key lengths are classified from them, the rest from
    the bools: the same classes, ranges and costs either way."""
    rng = np.random.default_rng(seed)
    lens = [(q, k * tile + (int(rng.integers(1, tile)) if ragged_keys and k else 0))
            for q, k in shapes]
    masks = [rng.random((q, k)) < rng.choice([0.0, 0.5, 0.97, 1.0]) for q, k in lens]
    packed, mask_indptr = mask.pack(masks)
    items = [(b, q0) for b, (q, _) in enumerate(lens) for q0 in range(0, q, queries_per_item)]
    request = np.array([b for b, _ in items], np.int64)
    q_start = np.array([q0 for _, q0 in items], np.int64)
    plain = mask.classify_tiles(masks, request, q_start, queries_per_item, tile)
    bits = mask.classify_tiles(masks, request, q_start, queries_per_item, tile, packed=packed,
                               mask_indptr=mask_indptr)
    for a, b in zip(plain, bits):
        assert a.tolist() == b.tolist()
