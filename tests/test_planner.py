"""cpattn.planner: index arrays of paged batches, page-table validation, the decode work list."""
import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn import planner, reference

I32 = np.int32
PAGE_SIZES = (1, 5, 16, 64)


def i32(*values):
    return np.array(values, dtype=I32)


def test_docstring_examples():
    result = doctest.testmod(planner, extraglobs={"np": np})
    assert result.attempted > 0 and result.failed == 0


# ---- cu_seqlens and the two length forms ------------------------------------------------------

def test_cu_seqlens():
    np.testing.assert_array_equal(planner.cu_seqlens([2, 3, 1]), i32(0, 2, 5, 6))
    assert planner.cu_seqlens(i32()).tolist() == [0]
    assert planner.cu_seqlens([0, 0]).dtype == I32


@pytest.mark.parametrize("lengths, match", [
    ([2, -1], r"lengths must be >= 0; got lengths\[1\]=-1"),
    ([[1, 2]], "lengths must be a 1-D integer array"),
    ([1.5], "lengths must be a 1-D integer array"),
    ([2**31 - 1, 1], "the lengths must sum to at most 2147483647"),
    (np.array([2**62] * 4), "the lengths must sum to at most 2147483647"),  # int64 would wrap
    (np.array([2**63], np.uint64), "the lengths must sum to at most 2147483647"),
])
def test_cu_seqlens_errors(lengths, match):
    with pytest.raises(ValueError, match=match):
        planner.cu_seqlens(lengths)


def test_lens_and_last_page_len_examples():
    indptr = i32(0, 2, 2, 5)
    np.testing.assert_array_equal(planner.lens_from_last_page_len(indptr, i32(3, 0, 4), 4),
                                  i32(7, 0, 12))
    np.testing.assert_array_equal(planner.last_page_len_from_lens(indptr, i32(7, 0, 12), 4),
                                  i32(3, 0, 4))
    # The last_page_len entry of a request with no pages is ignored.
    np.testing.assert_array_equal(planner.lens_from_last_page_len(indptr, i32(3, 9, 4), 4),
                                  i32(7, 0, 12))


@st.composite
def page_tables(draw, max_batch=12):
    """(kv_indptr, kv_lens, page_size): random pages per request and a length that fits them."""
    page_size = draw(st.sampled_from(PAGE_SIZES))
    pages = draw(st.lists(st.integers(0, 6), max_size=max_batch))
    lens = [0 if p == 0 else (p - 1) * page_size + draw(st.integers(1, page_size)) for p in pages]
    return planner.cu_seqlens(pages), np.array(lens, dtype=I32), page_size


@given(page_tables())
def test_lens_last_page_len_round_trip(table):
    indptr, lens, page_size = table
    last = planner.last_page_len_from_lens(indptr, lens, page_size)
    assert last.dtype == I32 and last.shape == lens.shape
    pages = np.diff(indptr)
    assert ((last >= 1) & (last <= page_size))[pages > 0].all() and (last[pages == 0] == 0).all()
    np.testing.assert_array_equal(planner.lens_from_last_page_len(indptr, last, page_size), lens)
    expected = reference.paged_kv_lens(indptr, page_size, kv_last_page_len=last)
    np.testing.assert_array_equal(lens, expected)


# ---- check_page_table ------------------------------------------------------------------------

@given(page_tables(), st.integers(0, 2**31 - 1))
def test_check_page_table_returns_lens(table, seed):
    indptr, lens, page_size = table
    rng = np.random.default_rng(seed)
    num_pages = int(indptr[-1]) + 3
    indices = rng.integers(0, num_pages, indptr[-1]).astype(I32)
    last = planner.last_page_len_from_lens(indptr, lens, page_size)
    for kwargs in (dict(kv_lens=lens), dict(kv_last_page_len=last)):
        out = planner.check_page_table(indptr, indices, num_pages, page_size, **kwargs)
        assert out.dtype == I32
        np.testing.assert_array_equal(out, lens)


