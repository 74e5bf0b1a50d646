"""MLA on the CPU: MLAPagedCache (allocator, append, one [..., 576] array), BatchMLA plan
validation, and the query-tile x key-chunk work list."""
import numpy as np
import pytest

import cpattn
from cpattn import _tiles
from cpattn import mla, planner, reference

CKV, KPE = 512, 64
I32 = lambda *v: np.array(v, dtype=np.int32)


def test_cache_append_fills_slots_in_order():
    cache = cpattn.MLAPagedCache(6, 4, dtype="float16", device="cpu")
    cache.add_sequence("a")
    cache.add_sequence("b")
    rng = np.random.default_rng(0)
    ckv = rng.standard_normal((9, CKV)).astype(np.float16)
    kpe = rng.standard_normal((9, KPE)).astype(np.float16)
    cache.append(["a", "b"], ckv, kpe, I32(0, 6, 9))
    kv_indptr, kv_indices, last, lens = cache.page_table(["a", "b"])
    assert lens.tolist() == [6, 3] and last.tolist() == [2, 3]
    for b, (lo, hi) in enumerate(((0, 6), (6, 9))):
        for t in range(hi - lo):
            page = kv_indices[kv_indptr[b] + t // 4]
            np.testing.assert_array_equal(cache.ckv_cache[page, t % 4], ckv[lo + t])
            np.testing.assert_array_equal(cache.kpe_cache[page, t % 4], kpe[lo + t])


def test_cache_views_of_one_array():
    kv = np.zeros((3, 2, CKV + KPE), np.float16)
    cache = cpattn.MLAPagedCache(3, 2, dtype="float16", kv_cache=kv)
    cache.add_sequence(0)
    cache.append([0], np.ones((1, CKV), np.float16), np.full((1, KPE), 2, np.float16))
    assert (kv[0, 0, :CKV] == 1).all() and (kv[0, 0, CKV:] == 2).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(head_dim_ckv=256), NotImplementedError, "head_dim_ckv=512"),
    (dict(dtype="float32"), ValueError, "float16 or bfloat16"),
    (dict(ckv_cache=np.zeros((4, 2, CKV), np.float16)), ValueError, "both ckv_cache and kpe_cache"),
    (dict(ckv_cache=np.zeros((4, 2, CKV), np.float16),
          kpe_cache=np.zeros((4, 3, KPE), np.float16)), ValueError, r"kpe_cache must have shape"),
    (dict(kv_cache=np.zeros((4, 2, 512), np.float16)), ValueError, "kv_cache must have shape"),
    (dict(kv_cache=np.zeros((4, 2, CKV + KPE), np.float32)), ValueError,
     r"kv_cache must have dtype float16 \(the cache's\); got float32"),
    (dict(kv_cache=np.broadcast_to(np.zeros((), np.float16), (4, 2, CKV + KPE))), ValueError,
     "kv_cache must be writeable"),
])
def test_cache_errors(kwargs, error, match):
    args = dict(num_pages=4, page_size=2, dtype="float16", device="cpu")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cpattn.MLAPagedCache(**args)


def test_cache_append_errors_leave_it_unchanged():
    cache = cpattn.MLAPagedCache(2, 4, dtype="float16", device="cpu")
    cache.add_sequence(0)
    with pytest.raises(ValueError, match=r"kpe_new must have shape"):
        cache.append([0], np.zeros((1, CKV), np.float16), np.zeros((2, KPE), np.float16))
    with pytest.raises(ValueError, match="kpe_new must have the cache's dtype"):
        cache.append([0], np.zeros((1, CKV), np.float16), np.zeros((1, KPE), np.float32))
    with pytest.raises(cpattn.OutOfPagesError):
        cache.append([0], np.zeros((9, CKV), np.float16), np.zeros((9, KPE), np.float16),
                     I32(0, 9))
    assert cache.seq_len(0) == 0 and cache.num_free_pages == 2


