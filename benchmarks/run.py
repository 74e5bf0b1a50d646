"""cpattn benchmarks, with peers run side by side in the same process on the same inputs.

    python benchmarks/run.py --config benchmarks/configs/decode.yaml [--quick] [--peers] [--out DIR]

Timing: CUDA events per run (warm-up, then ``repeat`` timed runs; median and p90 - p10 spread).
The memory-bound suites (decode, MLA, cascade) rotate through copies of their inputs, one set per
timed run, when one set is smaller than twice the L2 (``input_sets`` in the JSON), so that no
run finds its inputs left in L2 by the run before; the prefill suites' inputs exceed the L2.

Figures: GB/s of K+V read for decode, TFLOP/s for prefill (4 * D * heads per visible
(query, key) pair: causal counts about half of 4*S*S*D per head), each as a % of the ceiling
measured in the same run (a large device copy for bandwidth, a large bf16 cuBLAS matmul for
tensor-core rate); cascade's % is of the bytes it reads (the shared prefix once). Also the host
microseconds of plan() and run(), and the ratio to the best peer.

Check: a sample of each case's output against cpattn.reference, relative error within 1e-3
(float16) or 1e-2 (bfloat16). A case over it is marked FAIL in its progress line and in the
table, and the exit status is 1 once every output is written. A peer that raises is noted (in
the progress line, ``peer_errors`` in the JSON, a line under the table) and the run goes on.

Output under --out: results.json, rewritten after every case (a run that stops keeps the cases
done), then results.md (the Markdown table) and, with matplotlib, results.png (the plot).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cupy  # noqa: E402

import cpattn  # noqa: E402
from benchmarks import suites  # noqa: E402


def time_ms(fn, warmup: int = 5, repeat: int = 30) -> tuple[float, float]:
    """Median and (p90 - p10) of ``fn``'s device time in ms, with CUDA events per run."""
    for _ in range(warmup):
        fn()
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(repeat)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    events[-1][1].synchronize()
    times = np.array([cupy.cuda.get_elapsed_time(a, b) for a, b in events])
    return float(np.median(times)), float(np.percentile(times, 90) - np.percentile(times, 10))


def host_us(fn, repeat: int = 50) -> float:
    """Median host time of ``fn`` in microseconds (the device is not waited for)."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    cupy.cuda.get_current_stream().synchronize()
    return float(np.median(samples))


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured now."""
    n = 1 << 30
    src, dst = cupy.empty(n, np.uint8), cupy.empty(n, np.uint8)
    ms, _ = time_ms(lambda: dst.__setitem__(Ellipsis, src), 3, 10)
    bandwidth = 2 * n / ms / 1e6
    size = 8192
    rng = cupy.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32).astype(cpattn._arrays.BFLOAT16)
    b = rng.standard_normal((size, size), dtype=np.float32).astype(cpattn._arrays.BFLOAT16)
    ms, _ = time_ms(lambda: cupy.matmul(a, b), 3, 10)
    return {"copy_GBps": bandwidth, "matmul_bf16_TFLOPs": 2 * size ** 3 / ms / 1e9}


def environment() -> dict:
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    try:
        # "-dirty" when tracked files differ from the commit: the figures are of another tree.
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                                capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"gpu": props["name"].decode(), "driver": cupy.cuda.runtime.driverGetVersion(),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(), "cupy": cupy.__version__,
            "python": platform.python_version(), "commit": commit}


def check_cell(row: dict) -> str:
    """The table's check column: "ok" or "**FAIL**" with the relative error.

    >>> check_cell(dict(rel_err=2.5e-4, check="ok")), check_cell(dict(rel_err=0.03, check="FAIL"))
    ('ok 2.5e-04', '**FAIL** 3.0e-02')
    """
    verdict = "ok" if row.get("check") == "ok" else "**FAIL**"
    return f"{verdict} {row['rel_err']:.1e}"


def failed(row: dict) -> bool:
    """Whether the row's check against the reference failed (or none was made)."""
    return row.get("check") != "ok"


