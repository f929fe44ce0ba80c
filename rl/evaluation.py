"""Evaluating a recipe's policy outside training: `recforge eval <recipe> --checkpoint DIR`.

The protocol. A recipe that can be evaluated exposes, in its `main.py`,

    def build_evaluate(cfg: Config, model_path: str) -> Evaluate

where `Evaluate(policy, step) -> {"eval/<metric>": value}` and `policy` is anything with a `.pool` (a
`rollouts.pool.RolloutPool` holding the weights to evaluate). During training the recipe passes the same function
to the Trainer (which is such a policy); `run_eval` builds a rollout pool on the config's base model, loads the
checkpoint's weights into it (the learner state consolidated by `rl.learner.export_checkpoint_weights`, then the
rollout workers' `reload_weights`, as in a training step's weight sync) and calls it once.

Shared ranking metrics over one request's candidates (binary relevance, seeded tie-breaking so candidate order
never decides a tie): `rank_candidates`, `hit_at_k`, `ndcg_at_k`, `auc`, and `mean` that skips NaN.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rl.config import Config, ConfigError

log = logging.getLogger(__name__)


class EvalPolicy(Protocol):
    """What an evaluation function needs: the rollout pool holding the policy's current weights."""

    pool: Any


Evaluate = Callable[[EvalPolicy, int], dict[str, float]]


class EvalRecipe(Protocol):
    """A recipe module that `recforge eval` can evaluate."""

    def build_evaluate(self, cfg: Config, model_path: str) -> Evaluate: ...


# -- ranking metrics --------------------------------------------------------------------------------------------


def rank_candidates(scores: Sequence[float], *, seed: int) -> list[int]:
    """Candidate indices by descending score; ties broken by a seeded shuffle (never by candidate order, which
    would favour wherever the positive was put)."""
    rng = random.Random(seed)
    jitter = [rng.random() for _ in scores]
    return sorted(range(len(scores)), key=lambda i: (-scores[i], jitter[i]))


def hit_at_k(order: Sequence[int], labels: Sequence[int], k: int) -> float:
    """1.0 if any relevant candidate is among the first k of `order` (HR@K; FHR@K with future negatives as
    relevant), else 0.0."""
    return 1.0 if any(labels[i] for i in order[:k]) else 0.0


def ndcg_at_k(order: Sequence[int], labels: Sequence[int], k: int) -> float:
    """NDCG@k of `order` with binary relevance `labels`; nan when nothing is relevant."""
    dcg = sum(labels[i] / math.log2(rank + 2) for rank, i in enumerate(order[:k]))
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(k, sum(1 for y in labels if y))))
    return dcg / ideal if ideal else float("nan")


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability a relevant candidate outscores an irrelevant one (ties count half); nan without both."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def mean(values: Sequence[float]) -> float:
    """Mean over the finite values; nan when there are none."""
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else float("nan")


# -- running an evaluation --------------------------------------------------------------------------------------


@dataclass
class PoolPolicy:
    """An `EvalPolicy` that is just a rollout pool."""

    pool: Any


def load_recipe(recipe: str) -> EvalRecipe:
    module = importlib.import_module(f"recipes.{recipe}.main")
    if not callable(getattr(module, "build_evaluate", None)):
        raise ConfigError(f"Recipe '{recipe}' has no evaluation: its main.py defines no build_evaluate(cfg, "
                          "model_path) (see rl/evaluation.py for the protocol).")
    return module  # type: ignore[return-value]


def checkpoint_step(checkpoint: Path) -> int:
    from rl import checkpoint as ckpt

    return ckpt.load_trainer_state(checkpoint).step


def run_eval(recipe: str, cfg: Config, checkpoint: Path | None) -> dict[str, float]:
    """Evaluate `recipe` with `cfg` on the checkpoint's weights (None = the base model `cfg.model.path`)."""
    from rl import checkpoint as ckpt
    from rl.trainer import init_ray, resolve_model_path
    from rollouts.pool import RolloutPool

    evaluate_module = load_recipe(recipe)
    step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    model_path = resolve_model_path(cfg.model.path)
    evaluate = evaluate_module.build_evaluate(cfg, model_path)
    init_ray(cfg)
    pool = RolloutPool(model_path, model_cfg=cfg.model, rollout_cfg=cfg.rollout, cluster_cfg=cfg.cluster,
                       seed=cfg.run.seed, restart_timeout_s=cfg.cluster.restart_timeout_s)
    try:
        metrics: dict[str, float] = {"eval/step": float(step)}
        if checkpoint is not None:
            with tempfile.TemporaryDirectory(prefix="recforge-eval-") as weights_dir:
                _load_weights(checkpoint, weights_dir, pool, ckpt.LEARNER_TAG)
                metrics.update(evaluate(PoolPolicy(pool), step))
        else:
            metrics.update(evaluate(PoolPolicy(pool), step))
    finally:
        pool.shutdown()
    return metrics


def _load_weights(checkpoint: Path, weights_dir: str, pool: Any, tag: str) -> None:
    from rl.learner import export_checkpoint_weights

    exported = export_checkpoint_weights(str(checkpoint), tag, weights_dir)
    pool.sync(weights_dir, 1)
    log.info("evaluating %s (%d tensors loaded into the rollout workers)", checkpoint,
             int(exported["weights/num_tensors"]))


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    from rl import checkpoint as ckpt

    given = Path(path).expanduser()
    if (given / ckpt.COMPLETE).is_file():
        return given
    latest = ckpt.latest_checkpoint(given)
    if latest is not None:
        return latest
    raise ConfigError(f"--checkpoint {path} is neither a complete checkpoint (a directory with {ckpt.COMPLETE}, "
                      "e.g. runs/<name>/checkpoints/step_000004) nor a run directory that holds one.")


def write_report(metrics: dict[str, float], path: Path, *, recipe: str, checkpoint: Path | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"recipe": recipe, "checkpoint": str(checkpoint) if checkpoint else None, "metrics": metrics}
    path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")


def print_table(metrics: dict[str, float], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        if key.startswith("eval/") and key != "eval/step":
            table.add_row(key.removeprefix("eval/"), f"{metrics[key]:.4f}")
    Console(width=100).print(table)
