"""Run every benchmark, then the report: what `make bench` runs.

    .venv/bin/python -m bench.run_all              # full sizes: about 20 minutes on 2 idle CPU cores, capped at 29
    .venv/bin/python -m bench.run_all --quick      # small sizes (a few minutes): checks that everything runs
    .venv/bin/python -m bench.run_all --only rollout sync
    .venv/bin/python -m bench.run_all --cap-scale 2     # a host busy with other work: twice the time caps

Runs `python -m bench.<name> [--quick]` for step, rollout, sync and kernels, one after the other, each in its own
process (vLLM, Ray and torch state never leak between them) with a time cap; a benchmark that fails or runs past its
cap is stopped (with everything it started) and reported as such, and the others still run. The previous result file
of each benchmark is removed before it runs, so the report never shows a stale number. Then `bench.report` writes
bench/out/report[_quick].md, the PNGs and report[_quick].json. Prints a JSON summary (per-benchmark wall time, exit
status, load average before and after) and writes bench/out/run_all[_quick].json.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, REPO, load_average, machine_info, write_result

log = logging.getLogger("bench.run_all")

# name → (result files it writes, time cap in seconds for the full and the quick run)
BENCHMARKS: dict[str, tuple[tuple[str, ...], int, int]] = {
    "step": (("step",), 600, 300),
    "rollout": (("rollout",), 480, 300),
    "sync": (("sync",), 330, 240),
    "kernels": (("kernels_cpu",), 300, 120),
}
TOTAL_CAP_S = 29 * 60


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the benchmark process and every process it started (Ray, vLLM)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for item in tree:
            try:
                item.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        if not alive:
            return
        tree = alive


def run_one(name: str, quick: bool, cap_s: float, out_dir: Path) -> dict[str, Any]:
    files, _, _ = BENCHMARKS[name]
    for stem in files:
        for suffix in (".json", ".png"):
            (out_dir / f"{stem}{'_quick' if quick else ''}{suffix}").unlink(missing_ok=True)
    command = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    log_path = out_dir / f"{name}{'_quick' if quick else ''}.log"
    load_before = load_average()
    start = time.perf_counter()
    log.info("== %s (cap %.0f s): %s; stderr → %s", name, cap_s, " ".join(command[1:]), log_path)
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            returncode = proc.wait(timeout=cap_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            returncode, timed_out = proc.wait(), True
    wall = time.perf_counter() - start
    written = [stem for stem in files if (out_dir / f"{stem}{'_quick' if quick else ''}.json").is_file()]
    if timed_out:
        status = "timed out" + (" (partial results kept)" if written else "")
    else:
        status = "ok" if returncode == 0 and written else f"failed (exit {returncode})"
    log.info("== %s: %s in %.0f s", name, status, wall)
    return {"status": status, "wall_s": wall, "cap_s": cap_s, "returncode": returncode, "results": written,
            "log": str(log_path), "load_average_before": load_before, "load_average_after": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--cap-scale", type=float, default=1.0,
                        help="multiply every time cap (and the 29-minute total) by this, e.g. 2 on a busy shared host")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    start = time.perf_counter()
    summary: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "cap_scale": args.cap_scale,
                               "benchmarks": {}}
    for name in args.only:
        cap = BENCHMARKS[name][2 if args.quick else 1] * args.cap_scale
        remaining = TOTAL_CAP_S * args.cap_scale - (time.perf_counter() - start) - 30  # 30 s for the report
        if remaining < 60:
            summary["benchmarks"][name] = {"status": "skipped: total time cap reached"}
            continue
        summary["benchmarks"][name] = run_one(name, args.quick, min(cap, remaining), OUT_DIR)
    report = subprocess.run([sys.executable, "-m", "bench.report", *(["--quick"] if args.quick else [])], cwd=REPO,
                            stdout=subprocess.DEVNULL)
    summary["report"] = {"returncode": report.returncode,
                         "markdown": str(OUT_DIR / f"report{'_quick' if args.quick else ''}.md")}
    summary["total_s"] = time.perf_counter() - start
    summary["load_average_end"] = load_average()
    write_result("run_all", summary, quick=args.quick)
    failed = [name for name, item in summary["benchmarks"].items() if item.get("status") != "ok"]
    if failed or report.returncode:
        log.warning("not ok: %s", failed or "report")
        sys.exit(1)


if __name__ == "__main__":
    main()
