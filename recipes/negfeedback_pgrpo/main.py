"""negfeedback_pgrpo: predict the movie a user will give negative feedback to next, with Progressive GRPO.

On MovieLens-100K a rating <= 2 is negative feedback. The prompt shows the user's recent ratings and a list of
candidate movies (the next disliked one among others, rollouts/envs/negfeedback.py); the model answers
`Item: <id>`. Reward (debug.yaml): the multi-day `negative_feedback` reward with `direction: predict` — the largest
similarity of the predicted movie to what the user (or, weighted λ, their nearest neighbours) rates <= 2 in the
next D days, minus γ times its similarity to what the user rates >= 4 then — plus a small `format` term for a
parsable `Item:` line. Progressive GRPO (`curriculum.stages`, rl/curriculum.py): recent negatives → all negatives →
negatives + positives (hard candidates: the user's future likes), each stage with its own step budget and KL β.
Evaluation on held-out users' last negative: candidates ranked by how many of G sampled answers plus the greedy
answer name them; HR@K and NDCG@K of the true next negative, and FHR@K — here the hit rate of any negative the user
gives in the next D days (higher is better: this model predicts dislikes, unlike a recommender that avoids them).

Local (CPU or one GPU, everything colocated):
    recforge run negfeedback_pgrpo --config debug [run.num_steps=30 ...]
    python -m recipes.negfeedback_pgrpo --config debug
    recforge eval negfeedback_pgrpo --checkpoint runs/negfeedback_pgrpo-debug
On a Ray cluster (token authentication on; see cluster/README.md):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m recipes.negfeedback_pgrpo --config recipes/negfeedback_pgrpo/cluster.yaml cluster.address=auto

How it differs from the negative-feedback-modelling paper: the paper trains on an industrial short-video log of
explicit dislikes, skips and multi-day returns, with item semantic IDs and a warmed-up generative model; here the
negatives are MovieLens' low ratings, items are shown as titles with ids among a short candidate list, the similarity
is over genre vectors (or MiniLM item embeddings via the reward's `embeddings`), and MovieLens users often rate in
one session, so "multi-day" windows mostly hold the rest of that session. Users, not time, separate training from
evaluation. The 135M embedded model learns the answer format and little else; expect modest FHR@K gains.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recipes.common import fit_and_report, recipe_cli
from rl.config import Config, ConfigError
from rl.types import Rollout

log = logging.getLogger(__name__)
RECIPE = "negfeedback_pgrpo"


def build_task(cfg: Config, model_path: str):
    from transformers import AutoTokenizer

    from rl import assets
    from rollouts.envs.negfeedback import NegFeedbackTask
    from rollouts.envs.rec import RecData

    if cfg.data.dataset != "movielens-100k":
        raise ConfigError(f"data.dataset='{cfg.data.dataset}': {RECIPE} supports 'movielens-100k'.")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    data = RecData.load_movielens(assets.require("data"))
    return NegFeedbackTask(data, render, history_len=cfg.data.history_len,
                           num_candidates=cfg.data.num_train_candidates, recent_days=cfg.data.recent_days,
                           seed=cfg.run.seed, max_train_users=cfg.data.max_train_users)


def window_days(cfg: Config) -> float:
    """D of the `negative_feedback` reward (its `days` kwarg), so FHR@K uses the window the policy was trained on."""
    specs = [spec for spec in cfg.reward.rewards if spec.name == "negative_feedback"]
    return float(specs[0].kwargs.get("days", 7.0)) if specs else 7.0


def future_negatives(task, user, t0: float, days: float) -> set[int]:
    from rollouts.envs.negfeedback import NEGATIVE_MAX_RATING, SECONDS_PER_DAY

    end = t0 + days * SECONDS_PER_DAY
    return {x.item_id for x in task.data.by_user[user] if t0 < x.timestamp <= end and x.rating <= NEGATIVE_MAX_RATING}


def vote_scores(candidates: list[int], answers: list[Rollout]) -> list[float]:
    """How many answers name each candidate (`Item: <id>`)."""
    from rewards.rules import parse_final_answer
    from rollouts.envs.negfeedback import ANSWER_PATTERN

    named = [parse_final_answer(r.text, ANSWER_PATTERN) for r in answers]
    return [float(sum(1 for n in named if n is not None and int(n) == c)) for c in candidates]


def make_evaluate(task, cfg: Config):
    from rewards.rules import parse_final_answer
    from rl.evaluation import hit_at_k, mean, ndcg_at_k, rank_candidates
    from rollouts.envs.negfeedback import ANSWER_PATTERN

    samples = task.eval_samples(num_users=cfg.data.num_eval_users, seed=cfg.run.seed + 17)
    days = window_days(cfg)

    def evaluate(policy, step: int) -> dict[str, float]:
        greedy = policy.pool.generate_greedy(samples, max_new_tokens=cfg.rollout.max_new_tokens)
        sampled = policy.pool.generate(samples, policy_version=policy.pool.policy_version, seed=cfg.run.seed + 17)
        group = cfg.rollout.num_samples_per_prompt
        out: dict[str, list[float]] = {}
        for n, sample in enumerate(samples):
            meta = sample.metadata
            cands = meta["candidates"]
            scores = vote_scores(cands, [greedy[n], *sampled[n * group:(n + 1) * group]])
            order = rank_candidates(scores, seed=n)
            hits = [int(c == meta["item_id"]) for c in cands]
            negatives = future_negatives(task, meta["user_id"], meta["timestamp"], days)
            future = [int(c in negatives) for c in cands]
            for k in cfg.data.eval_k:
                out.setdefault(f"eval/hr@{k}", []).append(hit_at_k(order, hits, k))
                out.setdefault(f"eval/ndcg@{k}", []).append(ndcg_at_k(order, hits, k))
                out.setdefault(f"eval/fhr@{k}", []).append(hit_at_k(order, future, k))
            out.setdefault("eval/parsed_frac", []).append(
                float(parse_final_answer(greedy[n].text, ANSWER_PATTERN) is not None))
        return {key: mean(values) for key, values in out.items()}

    return evaluate


def build_evaluate(cfg: Config, model_path: str):
    """The recipe's evaluation (rl/evaluation.py protocol): `recforge eval negfeedback_pgrpo --checkpoint ...`."""
    return make_evaluate(build_task(cfg, model_path), cfg)


def main(cfg: Config, *, run_dir: Path | None = None, callbacks=()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, curves.png)."""
    from rl.trainer import Trainer, resolve_model_path

    if not cfg.curriculum.stages:
        raise ConfigError(f"{RECIPE} trains with a progressive curriculum: set curriculum.stages (see debug.yaml).")
    task = build_task(cfg, resolve_model_path(cfg.model.path))
    sources = {stage.data_filter or stage.name: task.source(stage.data_filter or stage.name)
               for stage in cfg.curriculum.stages}
    trainer = Trainer(cfg, sources, run_dir=run_dir, evaluate=make_evaluate(task, cfg), callbacks=callbacks)
    return fit_and_report(trainer)


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, __doc__, main, argv)
