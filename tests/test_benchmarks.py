"""The benchmark runner's host-side pieces (CPU)."""
import doctest
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

suites = pytest.importorskip("benchmarks.suites")


def test_doctests():
    result = doctest.testmod(suites)
    assert result.failed == 0 and result.attempted > 0
    run = pytest.importorskip("benchmarks.run")
    result = doctest.testmod(run)
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


# ---- the check against the reference ---------------------------------------------------------

def test_tolerances_are_the_gpu_tests():
    from gpu_utils import RTOL
    assert suites.TOLERANCE and all(RTOL[k] == v for k, v in suites.TOLERANCE.items())


@pytest.mark.parametrize("dtype, scale, verdict", [
    ("float16", 1.0005, "ok"), ("float16", 1.002, "FAIL"),
    ("bfloat16", 1.005, "ok"), ("bfloat16", 1.02, "FAIL"),
])
def test_check_compares_with_the_dtype_tolerance(dtype, scale, verdict):
    ref = np.random.default_rng(0).standard_normal((8, 4, 16))
    row = suites.check(ref * scale, ref, suites.DTYPES[dtype])
    assert row["check"] == verdict and row["tolerance"] == suites.TOLERANCE[suites.DTYPES[dtype]]
    assert row["rel_err"] == pytest.approx(scale - 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_fails_on_non_finite_outputs(bad):
    ref = np.ones((4, 8))
    ours = ref.copy()
    ours[1, 2] = bad
    assert suites.check(ours, ref, np.float16)["check"] == "FAIL"


def _cascade_inputs(rng, b=3, prefix=32, unique=11, dims=(8, 2, 16, 4)):
    """A small shared-prefix batch on the CPU: pools, q, the prefix pages and each request's."""
    hq, hkv, d, ps = dims
    prefix_pages, own_pages = prefix // ps, -(-unique // ps)
    num_pages = prefix_pages + b * own_pages
    k_pages, v_pages = (rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float16)
                        for _ in range(2))
    q = rng.standard_normal((b, hq, d)).astype(np.float16)
    order = rng.permutation(num_pages).astype(np.int32)
    return q, k_pages, v_pages, order[:prefix_pages], order[prefix_pages:].reshape(b, own_pages)


def test_cascade_check_uses_the_concatenated_keys():
    """The cascade sample is checked against reference.paged_decode over prefix + own keys."""
    from cpattn import reference
    rng = np.random.default_rng(1)
    dims, kv_len = (8, 2, 16, 4), 32 + 11
    q, k_pages, v_pages, shared, own = _cascade_inputs(rng, dims=dims)
    # Attention over the prefix and over the own keys, merged: what CascadeAttention computes.
    b = q.shape[0]
    prefix_ids = np.concatenate([shared] * b)
    lvl0 = reference.paged_decode(q, k_pages, v_pages, np.arange(b + 1, dtype=np.int32) *
                                  len(shared), prefix_ids, kv_lens=np.full(b, 32, np.int32))
    lvl1 = reference.paged_decode(q, k_pages, v_pages, np.arange(b + 1, dtype=np.int32) *
                                  own.shape[1], own.reshape(-1), kv_lens=np.full(b, 11, np.int32))
    out, _ = reference.merge_state(*lvl0, *lvl1)
    out = out.astype(np.float16)
    row = suites._cascade_check(q, k_pages, v_pages, out, shared, own, dims, kv_len, np.float16)
    assert row["check"] == "ok" and row["rel_err"] < 1e-3
    out[-1, 0] += 0.5  # request B-1 is in the sample
    row = suites._cascade_check(q, k_pages, v_pages, out, shared, own, dims, kv_len, np.float16)
    assert row["check"] == "FAIL"


# ---- peers ---------------------------------------------------------------------------------

def test_a_failing_peer_is_noted_and_the_others_run():
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nlong trace")

    row = {}
    suites.run_peers(row, {"flashinfer": broken, "torch sdpa": lambda: {"sdpa_flash": 3.0}})
    assert row["peers"] == {"sdpa_flash": 3.0}
    assert row["peer_errors"] == {
        "flashinfer": "RuntimeError: CUDA error: an illegal memory access"}
    row = {}
    suites.run_peers(row, {})
    assert row == {"peers": {}}