def plan_args(**over):
    args = dict(qo_indptr=I32(0, 1, 2), kv_indptr=I32(0, 1, 3), kv_indices=I32(0, 1, 2),
                kv_lens=I32(3, 20), num_heads=16, head_dim_ckv=CKV, head_dim_kpe=KPE,
                page_size=16, sm_scale=0.07)
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, match", [
    (dict(sm_scale=None), ValueError, "sm_scale must be a finite number > 0"),
    (dict(sm_scale=-1.0), ValueError, "sm_scale"),
    (dict(head_dim_kpe=128), NotImplementedError, "head_dim_kpe=64"),
    (dict(num_heads=72), NotImplementedError, "num_heads=72"),  # refused on every path
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(qo_indptr=I32(0, 1)), ValueError, "qo_indptr must have batch \\+ 1 = 3"),
    (dict(kv_lens=I32(3, 40)), ValueError, "kv_lens"),
    (dict(dtype="float32"), ValueError, "float16 or bfloat16"),
])
def test_plan_errors(over, error, match):
    with pytest.raises(error, match=match):
        cpattn.BatchMLA().plan(**plan_args(**over))


def test_sm_scale_has_no_default():
    args = plan_args()
    del args["sm_scale"]
    with pytest.raises(TypeError, match="sm_scale"):
        cpattn.BatchMLA().plan(**args)


@pytest.mark.parametrize("heads, qo, rows, group", [
    (16, 1, 16, 16), (8, 2, 16, 8), (16, 2, 32, 16), (32, 1, 32, 32), (128, 1, 32, 32),
    (48, 1, 16, 16), (20, 1, 32, 20)])
def test_choose_tiles(heads, qo, rows, group):
    cfg, g = mla.choose_tiles(heads, qo)
    assert (cfg.rows, g) == (rows, group)


@pytest.mark.parametrize("heads, qo, rows, group, op", [
    (16, 1, 16, 16, "mla_attention"), (32, 1, 64, 32, "mla_attention_sm90"),
    (8, 3, 64, 8, "mla_attention_sm90"),
    (128, 1, 64, 64, "mla_attention_sm90"), (16, 4, 64, 16, "mla_attention_sm90"),
    (48, 1, 64, 48, "mla_attention_sm90"), (64, 2, 64, 64, "mla_attention_sm90"),
    (8, 4, 64, 8, "mla_attention_sm90"), (8, 2, 16, 8, "mla_attention")])
def test_choose_tiles_on_hopper(heads, qo, rows, group, op):
    """More than 16 (query, head) rows take the 64-row wgmma tiles on the sm_90a path."""
    cfg, g = mla.choose_tiles(heads, qo, hopper=True)
    assert (cfg.rows, g, cfg.op) == (rows, group, op)


@pytest.mark.parametrize("hopper, most", [(False, 32), (True, 64)])
def test_unsupported_head_count_names_the_limit(hopper, most):
    with pytest.raises(NotImplementedError, match=f"num_heads=72: MLA supports up to {most} heads"):
        mla.choose_tiles(72, 1, hopper=hopper)


def test_hopper_mla_tiles_fit_an_sm():
    assert _tiles.MLA_SM90.smem_bytes() <= 227 * 1024


def test_mla_doctests():
    import doctest
    result = doctest.testmod(mla, extraglobs={"np": np})
    assert result.failed == 0 and result.attempted > 0