def _table(**changes):
    """A valid table (3 requests: 2, 0 and 3 pages of 4 tokens, 7 + 0 + 10 tokens), changed."""
    args = dict(kv_indptr=i32(0, 2, 2, 5), kv_indices=i32(0, 1, 2, 3, 4), num_pages=8,
                page_size=4, kv_lens=i32(7, 0, 10))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, match", [
    (dict(kv_indptr=i32(1, 2, 2, 5)), ValueError,
     r"kv_indptr must start at 0; got kv_indptr\[0\]=1"),
    (dict(kv_indptr=i32(0, 3, 2, 5)), ValueError,
     r"kv_indptr must be non-decreasing; kv_indptr\[1\]=3 > kv_indptr\[2\]=2"),
    (dict(kv_indptr=i32(0, 2, 2, 4)), ValueError,
     r"kv_indptr must end at len\(kv_indices\)=5; got kv_indptr\[-1\]=4"),
    (dict(kv_indptr=i32()), ValueError, "kv_indptr must have batch \\+ 1 >= 1 entries; got 0"),
    (dict(kv_indptr=np.array([0, 2, 2, 5], np.int64)), ValueError,
     "kv_indptr must have dtype int32; got int64"),
    (dict(kv_indices=i32(0, 1, 2, 8, 4)), ValueError,
     r"kv_indices\[3\]=8 is out of range \[0, num_pages=8\)"),
    (dict(kv_indices=i32(0, -1, 2, 3, 4)), ValueError,
     r"kv_indices\[1\]=-1 is out of range \[0, num_pages=8\)"),
    (dict(kv_indices=i32(0, 1, 2, 3, 4).reshape(5, 1)), ValueError,
     r"kv_indices must be one-dimensional; got shape \(5, 1\)"),
    (dict(kv_indices=[0, 1, 2, 3, 4]), TypeError,
     "kv_indices must be a CuPy or NumPy array or a DLPack tensor; got list"),
    (dict(kv_lens=i32(7, 0)), ValueError, "kv_lens must have 3 entries; got 2"),
    (dict(kv_lens=i32(9, 0, 10)), ValueError,
     r"kv_lens\[0\]=9 must be in \[5, 8\] for a request with 2 pages of page_size=4"),
    (dict(kv_lens=i32(4, 0, 10)), ValueError, r"kv_lens\[0\]=4 must be in \[5, 8\]"),
    (dict(kv_lens=i32(7, 1, 10)), ValueError,
     r"kv_lens\[1\]=1 must be 0 for a request with 0 pages of page_size=4"),
    (dict(kv_lens=i32(7, -3, 10)), ValueError, r"kv_lens\[1\]=-3 must be 0"),
    (dict(kv_lens=None), ValueError,
     "give exactly one of kv_lens or kv_last_page_len; got neither"),
    (dict(kv_last_page_len=i32(3, 0, 2)), ValueError,
     "give exactly one of kv_lens or kv_last_page_len; got both"),
    (dict(kv_lens=None, kv_last_page_len=i32(3, 0, 0)), ValueError,
     r"kv_last_page_len\[2\]=0 must be in \[1, page_size=4\] for a request with 3 pages"),
    (dict(kv_lens=None, kv_last_page_len=i32(5, 0, 2)), ValueError,
     r"kv_last_page_len\[0\]=5 must be in \[1, page_size=4\]"),
    (dict(num_pages=0), ValueError, "num_pages must be >= 1; got 0"),
    (dict(page_size=2.0), TypeError, "page_size must be an integer; got float"),
])
def test_check_page_table_errors(changes, error, match):
    with pytest.raises(error, match=match):
        planner.check_page_table(**_table(**changes))


def test_check_page_table_valid_example():
    np.testing.assert_array_equal(planner.check_page_table(**_table()), i32(7, 0, 10))
    last = _table(kv_lens=None, kv_last_page_len=i32(3, 0, 2))
    np.testing.assert_array_equal(planner.check_page_table(**last), i32(7, 0, 10))


@pytest.mark.gpu
def test_check_page_table_accepts_cupy_arrays():
    import cupy
    args = _table()
    for name in ("kv_indptr", "kv_indices", "kv_lens"):
        args[name] = cupy.asarray(args[name])
    out = planner.check_page_table(**args)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, i32(7, 0, 10))


# ---- partition_decode ------------------------------------------------------------------------

