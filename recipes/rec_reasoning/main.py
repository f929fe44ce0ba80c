"""rec_reasoning: Reasoning-to-Rank style GRPO on MovieLens-100K.

For a user, the prompt lists the history (titles, years, genres, ratings, oldest first) and one candidate movie; the
model reasons briefly and ends with `Rating: N`. Rewards (debug.yaml): `format` (a parsable rating line) and
`ranking` in `rating` mode (1 − |predicted − held-out rating| / 4). Groups of G samples per (user, item) give
GRPO advantages. Evaluation: per held-out user, the last interaction is ranked among sampled unseen movies by the
greedy predicted rating: AUC, NDCG@10, and HR@K / NDCG@K for K in data.eval_k. The same evaluation runs on a saved
checkpoint with `recforge eval rec_reasoning --checkpoint runs/<name>/checkpoints/step_NNNNNN` (`build_evaluate`).

Local (CPU or one GPU, everything colocated):
    recforge run rec_reasoning --config debug [run.num_steps=30 ...]
    python -m recipes.rec_reasoning --config debug
On a Ray cluster (token authentication on; see cluster/README.md):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m recipes.rec_reasoning --config recipes/rec_reasoning/cluster.yaml cluster.address=auto

How it differs from Reasoning-to-Rank: the paper fine-tunes larger models on listwise and pointwise reasoning with
distilled rationales first; here the policy is trained with RL alone from the pointwise rating signal, on the embedded
135M model, so expect format learning and modest ranking gains rather than the paper's numbers.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

from recipes.common import fit_and_report, recipe_cli
from rl.config import Config, ConfigError
from rl.types import Sample

log = logging.getLogger(__name__)


class TrainPrompts:
    """The trainer's `PromptSource` over the task's training targets."""

    def __init__(self, task) -> None:
        self.task = task

    def __len__(self) -> int:
        return len(self.task)

    def sample(self, index: int) -> Sample:
        return self.task.train_sample(index)


def auc(scores: list[float], labels: list[int]) -> float:
    """Probability a positive outranks a negative (ties count half); nan without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ndcg_at_k(scores: list[float], labels: list[int], k: int = 10, *, seed: int = 0) -> float:
    """NDCG@k with binary relevance. Ties are broken by a seeded shuffle, never by candidate order (which would
    put the held-out positive first and reward a model that says the same thing for every candidate)."""
    rng = random.Random(seed)
    jitter = [rng.random() for _ in scores]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], jitter[i]))
    dcg = sum(labels[i] / math.log2(rank + 2) for rank, i in enumerate(order[:k]))
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(k, sum(labels))))
    return dcg / ideal if ideal else float("nan")


def make_evaluate(task, cfg: Config):
    from rewards.rules import parse_final_answer
    from rl.evaluation import hit_at_k, rank_candidates

    # Parse answers the way the training reward does (debug configs relax the answer grammar).
    pattern = next((spec.kwargs["pattern"] for spec in cfg.reward.rewards if "pattern" in spec.kwargs), None)
    eval_samples = task.eval_samples(num_users=cfg.data.num_eval_users, num_candidates=cfg.data.num_eval_candidates,
                                     seed=cfg.run.seed + 17)

    def evaluate(trainer, step: int) -> dict[str, float]:
        rollouts = trainer.pool.generate_greedy(eval_samples, max_new_tokens=cfg.rollout.max_new_tokens)
        by_user: dict[int, tuple[list[float], list[int]]] = {}
        parsed = 0
        for rollout in rollouts:
            answer = parse_final_answer(rollout.text, pattern) if pattern else parse_final_answer(rollout.text)
            rating = int(answer) if answer is not None else None
            parsed += rating is not None
            scores, labels = by_user.setdefault(rollout.sample.metadata["user_id"], ([], []))
            scores.append(float(rating) if rating is not None else 0.0)
            labels.append(int(rollout.sample.metadata["rating"] > 0))  # the held-out interaction is the positive
        aucs = [auc(s, y) for s, y in by_user.values()]
        ndcgs = [ndcg_at_k(s, y, 10, seed=user) for user, (s, y) in by_user.items()]
        out = {"eval/auc": _nanmean(aucs), "eval/ndcg@10": _nanmean(ndcgs),
               "eval/parsed_frac": parsed / max(len(rollouts), 1)}
        orders = {user: rank_candidates(s, seed=user) for user, (s, _) in by_user.items()}
        for k in cfg.data.eval_k:
            out[f"eval/hr@{k}"] = _nanmean([hit_at_k(orders[u], y, k) for u, (_, y) in by_user.items()])
            out[f"eval/ndcg@{k}"] = _nanmean([ndcg_at_k(s, y, k, seed=u) for u, (s, y) in by_user.items()])
        return out

    return evaluate


def _nanmean(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else float("nan")


def build_task(cfg: Config, model_path: str):
    from transformers import AutoTokenizer

    from rl import assets
    from rollouts.envs.rec import RecData, RecReasoningTask

    if cfg.data.dataset != "movielens-100k":
        raise ConfigError(f"data.dataset='{cfg.data.dataset}': rec_reasoning supports 'movielens-100k'.")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    data = RecData.load_movielens(assets.require("data"))
    return RecReasoningTask(data, render, history_len=cfg.data.history_len, max_train_users=cfg.data.max_train_users)


def build_evaluate(cfg: Config, model_path: str):
    """The recipe's evaluation (rl/evaluation.py protocol): `recforge eval rec_reasoning --checkpoint ...`."""
    return make_evaluate(build_task(cfg, model_path), cfg)


def main(cfg: Config, *, run_dir: Path | None = None, callbacks=()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, curves.png)."""
    from rl.trainer import Trainer, resolve_model_path

    task = build_task(cfg, resolve_model_path(cfg.model.path))
    trainer = Trainer(cfg, TrainPrompts(task), run_dir=run_dir, evaluate=make_evaluate(task, cfg), callbacks=callbacks)
    return fit_and_report(trainer)


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli("rec_reasoning", __doc__, main, argv)
