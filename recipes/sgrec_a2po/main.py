"""sgrec_a2po: semantic-ID next-item generation on MovieLens-100K, business + semantic rewards fused by A2PO (S-GRec).

Items get semantic IDs by residual k-means over their MiniLM text embeddings (rollouts/sid.py; `data.sid_levels`
levels of `data.sid_codes_per_level` codes, or an index JSON of your own via `rollout.sid_index`); the index is saved
as `{run_dir}/sid_index.json` and read back when the run resumes. The SID tokens are added to the tokenizer and the
model's embeddings (`{run_dir}/sid_model`). With `sft.num_steps > 0` (debug.yaml) a supervised warm-start (rl/sft.py,
cached in `{run_dir}/sft_model`) then teaches the new tokens: user history -> the next item's SID on the training
targets, mixed with item title <-> SID alignment pairs (`sft.alignment_fraction`); RL and its KL reference start from
that model. The prompt lists the user's history as "<a_3><b_17><c_5> Title (Year)
[Genres]" and asks for the next movie's SID; generation is trie-constrained inside vLLM, so every completion is one
real item. Rewards (debug.yaml): `ecpm` (business value of the generated item, min-max within the group) and
`semantic_judge` (an LLM judge of profile fit, future interest, novelty and context, weighted by w(x)) on a sampled
fraction of rollouts. A2PO (`algorithm.advantage: a2po`, rl/advantages.py) standardises both within the group and
adds λ·A_sem to A_biz only where the signs agree, so the judge can sharpen but never overturn the business signal;
unjudged rollouts keep A_biz. The judge's weight in `reward.rewards` is 0: `reward/total` is the business reward.
Evaluation on held-out users' next (validation) item over the whole catalogue: trie-constrained beam search with
max(K) beams inside the vLLM workers (as TIGER ranks items) gives HR@K and NDCG@K for `data.eval_k`; the greedy
constrained SID gives the share of valid SIDs and of distinct items; and the mean raw eCPM of the greedy item and of
2·max(K) items sampled at rollout.temperature per user is the business value the `ecpm` reward optimises.

Local (CPU or one GPU, everything colocated):
    recforge run sgrec_a2po --config debug [run.num_steps=30 ...]
    python -m recipes.sgrec_a2po --config debug
    recforge eval sgrec_a2po --checkpoint runs/sgrec_a2po-debug      # uses the run's index and SID model
    recforge eval sgrec_a2po --config runs/sgrec_a2po-debug/config.yaml  # the starting (SFT) model, for comparison
On a Ray cluster (token authentication on; see cluster/README.md):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m recipes.sgrec_a2po --config recipes/sgrec_a2po/cluster.yaml cluster.address=auto

How it differs from S-GRec: the paper post-trains a generative recommender already fine-tuned on SIDs (RQ-VAE codes)
over an industrial log with real bids and a large judge; here the SIDs are training-free residual k-means codes,
the bids are SYNTHETIC (rewards/ecpm.py: MovieLens has no ads), pCTR is a small DeepFM trained on MovieLens, the judge
is the embedded 135M model (debug: uniform aspect weights w, a quarter of the rollouts judged), and the SFT
warm-start is a short one on 2 CPU cores, so expect modest HR@K rather than the paper's gains.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from recipes.common import fit_and_report, recipe_cli
from rl.config import Config, ConfigError
from rl.types import Sample

log = logging.getLogger(__name__)
RECIPE = "sgrec_a2po"
INDEX_FILE = "sid_index.json"
MODEL_DIR = "sid_model"
SFT_DIR = "sft_model"


class TrainPrompts:
    """The trainer's `PromptSource`: next-item targets of the training split (of the first `max_users` users)."""

    def __init__(self, task, max_users: int) -> None:
        self.task = task
        users = sorted({user for user, _ in task.targets})
        keep = set(users[:max_users] if max_users else users)
        self.positions = [i for i, (user, _) in enumerate(task.targets) if user in keep]

    def __len__(self) -> int:
        return len(self.positions)

    def sample(self, index: int) -> Sample:
        return self.task.sample(self.positions[index])


def sid_index(cfg: Config, data, run_dir: Path):
    """The run's index: `rollout.sid_index` if given, else the one this run saved before, else a new one (saved)."""
    from rollouts.embed import movielens_item_embeddings
    from rollouts.sid import SIDIndex, build_sid_index

    saved = run_dir / INDEX_FILE
    if cfg.rollout.sid_index is not None:
        index = SIDIndex.load(cfg.rollout.sid_index)
    elif saved.is_file():
        index = SIDIndex.load(saved)
        log.info("Read the run's semantic-ID index back from %s (%d items).", saved, len(index))
    else:
        item_ids, emb = movielens_item_embeddings()  # cached under $RECFORGE_HOME/embeddings after the first run
        index, metrics = build_sid_index(item_ids, emb, num_levels=cfg.data.sid_levels,
                                         codes_per_level=cfg.data.sid_codes_per_level, seed=cfg.run.seed)
        log.info("Built a semantic-ID index: %s", ", ".join(f"{k}={v:.3g}" for k, v in sorted(metrics.items())))
    missing = [item for item in data.items if item not in index]
    if missing:
        raise ConfigError(f"The semantic-ID index lacks {len(missing)} catalogue items (first: {missing[:5]}); "
                          "every item a prompt may show needs a SID.")
    index.save(saved)
    return index, saved


