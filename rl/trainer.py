"""The step loop shared by recipes: rollout → rewards → advantages → train → weight sync, with checkpoints.

    prompts ─► RolloutPool.generate ─► RewardService.score ─► advantages (pure) ─► TrainBatch
            ─► LearnerGroup.train ─► WeightSync.push ─► policy_version += 1

A recipe supplies a `PromptSource` (the training prompts in a deterministic order) — or, with a progressive
curriculum (`curriculum.stages`, rl/curriculum.py), one source per stage data filter, each stage also setting the
step's KL β — and optionally an evaluation function; everything else — actors, logging (console progress bar,
`metrics.jsonl`, TensorBoard, rollout JSONL), checkpoints and `resume: auto` — lives here. Same seed and config
give the same run, and a resumed run continues exactly where the interrupted one stopped (data position, RNG,
optimizer state, weights).

Faults (rl/health.py): every `cluster.health_check_every` steps the actors answer a heartbeat before the step starts;
restarts and re-issued work of rollout workers and reward actors are reported per step as `fault/*` metrics; a step
that fails for good (a learner rank lost, an actor past `cluster.max_restarts`) stops the run with an error that
names the last good checkpoint, from which `resume: auto` continues when the same command is submitted again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import ray
import torch
import yaml
from tqdm import tqdm

from rl import checkpoint as ckpt
from rl.advantages import ADVANTAGE_ESTIMATORS, LEVEL_ESTIMATORS, REWARD_PAIR_ESTIMATORS
from rl.config import Config, ConfigError, save_config, to_dict
from rl.curriculum import ProgressiveSchedule, schedule_from_config
from rl.health import FaultCounters
from rl.hepo import LevelCoder, hepo_batch
from rl.learner_group import LearnerGroup
from rl.placement import plan_placement
from rl.placement_groups import PlacementGroups, cluster_has_gpu
from rl.types import Rollout, Sample, ScoredRollout, TrainBatch
from rl.weight_sync import make_weight_sync

log = logging.getLogger(__name__)


class PromptSource(Protocol):
    def __len__(self) -> int: ...

    def sample(self, index: int) -> Sample: ...


@dataclass(frozen=True)
class StepContext:
    """What callbacks see after each step (tests use it for parity checks)."""

    step: int
    metrics: dict[str, float]
    trainer: Trainer


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def draw_prompts(source: PromptSource, position: int, count: int, seed: int) -> list[Sample]:
    """Prompts `position .. position+count-1` of the seeded epoch-wise shuffle (deterministic, resumable)."""
    num = len(source)
    if num == 0:
        raise ValueError("The prompt source is empty: the recipe's data produced no training prompts.")
    out = []
    for pos in range(position, position + count):
        epoch, offset = divmod(pos, num)
        out.append(source.sample(epoch_order(num, seed, epoch)[offset]))
    return out


def build_train_batch(scored: Sequence[ScoredRollout], advantages_N: torch.Tensor) -> TrainBatch:
    """Right-padded prompt+completion batch; loss, sampler log-probs and advantages on completion positions."""
    lengths = [len(s.rollout.prompt_token_ids) + len(s.rollout.completion_token_ids) for s in scored]
    B, T = len(scored), max(lengths)
    input_ids_BT = torch.zeros(B, T, dtype=torch.int64)
    attention_BT = torch.zeros(B, T, dtype=torch.int64)
    loss_mask_BT = torch.zeros(B, T, dtype=torch.float32)
    old_BT = torch.zeros(B, T, dtype=torch.float32)
    adv_BT = torch.zeros(B, T, dtype=torch.float32)
    group_of: dict[str, int] = {}
    group_ids_B = torch.zeros(B, dtype=torch.int64)
    for b, item in enumerate(scored):
        r = item.rollout
        p, c = len(r.prompt_token_ids), len(r.completion_token_ids)
        input_ids_BT[b, : p + c] = torch.tensor(list(r.prompt_token_ids) + list(r.completion_token_ids))
        attention_BT[b, : p + c] = 1
        if r.action_mask is None:
            loss_mask_BT[b, p: p + c] = 1.0
        else:  # multi-turn: observation tokens inserted by the environment never enter the loss
            loss_mask_BT[b, p: p + c] = torch.tensor(r.action_mask, dtype=torch.float32)
        old_BT[b, p: p + c] = torch.tensor(r.logprobs, dtype=torch.float32)
        adv_BT[b, p: p + c] = advantages_N[b]
        group_ids_B[b] = group_of.setdefault(r.sample.sample_id, len(group_of))
    positions_BC, allowed_BCA = allowed_id_tensors([s.rollout for s in scored])
    return TrainBatch(input_ids_BT=input_ids_BT, attention_mask_BT=attention_BT, loss_mask_BT=loss_mask_BT,
                      old_logprobs_BT=old_BT, advantages_BT=adv_BT, group_ids_B=group_ids_B,
                      allowed_positions_BC=positions_BC, allowed_ids_BCA=allowed_BCA)


def allowed_id_tensors(rollouts: Sequence[Rollout]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`TrainBatch.allowed_positions_BC` and `allowed_ids_BCA` from the rollouts' `allowed_token_ids` (-1 padded;
    (None, None) when no rollout was constrained). Positions whose set is () (no constraint there) are left out."""
    per_row = [[(len(r.prompt_token_ids) + c, ids) for c, ids in enumerate(r.allowed_token_ids or ()) if ids]
               for r in rollouts]
    num_cols = max((len(row) for row in per_row), default=0)
    if num_cols == 0:
        return None, None
    width = max(len(ids) for row in per_row for _, ids in row)
    positions_BC = torch.full((len(rollouts), num_cols), -1, dtype=torch.int64)
    allowed_BCA = torch.full((len(rollouts), num_cols, width), -1, dtype=torch.int64)
    for b, row in enumerate(per_row):
        for c, (position, ids) in enumerate(row):
            positions_BC[b, c] = position
            allowed_BCA[b, c, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return positions_BC, allowed_BCA


def reward_pair(scored: Sequence[ScoredRollout], business: str, semantic: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(business_N, semantic_N, judged_N) for `REWARD_PAIR_ESTIMATORS`: the two rewards' scores, and whether the
    semantic reward judged the rollout (its component `judged` is 1; absent = judged)."""
    business_N = torch.tensor([s.results[business].score for s in scored], dtype=torch.float32)
    semantic_N = torch.tensor([s.results[semantic].score for s in scored], dtype=torch.float32)
    judged_N = torch.tensor([s.results[semantic].components.get("judged", 1.0) == 1.0 for s in scored])
    return business_N, semantic_N, judged_N


def rollout_metrics(rollouts: Sequence[Rollout], seconds: float, policy_version: int) -> dict[str, float]:
    lengths = np.array([len(r.completion_token_ids) for r in rollouts], dtype=np.float64)
    return {
        "rollout/len_mean": float(lengths.mean()),
        "rollout/len_max": float(lengths.max()),
        "rollout/truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
        "rollout/tokens_per_s": float(lengths.sum() / max(seconds, 1e-9)),
        "rollout/staleness_max": float(max(policy_version - r.policy_version for r in rollouts)),
        "timing/rollout": seconds,
    }


def check_curriculum_prompts(cfg: Config, prompts: PromptSource | Mapping[str, PromptSource]
                             ) -> ProgressiveSchedule | None:
    """The curriculum schedule (None without `curriculum.stages`), checked against the prompt sources given."""
    if not cfg.curriculum.stages:
        if isinstance(prompts, Mapping):
            raise ConfigError(f"The recipe gave prompt sources per data filter ({', '.join(prompts)}) but the config "
                              "has no curriculum.stages to choose among them. Add the stages (see rl/curriculum.py).")
        return None
    schedule = schedule_from_config(cfg.curriculum, default_kl=cfg.algorithm.kl_coef)
    if not isinstance(prompts, Mapping):
        raise ConfigError("curriculum.stages is set, but this recipe has a single prompt source, so its stages "
                          "cannot change the data. Remove curriculum.stages, or use a recipe with data filters.")
    missing = [s.data_filter for s in schedule.stages if s.data_filter not in prompts]
    if missing:
        raise ConfigError(f"curriculum data filter(s) {missing} are not offered by this recipe; it offers: "
                          f"{', '.join(sorted(prompts))}.")
    return schedule


def resolve_model_path(path: str) -> str:
    """"smollm2-135m" → the prepared embedded model; a directory is used as is."""
    from rl import assets

    if path in ("smollm2-135m", "smollm2-135m-instruct"):
        return str(assets.require("model"))
    if Path(path).is_dir():
        return path
    raise ConfigError(f"model.path='{path}' is neither 'smollm2-135m' nor an existing model directory.")


class MetricsLogger:
    """metrics.jsonl + TensorBoard; every value is a float keyed `area/name`."""

    def __init__(self, run_dir: Path, *, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    if cfg.cluster.address is None:
        # vLLM logs every engine step at INFO; keep the console readable unless the user asks for more.
        env_vars = {"TOKENIZERS_PARALLELISM": "false",
                    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env_vars})
    else:
        ray.init(address=cfg.cluster.address)


class Trainer:
    """Owns the actors and the loop. `fit()` runs (or resumes) the configured number of steps."""

    def __init__(self, cfg: Config, prompts: PromptSource | Mapping[str, PromptSource], *,
                 run_dir: Path | None = None,
                 evaluate: Callable[[Trainer, int], dict[str, float]] | None = None,
                 callbacks: Sequence[Callable[[StepContext], None]] = (),
                 collect: Callable[[Trainer, list[Sample], int, int], list[Rollout]] | None = None,
                 level_coder: LevelCoder | None = None) -> None:
        """`collect(trainer, samples, policy_version, seed)` replaces single-turn `pool.generate` (multi-turn
        recipes run their environment loop there); it must return G rollouts per sample, grouped, in order.
        With `curriculum.stages` in the config, `prompts` maps each stage's data filter to its prompt source.
        `level_coder` reads generated semantic IDs as per-level codes; `algorithm.advantage: hepo` needs it."""
        if cfg.algorithm.advantage in LEVEL_ESTIMATORS and level_coder is None:
            raise ConfigError(f"algorithm.advantage='{cfg.algorithm.advantage}' scores each semantic-ID level, so the "
                              "recipe must pass Trainer(level_coder=...) (e.g. rollouts.sid_levels.SIDLevelCoder "
                              "over its SID index); this recipe generates no semantic IDs. Use a SID recipe such "
                              "as gpr_hepo, or a token-level estimator (grpo, ...).")
        self.level_coder = level_coder
        self.cfg, self.prompts, self.evaluate_fn, self.callbacks = cfg, prompts, evaluate, list(callbacks)
        self.schedule = check_curriculum_prompts(cfg, prompts)
        self.collect = collect
        self.run_dir = run_dir or Path(cfg.run.output_dir) / cfg.run.name
        self.model_path = resolve_model_path(cfg.model.path)
        self.sync = make_weight_sync(cfg.cluster)
        self.pool = self.learners = self.rewards = None
        self.placement: PlacementGroups | None = None
        self.state = ckpt.TrainerState(step=0, policy_version=0, data_position=0, rng=ckpt.capture_rng())
        self.faults = FaultCounters()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def _resume_point(self) -> Path | None:
        resume = self.cfg.run.resume
        if resume == "never":
            if ckpt.latest_checkpoint(self.run_dir) is not None:
                raise ConfigError(f"run.resume=never but {self.run_dir} already holds checkpoints; choose another "
                                  "run.name or run.output_dir, or set run.resume=auto to continue it.")
            return None
        if resume == "auto":
            for action in ckpt.recover_interrupted(self.run_dir):  # e.g. the driver was killed mid-save
                log.warning("checkpoints of %s: %s", self.run_dir, action)
            return ckpt.latest_checkpoint(self.run_dir)
        path = Path(resume)
        if not (path / ckpt.COMPLETE).is_file():
            raise ConfigError(f"run.resume={resume} is not a complete checkpoint directory.")
        return path

    def setup(self) -> None:
        from rewards.service import RewardService
        from rollouts.pool import RolloutPool

        cfg = self.cfg
        resume_from = self._resume_point()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        init_ray(cfg)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard)
        # Bundles first (rl/placement.py): every actor below is pinned to its bundle, restarts included.
        self.placement = placement = PlacementGroups(
            plan_placement(cfg, gpu=cluster_has_gpu()), timeout_s=cfg.cluster.placement_timeout_s,
            colocate=cfg.cluster.colocate, fixed_cluster=cfg.cluster.address is None)
        self.pool = RolloutPool(self.model_path, model_cfg=cfg.model, rollout_cfg=cfg.rollout,
                                cluster_cfg=cfg.cluster, seed=cfg.run.seed,
                                restart_timeout_s=cfg.cluster.restart_timeout_s,
                                actor_options=placement.actor_options(placement.plan.rollout))
        self.learners = LearnerGroup(
            model_path=self.model_path, learner_cfg=cfg.learner, algorithm_cfg=cfg.algorithm, dtype=cfg.model.dtype,
            temperature=cfg.rollout.temperature, seed=cfg.run.seed, max_completion_length=cfg.rollout.max_new_tokens,
            colocate=cfg.cluster.colocate, call_timeout_s=cfg.cluster.learner_timeout_s,
            actor_options=placement.actor_options(placement.plan.learner),
        )
        self.rewards = RewardService(cfg.reward, max_restarts=cfg.cluster.max_restarts,
                                     slot_options=placement.reward_options())
        if resume_from is None:
            self.logger.truncate_after(0)  # a fresh start in an existing run dir: drop its stale metric lines
        else:
            self.state = ckpt.load_trainer_state(resume_from)
            self.learners.load_checkpoint(str(resume_from), ckpt.LEARNER_TAG)
            ckpt.restore_rng(self.state.rng)
            self.logger.truncate_after(self.state.step)
            self.sync.push(self.learners, self.pool, self.state.policy_version)
            log.info("resumed from %s at step %d", resume_from, self.state.step)

    def close(self) -> None:
        for part in (self.rewards, self.pool, self.learners):
            if part is not None:
                part.shutdown()
        if self.placement is not None:  # after the actors: removing a group kills whatever still runs in it
            self.placement.remove()
        self.sync.close()
        if getattr(self, "logger", None) is not None:
            self.logger.close()

    # -- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Run steps `state.step + 1 .. run.num_steps`; returns the last step's metrics."""
        if self.pool is None:
            self.setup()
        cfg, last = self.cfg, {}
        bar = tqdm(range(self.state.step + 1, cfg.run.num_steps + 1), initial=self.state.step,
                   total=cfg.run.num_steps, desc="train", disable=not cfg.logging.progress_bar, dynamic_ncols=True)
        for step in bar:
            try:
                last = self.step(step)
            except Exception as err:
                latest = ckpt.latest_checkpoint(self.run_dir)
                log.error("step %d failed (%s: %s). The run stops; its last good checkpoint is %s. Submit the same "
                          "command again to resume from it (run.resume=auto).", step, type(err).__name__,
                          str(err).splitlines()[0] if str(err) else "", latest or "none (it starts over)")
                raise
            bar.set_postfix(reward=f"{last.get('reward/total', float('nan')):.3f}",
                            kl=f"{last.get('loss/kl', 0.0):.4f}", tok_s=f"{last.get('rollout/tokens_per_s', 0):.0f}")
            for callback in self.callbacks:
                callback(StepContext(step=step, metrics=last, trainer=self))
        if self.evaluate_fn is not None and (cfg.run.eval_every == 0 or cfg.run.num_steps % cfg.run.eval_every):
            final_eval = self.evaluate_fn(self, cfg.run.num_steps)
            self.logger.log(cfg.run.num_steps, final_eval)
            last.update(final_eval)
        return last

    def step(self, step: int) -> dict[str, float]:
        cfg, start = self.cfg, time.perf_counter()
        heartbeat = {}
        if cfg.cluster.health_check_every and step % cfg.cluster.health_check_every == 0:
            heartbeat = self.heartbeat()
        source, kl_coef, stage_metrics = self._stage(step)
        samples = draw_prompts(source, self.state.data_position, cfg.rollout.num_prompts_per_step, cfg.run.seed)
        version = self.state.policy_version
        t0 = time.perf_counter()
        seed = cfg.run.seed * 100_003 + step
        if self.collect is None:
            rollouts = self.pool.generate(samples, policy_version=version, seed=seed)
        else:
            rollouts = self.collect(self, samples, version, seed)
        metrics = rollout_metrics(rollouts, time.perf_counter() - t0, version)
        metrics.update(stage_metrics)
        report = self.rewards.score(rollouts)
        metrics.update(report.metrics)
        if report.scored:
            metrics.update(self._learn(report.scored, step, kl_coef))
        else:
            log.warning("step %d: every group was dropped by the reward failure policy; no update", step)
            metrics["train/skipped"] = 1.0
        version += 1
        metrics.update(self.sync.push(self.learners, self.pool, version))
        if cfg.logging.save_rollouts:
            self._save_rollouts(step, report.scored)
        self.state = ckpt.TrainerState(step=step, policy_version=version,
                                       data_position=self.state.data_position + len(samples), rng=ckpt.capture_rng())
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(self, step))
        metrics.update(heartbeat)
        metrics.update(self.faults.step_metrics({**self.pool.fault_counts(), **self.rewards.fault_counts()}))
        metrics["timing/step"] = time.perf_counter() - start
        self.logger.log(step, metrics)
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.num_steps:
            self.save()
        return metrics

    def heartbeat(self) -> dict[str, float]:
        """Ping every actor (learners first: a lost rank ends the run before the step's work is spent); dead or
        unresponsive rollout and reward actors are restarted here. Returns `health/*` latencies."""
        timeout = self.cfg.cluster.health_check_timeout_s
        return {"health/learner_ping_s": self.learners.heartbeat(timeout),
                "health/rollout_ping_s": self.pool.heartbeat(timeout),
                "health/reward_ping_s": self.rewards.heartbeat(timeout)}

    def _stage(self, step: int) -> tuple[PromptSource, float | None, dict[str, float]]:
        """The prompt source, KL β (None = algorithm.kl_coef) and `curriculum/*` metrics of 1-based `step`."""
        if self.schedule is None:
            return self.prompts, None, {}  # type: ignore[return-value]
        active, _ = self.schedule.observe(step - 1)
        return (self.prompts[active.stage.data_filter], active.stage.kl_beta,
                {"curriculum/stage": float(active.index), "curriculum/kl_coef": active.stage.kl_beta})

    def _learn(self, scored: Sequence[ScoredRollout], step: int, kl_coef: float | None = None) -> dict[str, float]:
        rewards_N = torch.tensor([s.reward for s in scored], dtype=torch.float32)
        group_of: dict[str, int] = {}
        group_ids_N = torch.tensor([group_of.setdefault(s.rollout.sample.sample_id, len(group_of)) for s in scored])
        algo = self.cfg.algorithm
        if algo.advantage in LEVEL_ESTIMATORS:  # HEPO: per-level rewards, critic values, GAE (rl/hepo.py)
            batch, adv_metrics = hepo_batch(
                build_train_batch(scored, torch.zeros(len(scored))), scored, self.level_coder(scored),
                self.learners.values, business_reward=algo.business_reward, alpha=algo.hepo_alpha,
                gamma=algo.gae_gamma, lam=algo.gae_lambda, eps=algo.eps)
        else:
            if algo.advantage in REWARD_PAIR_ESTIMATORS:  # e.g. A2PO: business and semantic rewards kept apart
                business_N, semantic_N, judged_N = reward_pair(scored, algo.business_reward, algo.semantic_reward)
                advantages_N, adv_metrics = REWARD_PAIR_ESTIMATORS[algo.advantage](
                    business_N, semantic_N, judged_N, group_ids_N, eps=algo.eps)
            else:
                estimator = ADVANTAGE_ESTIMATORS[algo.advantage]
                advantages_N, adv_metrics = estimator(rewards_N, group_ids_N, eps=algo.eps)
            batch = build_train_batch(scored, advantages_N)
        t0 = time.perf_counter()
        metrics = self.learners.train(batch, entropy_coef=self.cfg.algorithm.entropy_coef, kl_coef=kl_coef)
        metrics["timing/train"] = time.perf_counter() - t0
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        metrics["train/num_sequences"] = float(batch.num_sequences)
        return metrics

    def _save_rollouts(self, step: int, scored: Sequence[ScoredRollout]) -> None:
        from rl.rollout_io import write_rollouts

        directory = self.run_dir / "rollouts"
        directory.mkdir(exist_ok=True)
        write_rollouts(directory / f"step_{step:06d}.jsonl", scored)

    def save(self) -> Path:
        config_yaml = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        return ckpt.save_checkpoint(self.run_dir, self.state, config_yaml=config_yaml,
                                    save_learner=self.learners.save_checkpoint, keep=self.cfg.run.keep_checkpoints)
