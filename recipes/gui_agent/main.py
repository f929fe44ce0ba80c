"""gui_agent: trajectory-level GRPO for a web GUI agent on MiniWoB++ in real headless Chromium.

Each training sample is a task instance (task, seed); G episodes of it are played by the policy, multi-turn and
token-in/token-out on vLLM (rollouts/multiturn.py), against MiniWoB++ pages in Chromium environment actors
(rollouts/envs/). Each turn the model sees the screen as an element list (`button "Next" [4] @(2,52,43x21)`) under
the configured history mode (`gui.history`: full / last_k / semantic_context, rollouts/context.py) and answers with
the target copied from the list, then one action (`"Next" [4]` / `click(4)`; `type(6, "text")`, ...). Rewards
(debug.yaml): `gui_task`, the environment's task success minus 0.1 per unparsable answer with step-efficiency decay
among a group's successes, and `gui_step`, exact matching against the scripted reference action where the task has
one (rewards/gui.py; `type_weight: 0`, so a valid but wrong click earns nothing). Advantages are
trajectory-level GRPO over the G episodes; when history compression splits an episode into several training
sequences (one per rebuilt prompt), they share the trajectory's advantage with 1/|tau| normalisation over the
trajectory's action tokens (`rollouts.multiturn.segment_advantages`). Evaluation: greedy episodes on held-out seeds,
success rate and ATP (milestones reached / declared) per task, with the episodes in `{run_dir}/eval/step_*.jsonl`.

Local (CPU or one GPU, everything colocated; needs Debian chromium + chromium-driver, `make gui-deps`):
    recforge run gui_agent --config debug [run.num_steps=30 gui.history=semantic_context ...]
    python -m recipes.gui_agent --config debug
On a Ray cluster (token authentication on; see cluster/README.md; Chromium on every node that runs environments):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \\
        python -m recipes.gui_agent --config recipes/gui_agent/cluster.yaml cluster.address=auto
cluster.yaml is the vision-language variant (Qwen2.5-VL style: screenshot + task, click(X, Y)): it needs a GPU host
and `model.path` pointing at a VLM checkpoint on shared storage. RecForge's learner computes text-only log-probs, so
that config runs rollouts and evaluation (`--eval-only`); training a VLM needs a learner with pixel inputs (not yet).

How it differs from the papers it draws on:
- UI-Venus-1.5 trains large vision-language GUI agents with online RL over full trajectories on Android
  (AndroidWorld). Here: MiniWoB++ web tasks in Chromium, text observations, the embedded 135M model on CPU, and no
  supervised or grounding stages before RL; only the trajectory-level GRPO core is reproduced.
- SecAgent's semantic context keeps compact natural-language summaries of past steps instead of past screens. Here
  the summaries come from a rule-based summariser (action, target element, error, milestone progress) or from the
  policy itself (`gui.summariser=model`: a `Summary:` line in its answer, trained along with the action), and at
  most `gui.max_summaries` are kept.
- AndroidLens measures Average Task Progress with annotated milestones on Android apps. Here milestones are declared
  per MiniWoB task in code (rollouts/envs/miniwob.py, 1-3 per task); ATP is reported, never rewarded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rl.config import Config, ConfigError, load_config, resolve_config_path
from rl.trainer import Trainer, build_train_batch, resolve_model_path
from rl.types import Rollout, Sample, ScoredRollout, TrainBatch
from rollouts.context import (
    DEMONSTRATION,
    SCREENSHOT_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    ChatRenderer,
    ContextSettings,
)
from rollouts.multiturn import (
    MultiTurnCollector,
    SamplingSettings,
    Trajectory,
    episode_metrics,
    segment_advantages,
    trajectory_info,
    trajectory_rollouts,
)

log = logging.getLogger(__name__)

EVAL_SEED_BASE = 1_000_000
"""Evaluation episodes use seeds EVAL_SEED_BASE + i: never among the training seeds 0 .. num_train_seeds - 1."""


class GuiTasks:
    """The trainer's `PromptSource`: sample i is (tasks[i % T], seed i // T), so tasks alternate."""

    def __init__(self, tasks: Sequence[str], num_seeds: int) -> None:
        self.tasks, self.num_seeds = list(tasks), num_seeds

    def __len__(self) -> int:
        return len(self.tasks) * self.num_seeds

    def sample(self, index: int) -> Sample:
        seed, which = divmod(index, len(self.tasks))
        return task_sample(self.tasks[which], seed)


