"""The kernel loader: source assembly, the registry, offline NVRTC compile, and the caches."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpattn import _kernels

ROOT = Path(__file__).resolve().parent.parent
ARCHES = ("sm_80", "sm_90a")


def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize("arch", ARCHES)
def test_every_variant_compiles_without_gpu(arch):
    proc = _run("-m", "cpattn.compile", "--arch", arch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = sum(len(v) for op, v in _kernels.VARIANTS.items() if _kernels.builds_for(op, arch))
    assert f"{total} of {total} variants compiled for {arch}" in proc.stdout


def test_source_inlines_headers_with_line_markers():
    src = _kernels.source("merge_state")
    assert '#include "common/' not in src
    assert '#line 1 "kernels_cu/common/state.cuh"' in src
    assert "struct SoftmaxState" in src
    # After each header, numbering resumes at the op file's next line.
    op_lines = (_kernels.kernel_dir() / "merge_state.cu").read_text().splitlines()
    first_include = next(i for i, l in enumerate(op_lines) if l.startswith('#include "common/'))
    assert f'#line {first_include + 2} "kernels_cu/merge_state.cu"' in src


def test_nvrtc_error_names_kernel_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "ok.cuh").write_text("#pragma once\n")
    (tmp_path / "broken.cu").write_text(textwrap.dedent("""\
        #include "common/ok.cuh"
        template <typename T> __global__ void broken_kernel(T* x) {
          x[0] = undefined_name;
        }
    """))
    monkeypatch.setattr(_kernels, "kernel_dir", lambda: tmp_path)
    monkeypatch.setitem(_kernels.VARIANTS, "broken", [("float",)])
    with pytest.raises(_kernels.KernelError) as err:
        _kernels.compile_offline("broken", ("float",), "sm_80")
    message = str(err.value)
    assert "broken_kernel<float> for sm_80" in message
    assert 'kernels_cu/broken.cu(3)' in message and "undefined_name" in message


def test_unregistered_variant_is_refused():
    with pytest.raises(_kernels.KernelError, match="not a registered variant"):
        _kernels.compile_offline("merge_state", ("double",), "sm_80")
    with pytest.raises(_kernels.KernelError, match="unknown op 'nope'"):
        _kernels.source("nope")


@pytest.mark.parametrize("op", ("batch_attention_sm90", "batch_decode_sm90", "mla_attention_sm90"))
def test_hopper_kernel_builds_for_sm90a_only(op):
    assert _kernels.builds_for(op, "sm_90a")
    assert not _kernels.builds_for(op, "sm_80")
    assert not _kernels.builds_for(op, "sm_90")
    assert _kernels.builds_for("batch_attention", "sm_80")
    targs = _kernels.VARIANTS[op][0]
    with pytest.raises(_kernels.KernelError, match="builds for sm_90a only, not sm_80"):
        _kernels.compile_offline(op, targs, "sm_80")


def test_bad_arch_spelling():
    proc = _run("-m", "cpattn.compile", "--arch", "hopper")
    assert proc.returncode != 0 and "arch must look like sm_80 or sm_90a" in proc.stderr


_LOAD = ("import cpattn._kernels as k; k.get_kernel('merge_state', ('float', 'float')); "
         "print('loaded')")
# CuPy preprocesses an empty program on every load to read the compiler's version; compiling
# any kernel source at all is what must not happen in a second process.
_NO_NVRTC = ("import cupy_backends.cuda.libs.nvrtc as n\n"
             "create = n.createProgram\n"
             "def refuse(src, *a):\n"
             "    if src.strip(): raise RuntimeError('NVRTC was asked to compile a kernel')\n"
             "    return create(src, *a)\n"
             "n.createProgram = refuse\n")


@pytest.mark.gpu
def test_second_process_compiles_nothing(tmp_path):
    env = {"CUPY_CACHE_DIR": str(tmp_path)}
    first = _run("-c", _LOAD, env=env)
    assert first.returncode == 0, first.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    second = _run("-c", _NO_NVRTC + _LOAD, env=env)  # would fail if it compiled anything
    assert second.returncode == 0 and "loaded" in second.stdout, second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == files


@pytest.mark.gpu
def test_disable_jit_makes_a_missing_kernel_an_error(tmp_path):
    env = {"CUPY_CACHE_DIR": str(tmp_path), "CPATTN_DISABLE_JIT": "1"}
    cold = _run("-c", _LOAD, env=env)
    assert cold.returncode != 0 and "CPATTN_DISABLE_JIT=1 forbids compiling" in cold.stderr
    warm = _run("-m", "cpattn.compile", "--op", "merge_state", env={"CUPY_CACHE_DIR": str(tmp_path)})
    assert warm.returncode == 0, warm.stderr
    assert _run("-c", _LOAD, env=env).returncode == 0