def sid_model(base_path: str, index, run_dir: Path, seed: int) -> str:
    """`base_path` when its tokenizer already holds every SID token, else a copy with them added (built once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollouts.sid import add_sid_tokens

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if all(token in tokenizer.get_vocab() for token in index.tokens()):
        return base_path
    out = run_dir / MODEL_DIR
    if (out / "config.json").is_file():
        return str(out)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    torch.manual_seed(seed)  # the new rows are drawn around the mean of the old ones
    add_sid_tokens(tokenizer, index, model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("Added %d SID tokens to %s -> %s", len(index.tokens()), base_path, out)
    return str(out)


def with_sid_paths(cfg: Config, model_path: str, index_path: Path) -> Config:
    """The config the trainer runs: the SID model, the constrained rollouts, and the index for `sid` item parsers."""
    specs = [dataclasses.replace(spec, kwargs={**spec.kwargs, "sid_index": str(index_path)})
             if spec.kwargs.get("item_parser") == "sid" and "sid_index" not in spec.kwargs else spec
             for spec in cfg.reward.rewards]
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=model_path),
        rollout=dataclasses.replace(cfg.rollout, sid_index=str(index_path)),
        reward=dataclasses.replace(cfg.reward, rewards=specs))


def build_tasks(cfg: Config, data, index, model_path: str):
    """(render, train task, validation task): next-item prompts in SID form (with titles), leave-last-out split."""
    from transformers import AutoTokenizer

    from rollouts.envs.rec import NextItemTask, SIDItemForm, leave_last_out

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    split = leave_last_out(data, min_history=cfg.data.history_len)
    form = SIDItemForm(index, data.items, with_title=True)
    train = NextItemTask(data, split, render, form=form, history_len=cfg.data.history_len, seed=cfg.run.seed)
    valid = NextItemTask(data, split, render, form=form, history_len=cfg.data.history_len, part="valid",
                         seed=cfg.run.seed)
    return render, train, valid


def sft_warm_start(cfg: Config, model_path: str, prompts: TrainPrompts, data, index, render, run_dir: Path) -> str:
    """The SFT warm-start model (rl/sft.py; built once in {run_dir}/sft_model), or `model_path` when sft is off."""
    from rl.sft import LazyExamples, SFTExample, warm_start
    from rollouts.envs.rec import sid_alignment_pairs

    if cfg.sft.num_steps == 0:
        return model_path

    def next_item(i: int) -> SFTExample:
        sample = prompts.sample(i)
        return SFTExample(prompt=sample.prompt, target=sample.metadata["answer"])

    pairs = sid_alignment_pairs(index, data.items)
    sources = {"next_item": LazyExamples(len(prompts), next_item),
               "alignment": LazyExamples(len(pairs), lambda i: SFTExample(render(pairs[i][0]), pairs[i][1]))}
    weights = {"next_item": 1.0 - cfg.sft.alignment_fraction, "alignment": cfg.sft.alignment_fraction}
    result = warm_start(model_path, sources, weights, run_dir / SFT_DIR, cfg=cfg.sft, seed=cfg.run.seed,
                        progress=cfg.logging.progress_bar)
    return result.model_path


def eval_copies(samples: list[Sample], *, max_k: int, group: int) -> list[Sample]:
    """The sampled part's requests (for `eval/ecpm_sampled`): enough copies of every sample ("{id}#{r}") for
    2·max(K) completions each at G per request (none when max(K) = 1)."""
    repeats = math.ceil(2 * max_k / group) if max_k > 1 else 0
    return [dataclasses.replace(s, sample_id=f"{s.sample_id}#{r}") for r in range(repeats) for s in samples]


def ranking_metrics(targets: list, ranked: list[list], greedy: list, *, eval_k: list[int]) -> dict[str, float]:
    """HR@K and NDCG@K of each user's target in its ranked item list (`ranked[i]`, best first: the beam search's
    items), and the shares of valid and of distinct greedy items (`greedy[i]` None: user i's greedy completion
    named no item)."""
    ranks = [items.index(target) if target in items else None for target, items in zip(targets, ranked, strict=True)]
    out: dict[str, float] = {}
    for k in eval_k:
        out[f"eval/hr@{k}"] = sum(r is not None and r < k for r in ranks) / len(ranks)
        out[f"eval/ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks)
    valid = [item for item in greedy if item is not None]
    out.update({"eval/valid_sid_frac": len(valid) / len(greedy),
                "eval/distinct_items_frac": len(set(valid)) / max(len(valid), 1)})
    return out


def make_evaluate(task, cfg: Config):
    """HR@K and NDCG@K of held-out users' next item over the catalogue by beam search (see the module docstring),
    valid and distinct greedy-item shares. With an `ecpm` reward in the config, also the business value the RL reward
    optimises, as raw eCPM: `eval/ecpm` of the greedy items, `eval/ecpm_sampled` of the sampled ones."""
    samples = task.samples(limit=cfg.data.num_eval_users, seed=cfg.run.seed + 17)
    group = cfg.rollout.num_samples_per_prompt
    copies = eval_copies(samples, max_k=max(cfg.data.eval_k), group=group)
    parse = lambda text: (lambda found: found[0] if len(found) == 1 else None)(task.form.index.parse(text))
    value = business_value(cfg)

    def evaluate(policy, step: int) -> dict[str, float]:
        greedy_rollouts = policy.pool.generate_greedy(samples, max_new_tokens=cfg.rollout.max_new_tokens)
        beams = policy.pool.beam_search_sids(samples, num_beams=max(cfg.data.eval_k))
        ranked = [[parse(beam.text) for beam in hits] for hits in beams]
        out = ranking_metrics([s.metadata["item_id"] for s in samples], ranked,
                              [parse(r.text) for r in greedy_rollouts], eval_k=cfg.data.eval_k)
        rollouts = []
        if copies:
            rollouts = policy.pool.generate(copies, policy_version=policy.pool.policy_version, seed=cfg.run.seed + 17)
        if value is not None:
            out["eval/ecpm"] = _mean(value(greedy_rollouts))
            if rollouts:
                out["eval/ecpm_sampled"] = _mean(value(rollouts))
        return out

    return evaluate


def business_value(cfg: Config):
    """Raw eCPM (1000 · bid · pCTR, not normalised; 0 for no item) of each rollout's item, with the settings of the
    config's `ecpm` reward (its CTR model, bids, SID index); None when the config has no `ecpm` reward."""
    spec = next((spec for spec in cfg.reward.rewards if spec.name == "ecpm"), None)
    if spec is None:
        return None
    from rewards.ecpm import ecpm_reward

    kwargs = {**spec.kwargs, "normalize": "none"}
    return lambda rollouts: [r.components["ecpm"] for r in ecpm_reward(rollouts, **kwargs)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def build_evaluate(cfg: Config, model_path: str):
    """The recipe's evaluation (rl/evaluation.py protocol): `recforge eval sgrec_a2po --checkpoint RUN_DIR`.

    Needs the run's index and SID-extended model, which the checkpoint's own config names (rollout.sid_index and
    model.path, set by `main`); the checkpoint's weights then load into that model with the same vocabulary size.
    """
    from transformers import AutoTokenizer

    from rl import assets
    from rollouts.envs.rec import RecData
    from rollouts.sid import SIDIndex

    if cfg.rollout.sid_index is None:
        raise ConfigError(f"{RECIPE} evaluation needs the run's semantic-ID index: evaluate a run's checkpoint with "
                          "its own config (omit --config), or set rollout.sid_index=<run>/sid_index.json and "
                          "model.path=<run>/sft_model (or <run>/sid_model).")
    index = SIDIndex.load(cfg.rollout.sid_index)
    vocab = AutoTokenizer.from_pretrained(model_path).get_vocab()
    missing = [token for token in index.tokens() if token not in vocab]
    if missing:
        raise ConfigError(f"model.path={model_path} lacks {len(missing)} SID tokens of {cfg.rollout.sid_index} "
                          f"(first: {missing[:3]}): point model.path at the run's {SFT_DIR} or {MODEL_DIR}.")
    data = RecData.load_movielens(assets.require("data"))
    _, _, valid = build_tasks(cfg, data, index, model_path)
    return make_evaluate(valid, cfg)


def main(cfg: Config, *, run_dir: Path | None = None, callbacks=()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, index, curves.png)."""
    from rl import assets
    from rl.trainer import Trainer, resolve_model_path
    from rollouts.envs.rec import RecData

    if cfg.data.dataset != "movielens-100k":
        raise ConfigError(f"data.dataset='{cfg.data.dataset}': {RECIPE} supports 'movielens-100k'.")
    run_dir = run_dir or Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = RecData.load_movielens(assets.require("data"))
    index, index_path = sid_index(cfg, data, run_dir)
    model_path = sid_model(resolve_model_path(cfg.model.path), index, run_dir, cfg.run.seed)
    render, train, valid = build_tasks(cfg, data, index, model_path)
    prompts = TrainPrompts(train, cfg.data.max_train_users)
    cfg = with_sid_paths(cfg, sft_warm_start(cfg, model_path, prompts, data, index, render, run_dir), index_path)
    trainer = Trainer(cfg, prompts, run_dir=run_dir, evaluate=make_evaluate(valid, cfg), callbacks=callbacks)
    return fit_and_report(trainer, summary_prefixes=("eval/", "reward/"))


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, __doc__, main, argv)
