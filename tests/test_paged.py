"""cpattn.paged: the page allocator, appending K/V (NumPy and CUDA), and every validation error."""
import doctest
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpattn._arrays as A
from cpattn import _kernels, paged, planner
from cpattn.paged import OutOfPagesError, PagedKVCache, append_paged_kv

from gpu_utils import CpuDLPack

I32 = np.int32
DTYPES = (A.FLOAT16, A.BFLOAT16)
LAYOUTS = ("NHD", "HND")
PAGE_SIZES = (1, 5, 16)
HEADS, DIM = 3, 64
NUM_PAGES = 128  # enough for every step of STEPS at page_size 1 (94 tokens)
#: New tokens per sequence at each step of a test scenario (4 sequences); None: a decode step.
STEPS = ([5, 0, 17, 1], [1, 3, 0, 40], None, [0, 0, 0, 0], [16, 1, 2, 0], None)


def nan_pools(num_pages, page_size, layout, dtype, heads=HEADS, dim=DIM, dim_v=None):
    shape = paged.pool_shape(num_pages, page_size, heads, dim, layout)
    v_shape = shape[:3] + (dim_v or dim,)
    return np.full(shape, np.nan, dtype=dtype), np.full(v_shape, np.nan, dtype=dtype)


def random_tokens(rng, n, dtype, heads=HEADS, dim=DIM):
    return rng.standard_normal((n, heads, dim)).astype(dtype)


