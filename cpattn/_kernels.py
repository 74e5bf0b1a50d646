"""Kernel loader: source assembly, NVRTC options, the registry of variants, and the caches.

Each op lives in ``kernels_cu/<op>.cu`` as one ``<op>_kernel`` template. Its
``#include "common/<name>.cuh"`` lines are replaced by the header text (with ``#line`` markers,
so NVRTC errors point at the real file): CuPy's disk cache hashes the source text, and so sees
header changes too.

Caches: in this process, ``(op, template arguments, arch, device)`` -> ``cupy.RawKernel``;
across processes, CuPy's disk cache (``CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``).
Beside it, ``cpattn-manifest.txt`` lists one hash per kernel compiled there, so that
``CPATTN_DISABLE_JIT=1`` can refuse to compile: a kernel missing from it raises ``KernelError``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from . import _tiles

#: Every template instantiation cpattn launches, per op: C++ template arguments as strings.
#: ``python -m cpattn.compile`` builds exactly these; ``get_kernel`` refuses anything else.
VARIANTS: dict[str, list[tuple[str, ...]]] = {
    # merge_state_kernel<T, TOut>: states in T, merged output in TOut (head_dim at run time);
    # fp32 -> fp16 / bf16 merges split-KV partials.
    "merge_state": [("half", "half"), ("__nv_bfloat16", "__nv_bfloat16"), ("float", "float"),
                    ("float", "half"), ("float", "__nv_bfloat16")],
    # batch_attention_kernel<T, HEAD_DIM, M_TILES, WARPS_Q, WARPS_KV, TILE, STAGES>: _tiles.py.
    "batch_attention": _tiles.attention_variants(),
    # batch_attention_sm90_kernel<T, HEAD_DIM, WARPGROUPS, TILE, STAGES, CTAS>: _tiles.py (sm_90a).
    "batch_attention_sm90": _tiles.hopper_variants(),
    # batch_decode_sm90_kernel<T, HEAD_DIM, TILE, STAGES, CTAS>: _tiles.py (sm_90a).
    "batch_decode_sm90": _tiles.hopper_decode_variants(),
    # mla_attention_kernel<T, M_TILES, WARPS, TILE, STAGES, KSPLIT>: _tiles.py.
    "mla_attention": _tiles.mla_variants(),
    # mla_attention_sm90_kernel<T, TILE, STAGES>: _tiles.py (sm_90a).
    "mla_attention_sm90": _tiles.mla_hopper_variants(),
    # append_paged_kv_kernel<T>: K/V pools in fp16 / bf16 (layout and head_dim through strides).
    "append_paged_kv": [("half",), ("__nv_bfloat16",)],
}

#: Ops built for some targets only (their instructions exist nowhere else); all others build
#: for every target from sm_80 on.
TARGETS = {"batch_attention_sm90": ("sm_90a",), "batch_decode_sm90": ("sm_90a",),
           "mla_attention_sm90": ("sm_90a",)}


def builds_for(op: str, arch: str) -> bool:
    """Whether ``op`` compiles for ``arch`` (``sm_90a`` ops need exactly that target)."""
    return arch in TARGETS.get(op, (arch,))


#: C++ spelling of the dtypes kernels take.
CTYPES = {"float16": "half", "bfloat16": "__nv_bfloat16", "float32": "float"}

_INCLUDE = re.compile(r'^[ \t]*#include[ \t]+"(common/[\w./-]+)"[ \t]*$', re.MULTILINE)


class KernelError(RuntimeError):
    """A kernel could not be compiled or loaded."""


def kernel_dir() -> Path:
    """``kernels_cu/``: beside the package in a checkout, inside it once installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (candidate / "common").is_dir():
            return candidate
    raise KernelError(f"kernels_cu/ not found next to {here}")


def source(op: str) -> str:
    """The text of ``kernels_cu/<op>.cu`` with every common header inlined once."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(rel: str) -> str:
        text = (root / rel).read_text()
        out, pos = [], 0
        for match in _INCLUDE.finditer(text):
            header = match.group(1)
            out.append(text[pos:match.start()])
            if header not in seen:
                seen.add(header)
                line_after = text.count("\n", 0, match.end()) + 2
                out.append(f'#line 1 "kernels_cu/{header}"\n{expand(header)}\n'
                           f'#line {line_after} "kernels_cu/{rel}"')
            pos = match.end()
        out.append(text[pos:])
        return "".join(out)

    if op not in VARIANTS:
        raise KernelError(f"unknown op {op!r}; registered: {sorted(VARIANTS)}")
    return f'#line 1 "kernels_cu/{op}.cu"\n' + expand(f"{op}.cu")


def name_expression(op: str, targs: tuple[str, ...]) -> str:
    return f"{op}_kernel<{', '.join(targs)}>"


def cuda_include_dirs() -> list[str]:
    """Directories holding ``cuda_fp16.h`` (and CCCL): the CUDA wheels first, then CUDA_PATH."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates += [Path(loc) / "cu13" / "include", Path(loc) / "cuda_runtime" / "include"]
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for inc in candidates:
        if (inc / "cuda_fp16.h").is_file():
            dirs = [inc] + [d for d in (inc / "cccl", inc.parent.parent / "cuda_cccl" / "include")
                            if d.is_dir()]
            return [str(d) for d in dirs]
    return []


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """NVRTC options for ``arch`` (``sm_80``, ``sm_90a``, ...), the arch flag itself excepted:
    CuPy adds ``-arch=sm_XY`` for the current device. On Hopper we also name ``sm_90a``, which
    NVRTC combines with CuPy's ``sm_90`` (wgmma and setmaxnreg need it)."""
    opts = ["--std=c++17", f"-DCPATTN_ARCH={arch_number(arch)}"]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    if arch.endswith("a"):
        opts.append(f"--gpu-architecture={arch}")
    return tuple(opts)