def task_sample(task: str, seed: int, *, prefix: str = "") -> Sample:
    """The sample of one task instance; its prompt is filled in from the first screen when the episode starts."""
    return Sample(sample_id=f"{prefix}{task}-s{seed}", prompt="", metadata={"task": task, "seed": seed})


class TrajectoryTrainer(Trainer):
    """The shared Trainer with trajectory-level advantages over segment rows (see rollouts/multiturn.py).

    Only `_learn` differs: `rl.trainer.Trainer` computes one advantage per rollout, which over segments would weight
    long trajectories more; here rewards are taken per trajectory, advantages computed over trajectories and scaled
    per row for the 1/|tau| normalisation. (A public advantage hook on Trainer would make this subclass unnecessary.)
    The last step's trajectories and train batch are kept for inspection (tests check token-exactness on them).
    """

    collector: MultiTurnCollector | None = None
    eval_collector: MultiTurnCollector | None = None
    last_trajectories: list[Trajectory] | None = None
    last_train_batch: TrainBatch | None = None

    def _learn(self, scored: Sequence[ScoredRollout], step: int, kl_coef: float | None = None) -> dict[str, float]:
        algo = self.cfg.algorithm
        rollouts = [s.rollout for s in scored]
        group_of: dict[str, int] = {}
        group_ids_B = torch.tensor([group_of.setdefault(r.sample.sample_id, len(group_of)) for r in rollouts])
        tokens_B = torch.tensor([sum(r.action_mask) if r.action_mask is not None else len(r.completion_token_ids)
                                 for r in rollouts])
        advantages_B, adv_metrics = segment_advantages(
            torch.tensor([s.reward for s in scored], dtype=torch.float64), [r.info["trajectory_id"] for r in rollouts],
            group_ids_B, tokens_B, estimator=algo.advantage, eps=algo.eps, aggregation=algo.aggregation)
        batch = build_train_batch(scored, advantages_B)
        self.last_train_batch = batch
        t0 = time.perf_counter()
        metrics = self.learners.train(batch, entropy_coef=algo.entropy_coef, kl_coef=kl_coef)
        metrics["timing/train"] = time.perf_counter() - t0
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        metrics["train/num_sequences"] = float(batch.num_sequences)
        metrics.update(episode_metrics([r.info for r in rollouts], prefix="traj"))
        return metrics


def collect_trajectories(trainer: TrajectoryTrainer, samples: list[Sample], policy_version: int,
                         seed: int) -> list[Rollout]:
    """The Trainer's `collect` hook: G episodes per sample, each turned into its segment rollouts."""
    assert trainer.collector is not None, "main() builds the collector after the trainer's setup"
    group_size = trainer.cfg.rollout.num_samples_per_prompt
    trajectories = trainer.collector.collect(samples, num_samples=group_size, policy_version=policy_version,
                                             seed=seed)
    trainer.last_trajectories = trajectories
    return [rollout for traj in trajectories
            for rollout in trajectory_rollouts(traj, group_size=group_size, policy_version=policy_version,
                                               history=trainer.cfg.gui.history)]


def eval_tasks(cfg: Config) -> list[str]:
    return list(cfg.gui.eval_tasks or cfg.gui.tasks)