def markdown(results: list[dict], env: dict, ceil: dict, command: str) -> str:
    lines = [f"GPU: {env['gpu']}, CuPy {env['cupy']}, commit {env['commit']}; ceilings: copy "
             f"{ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s",
             f"Command: `{command}`", "",
             "| suite | case | cpattn | unit | % ceiling | plan us | run us | check (rel. err) "
             "| best peer | peer | ours / peer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peers = {k: v for k, v in r.get("peers", {}).items() if v is not None}
        best = max(peers.items(), key=lambda kv: kv[1], default=(None, None))
        ratio = f"{r['value'] / best[1]:.2f}" if best[1] else "-"
        peer = f"{best[1]:.0f}" if best[1] else "-"
        lines.append(f"| {r['suite']} | {r['case']} | {r['value']:.0f} | {r['unit']} | "
                     f"{r['pct_ceiling']:.0f} | {r.get('plan_us', 0):.0f} | "
                     f"{r.get('run_us', 0):.0f} | {check_cell(r)} | {best[0] or '-'} | {peer} | "
                     f"{ratio} |")
    bad = [r for r in results if failed(r)]
    if bad:
        tolerances = ", ".join(f"{np.dtype(k).name} {v:g}" for k, v in suites.TOLERANCE.items())
        lines += ["", f"The check against cpattn.reference failed in {len(bad)} case(s) "
                  f"(relative error allowed: {tolerances})."]
    notes = [f"- {r['suite']} {r['case']}: {name}: {msg}"
             for r in results for name, msg in r.get("peer_errors", {}).items()]
    if notes:
        lines += ["", "Peers that raised (left out of the ratio):", *notes]
    return "\n".join(lines) + "\n"


def progress(row: dict, i: int, n: int) -> str:
    """One line per case: the figure, the check, the peers' figures and any peer that raised."""
    also = f", {row['also']}" if "also" in row else ""
    verdict = (f"check ok (err {row['rel_err']:.1e})" if not failed(row) else
               f"check FAIL: err {row['rel_err']:.1e} > {row.get('tolerance', float('nan')):.0e}")
    peers = [f"{k} {v:.0f}" for k, v in row.get("peers", {}).items() if v]
    peers += [f"{k} failed ({msg})" for k, msg in row.get("peer_errors", {}).items()]
    return (f"[{row['suite']} {i}/{n}] {row['case']}: {row['value']:.0f} {row['unit']} "
            f"({row['pct_ceiling']:.0f}% of ceiling{also}) {verdict}"
            f"{'; ' + ', '.join(peers) if peers else ''}")


def write_json(path: Path, env: dict, ceil: dict, results: list[dict]) -> None:
    """Write the results so far (through a temporary file: a crash mid-write keeps the last)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "ceilings": ceil, "results": results},
                              indent=1))
    tmp.replace(path)


def run_configs(args, env: dict, ceil: dict, out: Path, results: list[dict]) -> None:
    """Every case of every --config, appended to ``results`` with a progress line each;
    results.json rewritten after each case."""
    for path in args.config:
        config = yaml.safe_load(Path(path).read_text())
        cases = config["cases"][:1] if args.quick else config["cases"]
        for i, case in enumerate(cases, 1):
            suite = case.get("suite", config.get("suite"))  # a preset file mixes suites
            row = suites.SUITES[suite](case, args.peers, time_ms, host_us, ceil)
            row["suite"] = case.get("name", suite)
            results.append(row)
            print(progress(row, i, len(cases)), flush=True)
            write_json(out / "results.json", env, ceil, results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--quick", action="store_true", help="first case of each suite only")
    parser.add_argument("--peers", action="store_true", help="run torch SDPA / FlashInfer too")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--results", help="also write the Markdown table to this file "
                        "(benchmarks/RESULTS.md holds the latest H200 run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env, ceil = environment(), ceilings()
    print(f"{env['gpu']}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul "
          f"{ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    results = []
    try:
        run_configs(args, env, ceil, out, results)
    except BaseException:
        # A case raised (or ^C): keep the table of the cases done; results.json has them too.
        (out / "results.md").write_text(markdown(results, env, ceil, command))
        raise
    table = markdown(results, env, ceil, command)
    (out / "results.md").write_text(table)
    plot(results, out / "results.png")
    if args.results:
        # The plot beside the published table (results.png in its folder), linked from it.
        page = Path(args.results)
        figure = ("![cpattn / best peer per case, same run](results.png)\n\n"
                  if plot(results, page.with_name("results.png")) else "")
        page.write_text("# Latest results\n\nWritten by `benchmarks/run.py --results`;"
                        " peers ran in the same process on the same inputs.\n\n" + figure + table)
    print(table)
    bad = [r for r in results if failed(r)]
    for r in bad:
        print(f"FAIL {r['suite']} {r['case']}: relative error {r['rel_err']:.1e} against "
              f"cpattn.reference", file=sys.stderr)
    return 1 if bad else 0


def plot(results: list[dict], path: Path) -> bool:
    """cpattn / best peer for every case with a peer, as a PNG; whether one was written (not
    without matplotlib, nor without a peer)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [(f"{r['suite']}: {r['case']}", r["value"] / max(v for v in r["peers"].values() if v))
            for r in results if any(r.get("peers", {}).values())]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    ax.barh([name for name, _ in rows], [ratio for _, ratio in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("cpattn / best peer (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