# ---- configs -------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"


def test_every_case_names_a_suite():
    for path in CONFIGS.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        for case in config["cases"]:
            assert case.get("suite", config.get("suite")) in suites.SUITES, (path.name, case)


def test_chunked_holds_the_paged_prefill_shapes():
    cases = yaml.safe_load((CONFIGS / "chunked.yaml").read_text())["cases"]
    got = {(c["batch"], c["new"], c["cached"], c.get("causal", True)) for c in cases}
    want = {(16, 512, 4096, True)} | {(b, s, 0, causal) for b, s in ((8, 2048), (2, 8192),
                                                                    (1, 16384))
                                      for causal in (True, False)}
    assert want <= got


# ---- the runner ----------------------------------------------------------------------------

@pytest.fixture
def runner(monkeypatch, tmp_path):
    """benchmarks.run with the GPU parts stubbed, a config of three decode cases, and a fake
    decode suite: case 2 fails its check, case 3's peer raises, a case ``raises: true`` raises."""
    run = pytest.importorskip("benchmarks.run")
    monkeypatch.setattr(run, "environment", lambda: dict(gpu="stub", cupy="-", commit="-"))
    monkeypatch.setattr(run, "ceilings", lambda: dict(copy_GBps=4000.0, matmul_bf16_TFLOPs=800.0))

    def fake(case, peers, time_ms, host_us, ceil):
        if case.get("raises"):
            raise RuntimeError("out of memory")
        ref = np.ones((4, 8))
        row = dict(case=f"B{case['batch']}", unit="GB/s", value=100.0, pct_ceiling=2.5,
                   plan_us=1.0, run_us=2.0)
        row.update(suites.check(ref * (1.5 if case["batch"] == 2 else 1.0), ref, np.float16))

        def broken():
            raise ValueError("no kernel for this shape")
        suites.run_peers(row, {"flashinfer": broken if case["batch"] == 3 else
                               lambda: {"flashinfer": 50.0}} if peers else {})
        return row

    monkeypatch.setitem(suites.SUITES, "decode", fake)
    config = tmp_path / "decode.yaml"
    config.write_text("suite: decode\ncases:\n  - {batch: 1}\n  - {batch: 2}\n  - {batch: 3}\n")
    return run, config, tmp_path / "out"


def test_runner_marks_a_failed_check_and_exits_1(runner, capsys):
    run, config, out = runner
    assert run.main(["--config", str(config), "--peers", "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("[decode ")]
    assert len(progress) == 3
    assert "check ok" in progress[0] and "check FAIL: err 5.0e-01 > 1e-03" in progress[1]
    assert "flashinfer failed (ValueError: no kernel for this shape)" in progress[2]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["check"] for r in results] == ["ok", "FAIL", "ok"]
    assert results[2]["peer_errors"] == {"flashinfer": "ValueError: no kernel for this shape"}
    table = (out / "results.md").read_text()
    assert "| check (rel. err) |" in table and "| **FAIL** 5.0e-01 |" in table
    assert "| ok 0.0e+00 | flashinfer | 50 | 2.00 |" in table
    assert "- decode B3: flashinfer: ValueError: no kernel for this shape" in table


def test_runner_exits_0_when_every_check_passes(runner):
    run, config, out = runner
    config.write_text("suite: decode\ncases:\n  - {batch: 1}\n  - {batch: 3}\n")
    assert run.main(["--config", str(config), "--out", str(out)]) == 0
    assert "FAIL" not in (out / "results.md").read_text()


def test_runner_keeps_the_cases_done_when_one_raises(runner):
    run, config, out = runner
    config.write_text("suite: decode\ncases:\n  - {batch: 1}\n  - {batch: 2}\n"
                      "  - {batch: 4, raises: true}\n")
    with pytest.raises(RuntimeError, match="out of memory"):
        run.main(["--config", str(config), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["case"] for r in results] == ["B1", "B2"]
    assert "| decode | B2 |" in (out / "results.md").read_text()