def arch_number(arch: str) -> int:
    """``"sm_90a"`` -> 90."""
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"arch must look like sm_80 or sm_90a; got {arch!r}")
    return int(m.group(1))


def device_arch(device=None) -> str:
    """The arch cpattn compiles for on a CuPy device: ``sm_90a`` on compute capability 9.0."""
    import cupy
    cc = (device or cupy.cuda.Device()).compute_capability
    return "sm_90a" if cc == "90" else f"sm_{cc}"


def _check_registered(op: str, targs: tuple[str, ...], arch: str) -> None:
    if op not in VARIANTS:
        raise KernelError(f"unknown op {op!r}; registered: {sorted(VARIANTS)}")
    if targs not in VARIANTS[op]:
        raise KernelError(f"{name_expression(op, targs)} is not a registered variant of {op}")
    if not builds_for(op, arch):
        raise KernelError(f"{op} builds for {', '.join(TARGETS[op])} only, not {arch}")


# ---- runtime: RawModule + caches -------------------------------------------------------------

_LOADED: dict = {}


def _manifest() -> Path:
    cache = os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")
    return Path(cache) / "cpattn-manifest.txt"


def _kernel_hash(src: str, opts: tuple[str, ...], expr: str, arch: str) -> str:
    import cupy
    from cupy_backends.cuda.libs import nvrtc
    text = "\0".join([src, *opts, expr, arch, cupy.__version__, str(nvrtc.getVersion())])
    return hashlib.sha256(text.encode()).hexdigest()


def jit_disabled() -> bool:
    return os.environ.get("CPATTN_DISABLE_JIT", "0") not in ("", "0")


def get_kernel(op: str, targs: tuple[str, ...]):
    """The ``cupy.RawKernel`` for ``<op>_kernel<targs...>`` on the current device."""
    import cupy
    device = cupy.cuda.Device()
    arch = device_arch(device)
    key = (op, targs, arch, device.id)
    kernel = _LOADED.get(key)
    if kernel is not None:
        return kernel
    _check_registered(op, targs, arch)
    src, opts, expr = source(op), nvrtc_options(arch), name_expression(op, targs)
    digest = _kernel_hash(src, opts, expr, arch)
    manifest = _manifest()
    listed = manifest.is_file() and digest in manifest.read_text().split()
    if jit_disabled() and not listed:
        raise KernelError(f"{expr} for {arch} is not in the kernel cache ({manifest.parent}) and "
                          "CPATTN_DISABLE_JIT=1 forbids compiling it; warm the cache on this GPU "
                          "with `python -m cpattn.compile`")
    try:
        module = cupy.RawModule(code=src, options=opts, name_expressions=[expr])
        kernel = module.get_function(expr)
    except cupy.cuda.compiler.CompileException as err:
        raise KernelError(f"NVRTC failed on {expr} for {arch} (device {device.id}):\n"
                          f"{err.get_message()}") from None
    if not listed:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        with manifest.open("a") as f:
            f.write(digest + "\n")
    _LOADED[key] = kernel
    return kernel


# ---- offline: NVRTC with no GPU --------------------------------------------------------------

def compile_offline(op: str, targs: tuple[str, ...], arch: str) -> int:
    """Compile one variant to a cubin with NVRTC alone (no GPU needed); return its size.

    The options are those CuPy uses at run time: ours, then ``-ftz=true``,
    ``--device-as-default-execution-space`` and the arch flag.
    """
    from cupy_backends.cuda.libs import nvrtc
    _check_registered(op, targs, arch)
    src, expr = source(op), name_expression(op, targs)
    opts = list(nvrtc_options(arch)) + ["-ftz=true", "--device-as-default-execution-space",
                                        f"-arch=sm_{arch_number(arch)}"]
    prog = nvrtc.createProgram(src, f"{op}.cu", [], [])
    try:
        nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            raise KernelError(f"NVRTC failed on {expr} for {arch}:\n"
                              f"{nvrtc.getProgramLog(prog)}") from None
        nvrtc.getLoweredName(prog, expr)
        return len(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
