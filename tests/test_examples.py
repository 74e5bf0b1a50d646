"""The examples run to the end on the CPU path: each in a fresh process with no CUDA device
visible, so that cpattn.gpu_available() is False even on a GPU machine."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Examples that run the NumPy reference without a GPU and print OK after their check, with
#: what else their output must say.
REFERENCE_PATH = {
    "quickstart.py": (),
    "custom_mask.py": (),
    "cuda_graph_decode.py": ("without a graph", "against the appended history"),
    "mla_decode.py": ("against a dense computation",),
    "serving_loop.py": ("prompts prefilled over several steps", "prefill", "decode",
                        "host us per step", "plan", "run"),
}
#: Examples that need an optional framework; without it they say so and exit 0.
OTHERS = ("interop_torch.py", "interop_jax.py")
TIMEOUT_S = 300


def run_example(name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_every_example_is_listed():
    scripts = sorted(path.name for path in (ROOT / "examples").glob("*.py"))
    assert scripts == sorted([*REFERENCE_PATH, *OTHERS])


@pytest.mark.parametrize("name", sorted(REFERENCE_PATH))
def test_example_runs_the_reference_on_the_cpu(name):
    result = run_example(name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on the CPU" in result.stdout, result.stdout  # it says which path it took
    assert result.stdout.splitlines()[-1] == "OK", result.stdout
    for phrase in REFERENCE_PATH[name]:
        assert phrase in result.stdout, (phrase, result.stdout)


@pytest.mark.parametrize("name", OTHERS)
def test_example_without_its_needs_exits_cleanly(name):
    result = run_example(name)
    assert result.returncode == 0, result.stdout + result.stderr