def make_evaluate(cfg: Config) -> Callable[[Any, int], dict[str, float]]:
    """Greedy episodes on held-out seeds: `eval/success_rate`, `eval/atp` and per task `eval/<task>/...`."""
    samples = [task_sample(task, EVAL_SEED_BASE + i, prefix="eval-") for task in eval_tasks(cfg)
               for i in range(cfg.gui.num_eval_episodes)]

    def evaluate(trainer: Any, step: int) -> dict[str, float]:
        assert trainer.eval_collector is not None
        version = trainer.pool.policy_version
        trajectories = trainer.eval_collector.collect(samples, num_samples=1, policy_version=version, seed=None)
        infos = [trajectory_info(t, group_size=1, history=cfg.gui.history) for t in trajectories]
        metrics = episode_metrics(infos, prefix="eval")
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is not None:  # the episodes themselves, for reading what the policy did
            from rl.rollout_io import write_rollouts

            episodes = [r for t in trajectories
                        for r in trajectory_rollouts(t, group_size=1, policy_version=version, history=cfg.gui.history)]
            write_rollouts(Path(run_dir) / "eval" / f"step_{step:06d}.jsonl", episodes, step=step)
        log.info("step %d eval: success %.3f, ATP %.3f over %d episodes", step, metrics["eval/success_rate"],
                 metrics["eval/atp"], len(infos))
        return metrics

    return evaluate


def check_config(cfg: Config, *, training: bool) -> None:
    gui = cfg.gui
    if not gui.tasks:
        raise ConfigError("gui.tasks is empty: list at least one MiniWoB++ task, e.g. [click-button].")
    if training and cfg.algorithm.aggregation not in ("seq_mean_token_mean", "token_mean"):
        raise ConfigError(f"algorithm.aggregation='{cfg.algorithm.aggregation}': trajectory-level GRPO normalises by "
                          "each trajectory's action tokens, built on 'seq_mean_token_mean' (or 'token_mean'). Set "
                          "algorithm.aggregation=seq_mean_token_mean.")
    if gui.observation == "screenshot":
        if gui.screenshot_dir is None:
            raise ConfigError("gui.observation=screenshot needs gui.screenshot_dir (where environments save PNGs).")
        if not (gui.history == "semantic_context" or (gui.history == "last_k" and gui.last_k == 0)):
            raise ConfigError(f"gui.observation=screenshot renders one screen per prompt: set gui.history="
                              f"semantic_context (or last_k with gui.last_k=0), not '{gui.history}'.")
        if training:
            raise ConfigError("gui.observation=screenshot: RecForge's learner computes text-only log-probs (no pixel "
                              "inputs), so a vision-language policy cannot be trained yet. Run with --eval-only to "
                              "measure its success rate and ATP, or use gui.observation=text.")


def build_renderer(cfg: Config, model_path: str) -> ChatRenderer:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    screenshot = cfg.gui.observation == "screenshot"
    if screenshot and getattr(tokenizer, "chat_template", None) is None:
        from transformers import AutoProcessor  # VLMs often keep the template with the processor

        tokenizer.chat_template = AutoProcessor.from_pretrained(model_path).chat_template
    default = SCREENSHOT_SYSTEM_PROMPT if screenshot else SYSTEM_PROMPT
    demos = DEMONSTRATION if cfg.gui.demonstration and not screenshot else ()
    return ChatRenderer(tokenizer, system_prompt=cfg.gui.system_prompt or default, image_placeholder=screenshot,
                        demonstrations=demos)


def build_envs(cfg: Config) -> Any:
    from rollouts.envs.miniwob import MiniWoBConfig
    from rollouts.envs.pool import EnvPool

    gui = cfg.gui
    tasks = tuple(dict.fromkeys([*gui.tasks, *eval_tasks(cfg)]))
    env_cfg = MiniWoBConfig(tasks=tasks, max_steps=gui.max_turns, episode_timeout_s=gui.episode_timeout_s,
                            max_elements=gui.max_elements, screenshot_dir=gui.screenshot_dir)
    return EnvPool(gui.num_envs, env_cfg, seed=cfg.run.seed, call_timeout_s=gui.env_call_timeout_s,
                   max_restarts=cfg.cluster.max_restarts, num_cpus_per_env=gui.num_cpus_per_env)