def _items(lens, chunk):
    return int(np.maximum(1, -(-lens.astype(np.int64) // chunk)).sum())


def _check_work(work, lens):
    """Invariants of every DecodeWork: coverage, order, merge_indptr, dtypes."""
    batch = lens.shape[0]
    for name in ("request", "kv_start", "kv_end", "merge_indptr"):
        assert getattr(work, name).dtype == I32, name
    assert work.merge_indptr.shape == (batch + 1,) and work.merge_indptr[0] == 0
    assert work.merge_indptr[-1] == work.num_items == work.request.shape[0]
    assert (np.diff(work.merge_indptr) >= 1).all()  # every request has an item
    assert (np.diff(work.request) >= 0).all()  # ordered by request
    np.testing.assert_array_equal(work.request,
                                  np.repeat(np.arange(batch), np.diff(work.merge_indptr)))
    assert work.chunk_size >= 1 and ((work.kv_end - work.kv_start) <= work.chunk_size).all()
    for b in range(batch):
        rows = slice(work.merge_indptr[b], work.merge_indptr[b + 1])
        starts, ends = work.kv_start[rows], work.kv_end[rows]
        if lens[b] == 0:  # one empty item
            assert starts.tolist() == [0] and ends.tolist() == [0]
            continue
        # Items tile [0, kv_len) in order, none empty: each token exactly once.
        assert starts[0] == 0 and ends[-1] == lens[b]
        assert (ends > starts).all() and (starts[1:] == ends[:-1]).all()
    assert work.split == bool((np.diff(work.merge_indptr) > 1).any())


lens_lists = st.lists(st.one_of(st.integers(0, 40), st.integers(0, 5000), st.integers(0, 300000)),
                      max_size=70)


@settings(max_examples=300)
@given(lens_lists, st.sampled_from((1, 2, 4, 8)), st.sampled_from((1, 4, 108, 132)),
       st.sampled_from((1, 2, 3)), st.sampled_from((1, 16, 256)), st.sampled_from((1, 16, 64)))
def test_partition_decode_properties(lens, heads, num_sms, ctas_per_sm, min_chunk, tile):
    lens = np.array(lens, dtype=I32)
    work = planner.partition_decode(lens, heads, num_sms=num_sms, ctas_per_sm=ctas_per_sm,
                                    min_chunk=min_chunk, tile=tile)
    _check_work(work, lens)
    slots = num_sms * ctas_per_sm
    if work.split:
        assert len(lens) * heads < slots  # never split a batch that fills the GPU
        chunk = work.chunk_size
        assert chunk % tile == 0 and chunk >= min_chunk
        assert work.num_items * heads <= slots  # one wave
        # ... and the smallest chunk that achieves it.
        smaller = chunk - tile
        assert smaller < min_chunk or _items(lens, smaller) * heads > slots
        np.testing.assert_array_equal(np.diff(work.merge_indptr),
                                      np.maximum(1, -(-lens.astype(np.int64) // chunk)))
    else:
        assert work.num_items == len(lens)
        np.testing.assert_array_equal(work.kv_end, lens)
        assert work.chunk_size % tile == 0


@settings(max_examples=200)
@given(lens_lists, st.integers(1, 80))
def test_partition_decode_max_items(lens, max_items):
    lens = np.array(lens, dtype=I32)
    if len(lens) > max_items:
        with pytest.raises(ValueError, match=f"max_items={max_items} is below batch={len(lens)}"):
            planner.partition_decode(lens, 1, num_sms=132, max_items=max_items)
        return
    work = planner.partition_decode(lens, 1, num_sms=132, max_items=max_items, min_chunk=16)
    _check_work(work, lens)
    assert work.num_items <= max_items


def test_partition_decode_full_gpu_is_one_item_per_request():
    lens = i32(5000, 1, 0, 70000)
    work = planner.partition_decode(lens, 8, num_sms=2, ctas_per_sm=2)  # 4 * 8 >= 4 slots
    assert not work.split and work.num_items == 4 and work.chunk_size == 70000
    np.testing.assert_array_equal(work.kv_start, 0)
    np.testing.assert_array_equal(work.kv_end, lens)
    np.testing.assert_array_equal(work.merge_indptr, np.arange(5))


def test_partition_decode_short_requests_are_not_split():
    work = planner.partition_decode(i32(100, 200, 0), 1, num_sms=132)  # all under min_chunk
    assert not work.split and work.num_items == 3 and work.chunk_size == 208


def test_partition_decode_one_long_request():
    work = planner.partition_decode(i32(100000), 1, num_sms=100, ctas_per_sm=2)
    # budget 200 items: chunk >= 1e5 / 200 = 500, rounded up to the tile: 512, ceil(1e5 / 512) = 196
    assert work.split and work.chunk_size == 512 and work.num_items == 196
    _check_work(work, i32(100000))
    exact = planner.partition_decode(i32(100000), 1, num_sms=100, tile=1)
    assert exact.chunk_size == 500 and exact.num_items == 200


def test_partition_decode_empty_batch():
    work = planner.partition_decode(i32(), 4, num_sms=132)
    assert work.num_items == 0 and work.merge_indptr.tolist() == [0] and not work.split


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kv_lens=i32(5, -1)), ValueError, r"kv_lens must be >= 0; got kv_lens\[1\]=-1"),
    (dict(kv_lens=np.array([5, 1], np.int64)), ValueError, "kv_lens must have dtype int32"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads must be >= 1; got 0"),
    (dict(num_sms=0), ValueError, "num_sms must be >= 1; got 0"),
    (dict(tile=0), ValueError, "tile must be >= 1; got 0"),
    (dict(min_chunk=1.5), TypeError, "min_chunk must be an integer; got float"),
    (dict(max_items=1), ValueError, "max_items=1 is below batch=2: every request needs"),
])
def test_partition_decode_errors(kwargs, error, match):
    args = dict(kv_lens=i32(5, 1), num_kv_heads=1, num_sms=132)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        planner.partition_decode(args.pop("kv_lens"), args.pop("num_kv_heads"), **args)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 20000), min_size=1, max_size=300), st.integers(1, 16),
       st.integers(1, 8))