def test_many_ctas_takes_large_unsplit_batches_of_16_rows():
    """Two CTAs an SM of MLA_MANY when query tiles x head blocks fill every SM twice over and
    its waves are shorter: 16 heads of one query, 8 heads of up to two a tile (zero-length
    requests give none); the 32-row and wgmma tiles are kept."""
    small, many = _tiles.MLA_TILES[0], _tiles.MLA_MANY
    assert many.ctas == 2 and many.rows == small.rows
    assert 2 * (many.smem_bytes() + 1024) <= 228 * 1024  # two CTAs' shared memory fit an SM
    assert 2 * many.threads * 256 <= 65536  # and their registers, at 255 a thread
    ones = np.ones(264, np.int64)
    assert mla.many_ctas(small, 16, 16, ones, 132) is many
    assert mla.many_ctas(small, 16, 16, ones[:263], 132) is small
    assert mla.many_ctas(small, 8, 8, np.array([2] * 264 + [0] * 9), 132) is many
    assert mla.many_ctas(small, 8, 8, np.array([3] * 132 + [0] * 200), 132) is many  # 2 tiles each
    assert mla.many_ctas(_tiles.MLA_TILES[1], 32, 32, ones, 132) is _tiles.MLA_TILES[1]
    # By waves: 3 of 16-row CTAs beat 2 of pairs at 300 and 396 CTAs, not at 400 or 528;
    # 5 beat 3 at 600, 6 lose to 3 at 700.
    for ctas, pick in ((300, small), (396, small), (400, many), (528, many), (600, small),
                       (700, many), (2048, many)):
        assert mla.many_ctas(small, 16, 16, np.ones(ctas, np.int64), 132) is pick, ctas
    assert mla.many_ctas(_tiles.MLA_SM90, 64, 128, ones, 132) is _tiles.MLA_SM90


@pytest.mark.parametrize("seed", range(20))
def test_partition_tiles_covers_every_query_and_key_once(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 12))
    qo_lens = rng.integers(0, 9, batch)
    kv_lens = rng.integers(0, 5000, batch)
    causal = bool(seed % 2)
    per_item = int(rng.integers(1, 4))
    w = planner.partition_tiles(qo_lens, kv_lens, per_item, causal, int(rng.integers(1, 5)),
                                num_sms=int(rng.integers(1, 40)), tile=64)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    covered = {}  # token -> list of (state, kv_start, kv_end)
    for i in range(w.num_items):
        b, q0 = w.request[i], w.q_start[i]
        for j in range(min(per_item, qo_lens[b] - q0)):
            token = qo_indptr[b] + q0 + j
            covered.setdefault(token, []).append(
                (w.state[i] + j * w.state_stride[i], w.kv_start[i], w.kv_end[i]))
    assert sorted(covered) == list(range(int(qo_indptr[-1])))
    for token, parts in covered.items():
        b = int(np.searchsorted(qo_indptr, token, side="right") - 1)
        states = sorted(p[0] for p in parts)
        assert states == list(range(w.merge_indptr[token], w.merge_indptr[token + 1]))
        ranges = sorted((p[1], p[2]) for p in parts)
        assert ranges[0][0] == 0
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            assert end == start
        query = token - qo_indptr[b]
        seen = min(kv_lens[b], query + 1 + kv_lens[b] - qo_lens[b]) if causal else kv_lens[b]
        assert ranges[-1][1] >= max(seen, 0)
    assert w.num_states == w.merge_indptr[-1]


def test_reference_mla_needs_sm_scale():
    with pytest.raises(ValueError, match="sm_scale is required"):
        reference.mla(np.zeros((1, 1, CKV)), np.zeros((1, 1, KPE)), np.zeros((1, 1, CKV)),
                      np.zeros((1, 1, KPE)), I32(0, 1), I32(0, 1), I32(0), kv_lens=I32(1),
                      sm_scale=None)


def test_partition_tiles_names_query_tiles_over_max_items():
    with pytest.raises(ValueError, match="5 query tiles .* max_items=4"):
        planner.partition_tiles(np.array([3, 2]), np.array([10, 10]), 1, False, 1, num_sms=4,
                                max_items=4)


@pytest.mark.parametrize("wrapper, kwargs, missing", [
    (cpattn.BatchMLA, dict(max_batch_size=8), "max_num_pages"),
    (cpattn.BatchDecode, dict(max_num_pages=8), "max_batch_size"),
    (cpattn.BatchPrefillPaged, dict(max_batch_size=8, max_num_pages=8), "max_total_q"),
])
def test_cuda_graph_mode_needs_its_maxima(wrapper, kwargs, missing):
    with pytest.raises(ValueError, match=f"missing: {missing}"):
        wrapper(use_cuda_graph=True, **kwargs)