def build_collectors(cfg: Config, generator: Any, envs: Any, renderer: ChatRenderer
                     ) -> tuple[MultiTurnCollector, MultiTurnCollector]:
    """(training collector at rollout.temperature, greedy evaluation collector) sharing generator and envs."""
    gui, rollout = cfg.gui, cfg.rollout
    context = ContextSettings(history=gui.history, last_k=gui.last_k, max_summaries=gui.max_summaries,
                              summary_max_chars=gui.summary_max_chars, summariser=gui.summariser,
                              text_elements=gui.observation == "text")
    sampling = SamplingSettings(temperature=rollout.temperature, top_p=rollout.top_p,
                                max_new_tokens=rollout.max_new_tokens, stop=tuple(rollout.stop),
                                max_model_len=cfg.model.max_model_len)
    screenshots = gui.observation == "screenshot"

    def make(settings: SamplingSettings) -> MultiTurnCollector:
        return MultiTurnCollector(generator, envs, renderer, context=context, sampling=settings,
                                  max_turns=gui.max_turns, screenshots=screenshots)

    return make(sampling), make(replace(sampling, temperature=0.0))


def main(cfg: Config, *, run_dir: Path | None = None, callbacks: Sequence[Callable[[Any], None]] = ()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, curves.png)."""
    from rl.plots import plot_run

    check_config(cfg, training=True)
    renderer = build_renderer(cfg, resolve_model_path(cfg.model.path))
    evaluate = make_evaluate(cfg)
    trainer = TrajectoryTrainer(cfg, GuiTasks(cfg.gui.tasks, cfg.gui.num_train_seeds), run_dir=run_dir,
                                evaluate=evaluate, callbacks=callbacks, collect=collect_trajectories)
    envs = None
    try:
        trainer.setup()
        envs = build_envs(cfg)
        trainer.collector, trainer.eval_collector = build_collectors(cfg, trainer.pool, envs, renderer)
        if cfg.gui.eval_before_training and trainer.state.step == 0:
            trainer.logger.log(0, evaluate(trainer, 0))
        metrics = trainer.fit()
    finally:
        if envs is not None:
            envs.close()
        trainer.close()
    png = plot_run(trainer.run_dir)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())
                        if k in ("eval/success_rate", "eval/atp", "reward/total", "traj/success_rate"))
    print(f"\nRun finished: {trainer.run_dir}\n  {summary}\n  report: {png}")
    return trainer.run_dir


def evaluate_only(cfg: Config) -> dict[str, float]:
    """Success rate and ATP of `model.path` as it is (no learner; works for vision-language models too)."""
    from rl.trainer import init_ray
    from rollouts.pool import RolloutPool

    check_config(cfg, training=False)
    model_path = resolve_model_path(cfg.model.path)
    renderer = build_renderer(cfg, model_path)
    init_ray(cfg)
    pool = RolloutPool(model_path, model_cfg=cfg.model, rollout_cfg=cfg.rollout, cluster_cfg=cfg.cluster,
                       seed=cfg.run.seed)
    envs = None
    try:
        envs = build_envs(cfg)
        holder = argparse.Namespace(pool=pool, eval_collector=build_collectors(cfg, pool, envs, renderer)[1])
        return make_evaluate(cfg)(holder, 0)
    finally:
        if envs is not None:
            envs.close()
        pool.shutdown()


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.gui_agent", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="debug", help="Config name under recipes/gui_agent/ or a YAML path.")
    parser.add_argument("--eval-only", action="store_true", help="Only evaluate model.path (success rate, ATP).")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(resolve_config_path("gui_agent", args.config), args.overrides)
        if args.eval_only:
            for key, value in sorted(evaluate_only(cfg).items()):
                print(f"{key}: {value:.4f}")
        else:
            main(cfg)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    return 0
