"""``python -m cpattn.compile``: build every registered kernel variant.

With ``--arch`` (``sm_80``, ``sm_90a``, ...) each variant goes through NVRTC alone, with no GPU
needed: CI runs this so a kernel that does not compile never lands. With no ``--arch`` on a GPU
machine, each variant is loaded for the current device, which warms CuPy's kernel cache (and
cpattn's manifest) before serving.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import _kernels


def _offline(job):
    op, targs, arch = job
    start = time.perf_counter()
    try:
        size = _kernels.compile_offline(op, targs, arch)
    except _kernels.KernelError as err:
        return job, None, str(err)
    return job, time.perf_counter() - start, f"{size} bytes"


def _warm(job):
    op, targs, _ = job
    start = time.perf_counter()
    try:
        _kernels.get_kernel(op, targs)
    except _kernels.KernelError as err:
        return job, None, str(err)
    return job, time.perf_counter() - start, "loaded"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpattn.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", help="target such as sm_80 or sm_90a (no GPU needed); "
                        "omit on a GPU machine to warm the cache for its device")
    parser.add_argument("--op", action="append", choices=sorted(_kernels.VARIANTS),
                        help="only this op (repeatable); default: every op")
    parser.add_argument("--jobs", type=int, default=0, help="parallel NVRTC processes "
                        "(default: one per CPU)")
    args = parser.parse_args(argv)

    if args.arch:
        _kernels.arch_number(args.arch)  # validates the spelling
        arch, work = args.arch, _offline
    else:
        try:
            arch = _kernels.device_arch()
        except Exception as err:  # no CuPy, no driver or no device
            parser.error(f"no GPU found ({err}); pass --arch to compile without one")
        work = _warm
    ops = args.op or sorted(_kernels.VARIANTS)
    jobs = [(op, targs, arch) for op in ops if _kernels.builds_for(op, arch)
            for targs in _kernels.VARIANTS[op]]

    failures = 0
    if work is _offline and args.jobs != 1:
        with ProcessPoolExecutor(max_workers=args.jobs or None) as pool:
            results = pool.map(work, jobs)
            failures = _report(results, len(jobs))
    else:
        failures = _report(map(work, jobs), len(jobs))
    print(f"{len(jobs) - failures} of {len(jobs)} variants compiled for {arch}")
    return 1 if failures else 0


def _report(results, total: int) -> int:
    failures = 0
    for i, ((op, targs, _), seconds, what) in enumerate(results, 1):
        name = _kernels.name_expression(op, targs)
        if seconds is None:
            failures += 1
            print(f"[{i}/{total}] FAILED {name}\n{what}", file=sys.stderr)
        else:
            print(f"[{i}/{total}] {name}: {what} in {seconds:.1f} s", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
