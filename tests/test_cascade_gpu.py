"""CascadeAttention against the reference on the concatenated keys: a prefix shared by all
requests (level 0), one shared by subgroups (a middle level), each request's own tokens (the
last level, causal or not); page sizes, GQA, NaN / Inf in every slot no level owns."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import reference

from gpu_utils import assert_close

pytestmark = pytest.mark.gpu

HKV, D = 2, 128


class Pool:
    """K / V pools filled level by level; every slot nobody owns holds NaN (K) or Inf (V)."""

    def __init__(self, rng, num_pages, page_size, dtype):
        self.rng, self.page_size, self.dtype = rng, page_size, dtype
        self.k = np.full((num_pages, page_size, HKV, D), np.nan, dtype)
        self.v = np.full((num_pages, page_size, HKV, D), np.inf, dtype)
        self.free = list(rng.permutation(num_pages))

    def sequence(self, length):
        """Pages for `length` fresh tokens: (page ids, K [length, HKV, D], V)."""
        pages = [self.free.pop() for _ in range(-(-length // self.page_size))]
        k = self.rng.standard_normal((length, HKV, D)).astype(self.dtype)
        v = self.rng.standard_normal((length, HKV, D)).astype(self.dtype)
        for t in range(length):
            page, slot = pages[t // self.page_size], t % self.page_size
            self.k[page, slot], self.v[page, slot] = k[t], v[t]
        return pages, k, v


def level(pool, groups_rows, lengths):
    """One level: request g covers `groups_rows[g]` query rows and owns `lengths[g]` tokens."""
    seqs = [pool.sequence(n) for n in lengths]
    qo_indptr = np.concatenate([[0], np.cumsum(groups_rows)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum([len(s[0]) for s in seqs])]).astype(np.int32)
    kv_indices = np.array([p for s in seqs for p in s[0]], np.int32)
    return (qo_indptr, kv_indptr, kv_indices, np.asarray(lengths, np.int32)), seqs


def check(rng, page_size, gqa, dtype, qo_lens, own_lens, causal, middle=None):
    import cupy
    batch = len(qo_lens)
    total_q = sum(qo_lens)
    pool = Pool(rng, 3000, page_size, dtype)
    levels = [level(pool, [total_q], [777])]
    if middle is not None:  # subgroups of requests share a second prefix
        sizes, lengths = middle
        rows = [sum(qo_lens[sum(sizes[:g]):sum(sizes[:g + 1])]) for g in range(len(sizes))]
        levels.append(level(pool, rows, lengths))
    levels.append(level(pool, qo_lens, own_lens))
    hq = HKV * gqa
    q = rng.standard_normal((total_q, hq, D)).astype(dtype)
    cascade = cpattn.CascadeAttention(len(levels))
    arrays = list(zip(*[lv[0] for lv in levels]))
    cascade.plan(*map(list, arrays), hq, HKV, D, page_size, causal=causal, dtype=dtype)
    out, lse = cascade.run(cupy.asarray(q), (cupy.asarray(pool.k), cupy.asarray(pool.v)),
                           return_lse=True)
    ref_o, ref_lse = np.zeros((total_q, hq, D)), np.zeros((total_q, hq))
    for b in range(batch):
        rows = slice(sum(qo_lens[:b]), sum(qo_lens[:b + 1]))
        k, v = [], []
        for (qo_indptr, *_), seqs in levels:  # the level request that holds row `rows.start`
            g = int(np.searchsorted(qo_indptr, rows.start, side="right") - 1)
            k.append(seqs[g][1])
            v.append(seqs[g][2])
        ref_o[rows], ref_lse[rows] = reference.attend(q[rows], np.concatenate(k),
                                                      np.concatenate(v), causal=causal)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("page_size", (1, 5, 16))
@pytest.mark.parametrize("gqa", (1, 4, 8))
@pytest.mark.parametrize("causal", (False, True))
def test_two_levels(page_size, gqa, causal):
    rng = np.random.default_rng([page_size, gqa, causal])
    check(rng, page_size, gqa, A.FLOAT16, [1, 17, 1, 127, 3], [1, 40, 9, 127, 300], causal)


@pytest.mark.parametrize("dtype", (A.FLOAT16, A.BFLOAT16))
def test_three_levels_and_decode_batch(dtype):
    rng = np.random.default_rng(3)
    # 6 requests: groups of 2, 3 and 1 share a middle prefix each.
    check(rng, 16, 4, dtype, [1] * 6, [5, 1, 33, 16, 17, 200], True,
          middle=([2, 3, 1], [64, 0, 31]))
    check(rng, 16, 4, dtype, [4, 1, 9, 2, 2, 3], [4, 1, 30, 2, 20, 3], True,
          middle=([2, 3, 1], [64, 100, 31]))

