"""CascadeAttention plan validation (CPU: raised before any launch)."""
import numpy as np
import pytest

import cpattn

I32 = lambda *v: np.array(v, dtype=np.int32)


def plan(cascade, **over):
    args = dict(qo_indptr_arr=[I32(0, 3), I32(0, 3)], kv_indptr_arr=[I32(0, 1), I32(0, 1)],
                kv_indices_arr=[I32(0), I32(1)], kv_lens_arr=[I32(10), I32(2)])
    args.update(over)
    cascade.plan(*args.values(), 4, 2, 128, 16, causal=True)


def test_causal_needs_own_tokens_for_every_query():
    with pytest.raises(ValueError, match="request 0 of the last level has 3 queries but only 2"):
        plan(cpattn.CascadeAttention(2))


def test_one_array_per_level():
    with pytest.raises(ValueError, match="kv_lens_arr must be a list of 2 arrays"):
        plan(cpattn.CascadeAttention(2), kv_lens_arr=[I32(10)])


def test_levels_cover_the_same_rows():
    with pytest.raises(ValueError, match=r"qo_indptr_arr\[1\]\[-1\] must be 3"):
        plan(cpattn.CascadeAttention(2), qo_indptr_arr=[I32(0, 3), I32(0, 4)])


def test_run_before_plan():
    with pytest.raises(RuntimeError, match="run\\(\\) before plan\\(\\)"):
        cpattn.CascadeAttention(2).run(None, None)


def test_level_errors_name_the_level():
    with pytest.raises(ValueError, match="^level 0: .*kv_lens"):
        plan(cpattn.CascadeAttention(2), kv_lens_arr=[I32(17), I32(3)])


def test_every_level_is_checked_before_any_plans():
    """A bad page table in the last level is found before level 0 plans (on a GPU it would
    have uploaded its plan first); the options are checked first of all."""
    with pytest.raises(ValueError, match=r"level 1: kv_lens\[0\]=40 must be in \[1, 16\]"):
        plan(cpattn.CascadeAttention(2), kv_lens_arr=[I32(10), I32(40)])
    with pytest.raises(TypeError, match="causal must be a bool"):
        cpattn.CascadeAttention(2).plan([I32(0, 3)] * 2, [I32(0, 1)] * 2, [I32(0), I32(1)],
                                        [I32(10), I32(3)], 4, 2, 128, 16, causal="yes")