def direct_write(pool, layout, pages, old_len, rows):
    """The reference: new token i of a sequence to slot (old_len + i) % page_size of its page."""
    page_size = pool.shape[1] if layout == "NHD" else pool.shape[2]
    for i, row in enumerate(rows):
        pos = old_len + i
        page, slot = pages[pos // page_size], pos % page_size
        if layout == "NHD":
            pool[page, slot] = row
        else:
            pool[page, :, slot] = row


def same_bytes(a, b):
    return np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def test_docstring_examples():
    result = doctest.testmod(paged, extraglobs={"np": np})
    assert result.attempted > 0 and result.failed == 0


# ---- allocator -------------------------------------------------------------------------------

def cpu_cache(num_pages=16, page_size=4, layout="NHD", dtype="float16"):
    return PagedKVCache(num_pages, page_size, HEADS, DIM, dtype, layout, device="cpu")


def test_grow_free_reuse():
    cache = cpu_cache()
    cache.add_sequence("a")
    cache.add_sequence(7)
    assert len(cache) == 2 and "a" in cache and cache.seq_len("a") == 0
    cache.grow("a", 9)  # 3 pages of 4
    cache.grow(7, 4)    # 1 page
    assert cache.seq_len("a") == 9 and cache.num_free_pages == 12
    assert cache.seq_pages("a").tolist() == [0, 1, 2] and cache.seq_pages(7).tolist() == [3]
    cache.grow("a", 12)  # fits in the 3rd page
    assert cache.num_free_pages == 12
    cache.grow("a", 13)
    assert cache.seq_pages("a").tolist() == [0, 1, 2, 4]
    cache.free("a")
    assert "a" not in cache and cache.num_free_pages == 15
    cache.add_sequence("b")
    cache.grow("b", 16)
    assert cache.seq_pages("b").tolist() == [0, 1, 2, 4]  # freed pages come back first
    assert cache.num_free_pages == 11


def test_one_id_is_not_a_sequence_of_ids():
    """A str would pass as its characters, an int is not iterable: both are refused by name,
    and nothing grows."""
    cache = cpu_cache()
    for seq in ("a", "b", "ab", 0):
        cache.add_sequence(seq)
    k = np.zeros((2, HEADS, DIM), np.float16)
    for ids in ("ab", 0):
        with pytest.raises(TypeError, match="seq_ids must be a sequence of ids"):
            cache.page_table(ids)
        with pytest.raises(TypeError, match="seq_ids must be a sequence of ids"):
            cache.append(ids, k, k)
    assert all(cache.seq_len(seq) == 0 for seq in ("a", "b", "ab", 0))
    assert cache.page_table(["ab"])[3].tolist() == [0]


def test_page_table_matches_lengths():
    cache = cpu_cache(num_pages=32, page_size=5)
    lens = {"x": 0, "y": 1, "z": 5, "w": 6, "v": 23}
    for seq, n in lens.items():
        cache.add_sequence(seq)
        cache.grow(seq, n)
    order = ["v", "x", "z", "y", "w", "z"]  # any order; repeats allowed
    kv_indptr, kv_indices, last, kv_lens = cache.page_table(order)
    for arr in (kv_indptr, kv_indices, last, kv_lens):
        assert arr.dtype == I32
    assert kv_lens.tolist() == [lens[s] for s in order]
    assert last.tolist() == [3, 0, 5, 1, 1, 5]
    assert np.diff(kv_indptr).tolist() == [5, 0, 1, 1, 2, 1]
    for b, seq in enumerate(order):
        assert kv_indices[kv_indptr[b]:kv_indptr[b + 1]].tolist() == cache.seq_pages(seq).tolist()
    checked = planner.check_page_table(kv_indptr, kv_indices, 32, 5, kv_last_page_len=last)
    np.testing.assert_array_equal(checked, kv_lens)
    empty = cache.page_table([])
    assert [a.shape for a in empty] == [(1,), (0,), (0,), (0,)]


def test_out_of_pages_changes_nothing():
    cache = cpu_cache(num_pages=4, page_size=4)
    for seq in ("a", "b"):
        cache.add_sequence(seq)
    cache.grow("a", 5)
    before = (cache.page_table(["a", "b"]), cache.num_free_pages)
    with pytest.raises(OutOfPagesError, match="3 more pages are needed but 2 of 4 are free"):
        cache.grow("b", 12)
    k = np.zeros((13, HEADS, DIM), np.float16)
    with pytest.raises(OutOfPagesError, match="4 more pages are needed but 2 of 4 are free"):
        cache.append(["a", "b"], k, k, np.array([0, 8, 13], I32))  # a: 2 -> 4 pages, b: 2
    after = (cache.page_table(["a", "b"]), cache.num_free_pages)
    assert after[1] == before[1]
    for x, y in zip(after[0], before[0]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("call, error, match", [
    (lambda c: c.grow("missing", 3), KeyError,
     "unknown sequence 'missing'; add it with add_sequence"),
    (lambda c: c.seq_len("missing"), KeyError, "unknown sequence 'missing'"),
    (lambda c: c.free("missing"), KeyError, "unknown sequence 'missing'"),
    (lambda c: c.page_table(["a", "missing"]), KeyError, "unknown sequence 'missing'"),
    (lambda c: c.add_sequence("a"), ValueError, "sequence 'a' already exists"),
    (lambda c: c.add_sequence(["a"]), TypeError, "sequence ids must be hashable; got list"),
    (lambda c: c.page_table([["a"]]), TypeError, "sequence ids must be hashable; got list"),
    (lambda c: c.grow("a", 2), ValueError, "sequence 'a' holds 6 tokens and cannot grow to 2"),
    (lambda c: c.grow("a", -1), ValueError, "new_len must be >= 0; got -1"),
    (lambda c: c.grow("a", 2**31), ValueError, "cannot grow to 2147483648 \\(kv_lens are int32\\)"),
])
def test_allocator_errors(call, error, match):
    cache = cpu_cache()
    cache.add_sequence("a")
    cache.grow("a", 6)
    with pytest.raises(error, match=match):
        call(cache)
    assert cache.seq_len("a") == 6 and cache.num_free_pages == 14


@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 5),
                          st.integers(0, 30)), max_size=40),
       st.sampled_from(PAGE_SIZES))