def test_balanced_waves_cover_every_token_once(lens, heads, num_sms):
    """balance_waves may cut a GPU-filling batch, but the items still tile every request."""
    kv_lens = np.asarray(lens, np.int32)
    work = planner.partition_decode(kv_lens, heads, num_sms=num_sms, ctas_per_sm=3, tile=64,
                                    balance_waves=True)
    for b, n in enumerate(lens):
        rows = slice(work.merge_indptr[b], work.merge_indptr[b + 1])
        starts, ends = work.kv_start[rows], work.kv_end[rows]
        assert (work.request[rows] == b).all() and len(starts) >= 1
        assert starts[0] == 0 and ends[-1] == n and (starts[1:] == ends[:-1]).all()


def test_balanced_waves_cut_a_batch_of_one_and_a_third_waves():
    work = planner.partition_decode(np.full(64, 4096, np.int32), 8, num_sms=132, ctas_per_sm=3,
                                    tile=64, balance_waves=True)
    assert work.split and work.num_items == 192 and work.chunk_size == 1408
    plain = planner.partition_decode(np.full(64, 4096, np.int32), 8, num_sms=132, ctas_per_sm=3,
                                     tile=64)
    assert not plain.split and plain.num_items == 64


def test_balanced_waves_leave_two_waves_whole():
    """128 x 8 = 1024 CTAs on 396 slots (2.6 waves): cutting would cost more than it fills."""
    work = planner.partition_decode(np.full(128, 2048, np.int32), 8, num_sms=132, ctas_per_sm=3,
                                    tile=64, balance_waves=True)
    assert not work.split and work.num_items == 128


@pytest.mark.parametrize("qo_lens, kv_lens, match", [
    ([3, -1], [10, 10], r"qo_lens must be >= 0; got qo_lens\[1\]=-1"),
    ([3, 1], [10], "qo_lens and kv_lens must have one entry a request; got 2 and 1"),
    ([3.5], [10], "qo_lens must be a 1-D integer array"),
    ([3], [[10]], "kv_lens must be a 1-D integer array"),
])
def test_partition_tiles_errors(qo_lens, kv_lens, match):
    with pytest.raises(ValueError, match=match):
        planner.partition_tiles(np.array(qo_lens), np.array(kv_lens), 2, False, 1, num_sms=4)


def test_negative_page_ids_at_plan_time():
    """plan() checks page ids against no pool (num_pages 2^31 - 1): a negative one is named."""
    with pytest.raises(ValueError, match=r"kv_indices\[1\]=-1 must be >= 0 \(a page id\)"):
        planner.check_page_table(i32(0, 2), i32(3, -1), 2**31 - 1, 4, kv_lens=i32(5))


@pytest.mark.gpu
def test_plan_buffer_layouts_come_and_go():
    """PlanBuffer keeps the last layout: plans of other sizes, of other array sets, then the
    first again, each read back from the device at the pointers upload() returned."""
    import cupy
    from cpattn import _core
    buf = _core.PlanBuffer()
    rng = np.random.default_rng(0)
    plans = [dict(num_items=np.array([3], np.int32), kv_indptr=np.arange(6, dtype=np.int32),
                  kv_indices=rng.integers(0, 99, 9).astype(np.int32)),
             dict(num_items=np.array([7], np.int32), kv_indptr=np.arange(2, dtype=np.int32),
                  kv_indices=rng.integers(0, 99, 300).astype(np.int32)),
             dict(num_items=np.array([1], np.int32), kv_lens=np.arange(5, dtype=np.int32))]
    for arrays in plans + plans[:1] + plans[1:2]:
        pointers = buf.upload(arrays)
        cupy.cuda.get_current_stream().synchronize()
        for name, arr in arrays.items():
            mem = cupy.cuda.UnownedMemory(pointers[name], arr.nbytes, buf)
            got = cupy.ndarray(arr.shape, np.int32, cupy.cuda.MemoryPointer(mem, 0))
            np.testing.assert_array_equal(cupy.asnumpy(got), arr, err_msg=name)
        assert all(ptr == 0 for name, ptr in pointers.items() if name not in arrays)
