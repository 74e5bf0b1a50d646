"""The benchmark runner's host-side pieces (CPU)."""
import doctest
import importlib.util

import pytest

suites = pytest.importorskip("benchmarks.suites")


def test_doctests():
    result = doctest.testmod(suites)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("nbytes, l2, sets", [
    (512 << 10, 60 << 20, 240),   # decode B1 L128: 240 sets, twice the L2 in all
    (37_748_736, 60 << 20, 4),    # MLA B1 L32768 H16: ckv + kpe 38 MB, under the 60 MB L2
    (120 << 20, 60 << 20, 1),     # twice the L2 already
    (0, 60 << 20, 1024),          # tiny inputs: at most 1024 sets
])
def test_rotation_covers_twice_the_l2(nbytes, l2, sets):
    assert suites.rotation_sets(nbytes, l2) == sets
    assert sets in (1, 1024) or sets * nbytes >= 2 * l2


def test_plot_says_whether_it_wrote(tmp_path):
    """RESULTS.md links the plot only when one was written (matplotlib there, a peer ran)."""
    run = pytest.importorskip("benchmarks.run")
    path = tmp_path / "results.png"
    assert run.plot([dict(suite="decode", case="x", value=1.0, peers={})], path) is False
    row = dict(suite="decode", case="B1", value=2.0, peers={"flashinfer": 4.0, "other": None})
    if importlib.util.find_spec("matplotlib") is None:
        assert run.plot([row], path) is False
    else:
        assert run.plot([row], path) is True and path.stat().st_size > 0