def test_allocator_invariants(ops, page_size):
    """Whatever happens, live sequences own disjoint pages, exactly ceil(len / page_size) each,
    and every page is either owned or free."""
    num_pages = 24
    cache = cpu_cache(num_pages=num_pages, page_size=page_size)
    lens = {}
    for op, seq, n in ops:
        if op == "add" and seq not in lens:
            cache.add_sequence(seq)
            lens[seq] = 0
        elif op == "grow" and seq in lens:
            try:
                cache.grow(seq, lens[seq] + n)
                lens[seq] += n
            except OutOfPagesError:
                pass
        elif op == "free" and seq in lens:
            cache.free(seq)
            del lens[seq]
        owned = [cache.seq_pages(s) for s in lens]
        for s, pages in zip(lens, owned):
            assert cache.seq_len(s) == lens[s] and len(pages) == -(-lens[s] // page_size)
        flat = np.concatenate(owned) if owned else np.zeros(0, I32)
        assert len(set(flat.tolist())) == flat.size  # disjoint
        assert flat.size + cache.num_free_pages == num_pages
        assert ((flat >= 0) & (flat < num_pages)).all()


# ---- construction ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_allocated_pools(layout):
    cache = PagedKVCache(10, 5, 2, 16, "bfloat16", layout, device="cpu")
    assert cache.k_pages.shape == paged.pool_shape(10, 5, 2, 16, layout)
    assert cache.k_pages.dtype == A.BFLOAT16 and cache.v_pages.shape == cache.k_pages.shape
    assert not cache.on_gpu and cache.kv_layout == layout
    assert PagedKVCache(1, 1, 1, 8, np.float16, device="cpu").dtype == A.FLOAT16


def test_adopted_pools_are_not_copied():
    k, v = nan_pools(6, 4, "HND", np.float16)
    cache = PagedKVCache(6, 4, HEADS, DIM, "float16", "HND", k_pages=k, v_pages=v)
    assert cache.k_pages is k and cache.v_pages is v and not cache.on_gpu
    dl = PagedKVCache(6, 4, HEADS, DIM, "float16", "HND", k_pages=CpuDLPack(k),
                      v_pages=CpuDLPack(v))
    assert np.shares_memory(dl.k_pages, k) and np.shares_memory(dl.v_pages, v)


def _construct(**changes):
    k, v = nan_pools(6, 4, "NHD", np.float16)
    args = dict(num_pages=6, page_size=4, num_kv_heads=HEADS, head_dim=DIM, dtype="float16",
                kv_layout="NHD", k_pages=k, v_pages=v)
    args.update(changes)
    return PagedKVCache(**args)


@pytest.mark.parametrize("changes, error, match", [
    (dict(dtype="float32"), ValueError, "dtype must be float16 or bfloat16; got 'float32'"),
    (dict(dtype="fp16"), ValueError, "dtype must be float16 or bfloat16; got 'fp16'"),
    (dict(kv_layout="NDH"), ValueError, "kv_layout must be 'NHD' or 'HND'; got 'NDH'"),
    (dict(head_dim=60, k_pages=None, v_pages=None), NotImplementedError,
     "head_dim must be a positive multiple of 8 for float16"),
    (dict(page_size=0), ValueError, "page_size must be >= 1; got 0"),
    (dict(num_pages=2**31, k_pages=None, v_pages=None), ValueError, "num_pages must be < 2\\^31"),
    (dict(v_pages=None), ValueError, "give both k_pages and v_pages, or neither"),
    (dict(device="tpu", k_pages=None, v_pages=None), ValueError,
     "device must be 'gpu', 'cpu' or None; got 'tpu'"),
    (dict(device="gpu"), ValueError, "device='gpu' but k_pages and v_pages live on the CPU"),
    (dict(num_pages=7), ValueError,
     r"k_pages must have shape \[num_pages, page_size, num_kv_heads, head_dim\] = \(7, 4, 3, 64\); "
     r"got \(6, 4, 3, 64\)"),
    (dict(kv_layout="HND"), ValueError,
     r"k_pages must have shape \[num_pages, num_kv_heads, page_size, head_dim\] = \(6, 3, 4, 64\)"),
    (dict(dtype="bfloat16"), ValueError,
     "k_pages must have dtype bfloat16 \\(the cache's\\); got float16"),
    (dict(v_pages=np.zeros((6, 4, 3, 64), np.float32)), ValueError,
     "v_pages must have dtype float16 \\(the cache's\\); got float32"),
    (dict(k_pages=[0]), TypeError, "k_pages must be a CuPy or NumPy array or a DLPack tensor"),
])
def test_construction_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _construct(**changes)


def test_read_only_pool_is_refused():
    k, v = nan_pools(6, 4, "NHD", np.float16)
    k.flags.writeable = False
    with pytest.raises(ValueError, match="k_pages is read-only; the cache is written in place"):
        _construct(k_pages=k, v_pages=v)


# ---- append on the CPU -----------------------------------------------------------------------

def run_steps(cache, rng, dtype, to_device=lambda x: x, reference=None):
    """Apply STEPS to a cache of 4 sequences; with ``reference`` (NaN pools, NumPy), also write
    every token there directly and check the cache's pools equal it, bytes and all."""
    seqs = ["s0", "s1", "s2", "s3"]
    for s in seqs:
        cache.add_sequence(s)
    for counts in STEPS:
        n = counts or [1] * len(seqs)
        old = [cache.seq_len(s) for s in seqs]
        k_new, v_new = random_tokens(rng, sum(n), dtype), random_tokens(rng, sum(n), dtype)
        indptr = None if counts is None else planner.cu_seqlens(counts)
        cache.append(seqs, to_device(k_new), to_device(v_new), indptr)
        assert [cache.seq_len(s) for s in seqs] == [o + c for o, c in zip(old, n)]
        if reference is not None:
            ref_k, ref_v = reference
            starts = planner.cu_seqlens(n)
            for b, s in enumerate(seqs):
                rows = slice(starts[b], starts[b + 1])
                direct_write(ref_k, cache.kv_layout, cache.seq_pages(s), old[b], k_new[rows])
                direct_write(ref_v, cache.kv_layout, cache.seq_pages(s), old[b], v_new[rows])
            assert same_bytes(cache.k_pages, ref_k) and same_bytes(cache.v_pages, ref_v)
    return seqs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_append_matches_direct_write(layout, page_size, dtype):
    rng = np.random.default_rng(page_size)
    k, v = nan_pools(NUM_PAGES, page_size, layout, dtype)
    cache = PagedKVCache(NUM_PAGES, page_size, HEADS, DIM, dtype, layout, k_pages=k, v_pages=v)
    run_steps(cache, rng, dtype, reference=nan_pools(NUM_PAGES, page_size, layout, dtype))
    # Exactly the sequences' tokens were written: the rest is still NaN.
    written = sum(cache.seq_len(s) for s in ("s0", "s1", "s2", "s3"))
    assert np.count_nonzero(~np.isnan(k.astype(np.float32))) == written * HEADS * DIM


def test_append_failure_rolls_back(monkeypatch):
    cache = cpu_cache(num_pages=8, page_size=2)
    cache.add_sequence("a")
    cache.grow("a", 3)
    table = cache.page_table(["a"])

    def broken(*args):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(paged, "_write", broken)
    k = np.zeros((4, HEADS, DIM), np.float16)
    with pytest.raises(RuntimeError, match="launch failed"):
        cache.append(["a"], k, k, np.array([0, 4], I32))
    assert cache.seq_len("a") == 3 and cache.num_free_pages == 6
    for x, y in zip(cache.page_table(["a"]), table):
        np.testing.assert_array_equal(x, y)


def _append_args(**changes):
    cache = cpu_cache()
    for s in ("a", "b"):
        cache.add_sequence(s)
    k = np.zeros((3, HEADS, DIM), np.float16)
    args = dict(seq_ids=["a", "b"], k_new=k, v_new=k.copy(), append_indptr=np.array([0, 1, 3], I32))
    args.update(changes)
    return cache, args


@pytest.mark.parametrize("changes, error, match", [
    (dict(seq_ids=["a", "a"]), ValueError, "seq_ids must be distinct; 'a' appears more than once"),
    (dict(seq_ids=["a", "c"]), KeyError, "unknown sequence 'c'"),
    (dict(k_new=np.zeros((3, HEADS, DIM), np.float32)), ValueError,
     "k_new must have the dtype of k_pages \\(float16\\); got float32"),
    (dict(v_new=np.zeros((3, HEADS, 32), np.float16)), ValueError,
     r"v_new must have shape \[total_new, num_kv_heads, head_dim\] = \(3, 3, 64\); "
     r"got \(3, 3, 32\)"),
    (dict(v_new=np.zeros((2, HEADS, DIM), np.float16)), ValueError,
     r"v_new must have shape .* = \(3, 3, 64\); got \(2, 3, 64\)"),
    (dict(k_new=np.zeros((3, 2, DIM), np.float16)), ValueError,
     r"k_new must have shape .*\(\*, 3, 64\)"),
    (dict(k_new=np.zeros((3, HEADS, 2 * DIM), np.float16)[..., ::2]), ValueError,
     "k_new must be contiguous in its last dimension"),
    (dict(append_indptr=np.array([0, 1, 2], I32)), ValueError,
     r"append_indptr must end at k_new.shape\[0\]=3; got append_indptr\[-1\]=2"),
    (dict(append_indptr=np.array([0, 2, 1], I32)), ValueError,
     r"append_indptr must be non-decreasing; append_indptr\[1\]=2 > append_indptr\[2\]=1"),
    (dict(append_indptr=np.array([0, 3], I32)), ValueError,
     "append_indptr must have 3 entries; got 2"),
    (dict(append_indptr=np.array([0, 1, 3], np.int64)), ValueError,
     "append_indptr must have dtype int32; got int64"),
    (dict(append_indptr=None), ValueError,
     r"without append_indptr, k_new must hold one token per sequence: shape\[0\] = 2; got 3"),
    (dict(k_new=[[0.0]]), TypeError, "k_new must be a CuPy or NumPy array or a DLPack tensor"),
])
def test_append_errors_change_nothing(changes, error, match):
    cache, args = _append_args(**changes)
    free = cache.num_free_pages
    with pytest.raises(error, match=match):
        cache.append(**args)
    assert cache.num_free_pages == free and cache.seq_len("a") == cache.seq_len("b") == 0


# ---- append_paged_kv (caller-managed page tables) --------------------------------------------

def _table_args(layout="NHD", dtype=np.float16, **changes):
    """Two requests on pages [3, 0] and [5] of page_size 4, holding 5 and 1 tokens before, with
    2 and 3 new tokens."""
    rng = np.random.default_rng(0)
    k, v = nan_pools(6, 4, layout, dtype)
    args = dict(k_pages=k, v_pages=v, k_new=random_tokens(rng, 5, dtype),
                v_new=random_tokens(rng, 5, dtype), append_indptr=np.array([0, 2, 5], I32),
                kv_indptr=np.array([0, 2, 3], I32), kv_indices=np.array([3, 0, 5], I32),
                seq_lens_before=np.array([5, 1], I32), kv_layout=layout)
    args.update(changes)
    return args


@pytest.mark.parametrize("layout", LAYOUTS)
def test_append_paged_kv_cpu(layout):
    args = _table_args(layout)
    ref_k, ref_v = (x.copy() for x in (args["k_pages"], args["v_pages"]))
    append_paged_kv(**args)
    for ref, new in ((ref_k, args["k_new"]), (ref_v, args["v_new"])):
        direct_write(ref, layout, [3, 0], 5, new[0:2])
        direct_write(ref, layout, [5], 1, new[2:5])
    assert same_bytes(args["k_pages"], ref_k) and same_bytes(args["v_pages"], ref_v)


def test_append_paged_kv_different_head_dims_and_dlpack():
    rng = np.random.default_rng(1)
    k, v = nan_pools(6, 4, "HND", np.float16, dim=64, dim_v=32)
    args = _table_args("HND", k_pages=CpuDLPack(k), v_pages=CpuDLPack(v),
                       v_new=random_tokens(rng, 5, np.float16, dim=32))
    append_paged_kv(**args)
    np.testing.assert_array_equal(v[0, :, 2], args["v_new"][1])  # request 0, position 6
    np.testing.assert_array_equal(k[5, :, 3], args["k_new"][4])  # request 1, position 3


@pytest.mark.parametrize("changes, error, match", [
    (dict(seq_lens_before=np.array([7, 1], I32)), ValueError,
     r"request 0 needs 9 token slots \(seq_lens_before\[0\]=7 \+ 2 new\) but owns 2 pages of "
     r"page_size=4 \(8 slots\)"),
    (dict(seq_lens_before=np.array([5, -1], I32)), ValueError,
     r"seq_lens_before must be >= 0; got seq_lens_before\[1\]=-1"),
    (dict(kv_indices=np.array([3, 6, 5], I32)), ValueError,
     r"kv_indices\[1\]=6 is out of range \[0, num_pages=6\) \(the page of new token 0\)"),
    (dict(kv_indices=np.array([3, 0, -2], I32)), ValueError,
     r"kv_indices\[2\]=-2 is out of range \[0, num_pages=6\)"),
    (dict(kv_indices=np.array([3, 0, 0], I32), seq_lens_before=np.array([5, 0], I32)), ValueError,
     "new tokens 0 and 3 would both write slot 1 of page 0; a slot takes one token"),
    (dict(kv_indptr=np.array([0, 2, 3, 3], I32)), ValueError,
     "kv_indptr must have 3 entries; got 4"),
    (dict(kv_indptr=np.array([0, 2, 2], I32)), ValueError,
     r"kv_indptr must end at len\(kv_indices\)=3; got kv_indptr\[-1\]=2"),
    (dict(append_indptr=np.array([0, 2, 4], I32)), ValueError,
     r"append_indptr must end at k_new.shape\[0\]=5; got append_indptr\[-1\]=4"),
    (dict(seq_lens_before=np.array([5], I32)), ValueError, "seq_lens_before must have 2 entries"),
    (dict(kv_layout="nhd"), ValueError, "kv_layout must be 'NHD' or 'HND'; got 'nhd'"),
    (dict(k_pages=np.zeros((6, 4, 3), np.float16)), ValueError,
     r"k_pages must have shape \[num_pages, page_size, num_kv_heads, head_dim\]; got \(6, 4, 3\)"),
    (dict(v_pages=np.zeros((6, 4, 2, 64), np.float16)), ValueError,
     r"v_pages must have shape .* = \(6, 4, 3, \*\) like k_pages but for head_dim; "
     r"got \(6, 4, 2, 64\)"),
    (dict(v_pages=np.zeros((6, 4, 3, 64), A.BFLOAT16)), ValueError,
     r"v_pages must have the dtype of k_pages \(float16\); got bfloat16"),
    (dict(k_pages=np.zeros((6, 4, 3, 64), np.float32)), ValueError,
     "k_pages must have dtype float16, bfloat16; got float32"),
    (dict(k_pages=np.zeros((6, 4, 3, 20), np.float16)), NotImplementedError,
     r"k_pages.shape\[3\] \(head_dim\) must be a positive multiple of 8 for float16"),
    (dict(k_new=np.zeros((5, 3, 64), A.BFLOAT16)), ValueError,
     r"k_new must have the dtype of k_pages \(float16\); got bfloat16"),
])
def test_append_paged_kv_errors_write_nothing(changes, error, match):
    args = _table_args(**changes)
    pools = [np.array(args[p], copy=True) for p in ("k_pages", "v_pages")]
    with pytest.raises(error, match=match):
        append_paged_kv(**args)
    for p, before in zip(("k_pages", "v_pages"), pools):
        assert same_bytes(args[p], before)


def test_append_paged_kv_nothing_new():
    args = _table_args(k_new=np.zeros((0, HEADS, DIM), np.float16),
                       v_new=np.zeros((0, HEADS, DIM), np.float16),
                       append_indptr=np.array([0, 0, 0], I32))
    append_paged_kv(**args)
    assert np.isnan(args["k_pages"].astype(np.float32)).all()


# ---- the CUDA source -------------------------------------------------------------------------

def test_append_source_uses_the_paged_header():
    src = _kernels.source("append_paged_kv")
    assert '#line 1 "kernels_cu/common/paged.cuh"' in src and "struct PageStrides" in src
    assert ("half",) in _kernels.VARIANTS["append_paged_kv"]
    assert ("__nv_bfloat16",) in _kernels.VARIANTS["append_paged_kv"]


_PROBE = """\
#include "common/paged.cuh"
using namespace cpattn;
template <KVLayout LAYOUT>
__global__ void paged_probe_kernel(const int* kv_indices, long long* out, int page_size) {
  const PageStrides strides = contiguous_page_strides<LAYOUT>(page_size, 8, 128);
  const PageSlot where = locate_token(kv_indices, 3, threadIdx.x, page_size);
  out[threadIdx.x] = strides.offset(where.page, where.slot, 1);
}
"""


@pytest.mark.parametrize("layout", ["cpattn::KVLayout::NHD", "cpattn::KVLayout::HND"])
def test_paged_header_compiles_in_full(tmp_path, monkeypatch, layout):
    """Every helper of common/paged.cuh compiles, used or not by append (decode uses them)."""
    shutil.copytree(_kernels.kernel_dir() / "common", tmp_path / "common")
    (tmp_path / "paged_probe.cu").write_text(_PROBE)
    monkeypatch.setattr(_kernels, "kernel_dir", lambda: tmp_path)
    monkeypatch.setitem(_kernels.VARIANTS, "paged_probe", [(layout,)])
    assert _kernels.compile_offline("paged_probe", (layout,), "sm_80") > 0


def test_page_strides():
    k = np.zeros((2, 3, 5, 8, 16), np.float16)[1]  # a layer of a [layers, ...] buffer
    nhd = paged.page_strides(k, "NHD")
    assert (nhd["page"], nhd["slot"], nhd["head"]) == (5 * 8 * 16, 8 * 16, 16)
    hnd = paged.page_strides(k, "HND")
    assert (hnd["page"], hnd["slot"], hnd["head"]) == (5 * 8 * 16, 16, 8 * 16)


# ---- GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_append_matches_cpu(layout, page_size, dtype):
    """The kernel writes the same bytes as the NumPy path, and nothing else (NaN stays NaN)."""
    import cupy
    k, v = nan_pools(NUM_PAGES, page_size, layout, dtype)
    gpu = PagedKVCache(NUM_PAGES, page_size, HEADS, DIM, dtype, layout, k_pages=cupy.asarray(k),
                       v_pages=cupy.asarray(v))
    cpu = PagedKVCache(NUM_PAGES, page_size, HEADS, DIM, dtype, layout, k_pages=k, v_pages=v)
    assert gpu.on_gpu and not cpu.on_gpu
    run_steps(gpu, np.random.default_rng(page_size), dtype, to_device=cupy.asarray)
    run_steps(cpu, np.random.default_rng(page_size), dtype)  # same tokens, same pages
    cupy.cuda.get_current_stream().synchronize()
    assert same_bytes(cupy.asnumpy(gpu.k_pages), cpu.k_pages)
    assert same_bytes(cupy.asnumpy(gpu.v_pages), cpu.v_pages)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", [(128, 128), (256, 64), (8, 16)])
def test_gpu_append_paged_kv_strided_views(layout, dims):
    """Pools that are one layer of a bigger buffer, new tokens that are a slice of a wider
    array, and K / V head dims that differ: all addressed through strides, on a side stream."""
    import cupy
    dim_k, dim_v = dims
    rng = np.random.default_rng(dim_k)
    shape = paged.pool_shape(9, 5, HEADS, dim_k, layout)
    k_all = np.full((2,) + shape, np.nan, np.float16)
    v_all = np.full((2,) + shape[:3] + (dim_v,), np.nan, np.float16)
    k_wide = random_tokens(rng, 11, np.float16, heads=2 * HEADS, dim=dim_k)
    v_wide = random_tokens(rng, 11, np.float16, heads=2 * HEADS, dim=dim_v)
    tables = dict(append_indptr=np.array([0, 4, 4, 11], I32), kv_indptr=np.array([0, 2, 3, 6], I32),
                  kv_indices=np.array([8, 1, 0, 2, 7, 3], I32),
                  seq_lens_before=np.array([3, 4, 8], I32), kv_layout=layout)
    d_k_all, d_v_all = cupy.asarray(k_all), cupy.asarray(v_all)
    d_k_wide, d_v_wide = cupy.asarray(k_wide), cupy.asarray(v_wide)
    cupy.cuda.Device().synchronize()  # the copies above ran on the null stream
    stream = cupy.cuda.Stream(non_blocking=True)
    append_paged_kv(d_k_all[1], d_v_all[1], d_k_wide[:, 1::2], d_v_wide[:, 1::2], stream=stream,
                    **tables)
    stream.synchronize()
    append_paged_kv(k_all[1], v_all[1], k_wide[:, 1::2], v_wide[:, 1::2], **tables)
    assert same_bytes(cupy.asnumpy(d_k_all), k_all) and same_bytes(cupy.asnumpy(d_v_all), v_all)
    assert np.isnan(k_all[0].astype(np.float32)).all()  # the other layer is untouched


@pytest.mark.gpu
def test_gpu_large_append_many_rows():
    """A prefill-sized append: 4000 tokens x 8 heads = 32000 rows, 250 pages."""
    import cupy
    rng = np.random.default_rng(3)
    k, v = nan_pools(300, 16, "NHD", A.BFLOAT16, heads=8, dim=128)
    k_new = random_tokens(rng, 4000, A.BFLOAT16, heads=8, dim=128)
    gpu = PagedKVCache(300, 16, 8, 128, "bfloat16", k_pages=cupy.asarray(k),
                       v_pages=cupy.asarray(v))
    cpu = PagedKVCache(300, 16, 8, 128, "bfloat16", k_pages=k, v_pages=v)
    for cache, to in ((gpu, cupy.asarray), (cpu, lambda x: x)):
        cache.add_sequence(0)
        cache.add_sequence(1)
        cache.append([0, 1], to(k_new), to(k_new[::-1].copy()), np.array([0, 1500, 4000], I32))
    assert same_bytes(cupy.asnumpy(gpu.k_pages), cpu.k_pages)
    assert same_bytes(cupy.asnumpy(gpu.v_pages), cpu.v_pages)


@pytest.mark.gpu
def test_gpu_default_device_and_mixed_sides():
    import cupy
    cache = PagedKVCache(4, 4, HEADS, DIM, "float16")
    assert cache.on_gpu and isinstance(cache.k_pages, cupy.ndarray)
    cache.add_sequence("a")
    k = np.zeros((1, HEADS, DIM), np.float16)
    with pytest.raises(ValueError, match="never copies between host and device"):
        cache.append(["a"], k, k)
    assert cache.seq_len("a") == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_torch_pools_stay_in_place(dtype):
    torch = pytest.importorskip("torch")
    import cupy
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    shape = paged.pool_shape(NUM_PAGES, 5, HEADS, DIM, "HND")
    t_dtype = getattr(torch, dtype)
    k_t = torch.full(shape, float("nan"), dtype=t_dtype, device="cuda")
    v_t = torch.full(shape, float("nan"), dtype=t_dtype, device="cuda")
    torch.cuda.synchronize()
    cache = PagedKVCache(NUM_PAGES, 5, HEADS, DIM, dtype, "HND", k_pages=k_t, v_pages=v_t)
    assert cache.k_pages.data.ptr == k_t.data_ptr() and cache.v_pages.data.ptr == v_t.data_ptr()
    np_dtype = A.BFLOAT16 if dtype == "bfloat16" else A.FLOAT16
    cpu = PagedKVCache(NUM_PAGES, 5, HEADS, DIM, dtype, "HND", k_pages=np.full(shape, np.nan, np_dtype),
                       v_pages=np.full(shape, np.nan, np_dtype))
    run_steps(cache, np.random.default_rng(5), np_dtype, to_device=cupy.asarray)
    run_steps(cpu, np.random.default_rng(5), np_dtype)
    cupy.cuda.Device().synchronize()
    assert same_bytes(k_t.view(torch.int16).cpu().numpy(), cpu.k_pages)
    assert same_bytes(v_t.view(torch.int16).cpu().numpy(), cpu.v_pages)


@pytest.mark.parametrize("kv, got", [((np.zeros(1),), "tuple of 1"), (np.zeros(3), "ndarray")])
def test_run_names_a_kv_that_is_not_a_pair(kv, got):
    from cpattn import _core
    with pytest.raises(TypeError, match=f"kv must be a PagedKVCache or a \\(k_pages, v_pages\\) "
                                        f"pair; got {got}"):
        _core.paged_inputs(np.zeros((1, 4, 64)), kv, None, "BatchDecode", "paged_decode", "NHD")


def test_gpu_pools_without_a_gpu_say_so():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a GPU is here")
    except cupy.cuda.runtime.CUDARuntimeError:
        pass
    with pytest.raises(RuntimeError, match="device='gpu' but CUDA has no usable GPU here"):
        PagedKVCache(4, 4, HEADS, DIM, "float16", device="gpu")
