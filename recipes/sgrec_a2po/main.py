"""sgrec_a2po: semantic-ID next-item generation on MovieLens-100K, business + semantic rewards fused by A2PO (S-GRec).

Items get semantic IDs by residual k-means over their MiniLM text embeddings (rollouts/sid.py; `data.sid_levels`
levels of `data.sid_codes_per_level` codes, or an index JSON of your own via `rollout.sid_index`); the index is saved
as `{run_dir}/sid_index.json` and read back when the run resumes. The SID tokens are added to the tokenizer and the
model's embeddings (`{run_dir}/sid_model`). The prompt lists the user's history as "<a_3><b_17><c_5> Title (Year)
[Genres]" and asks for the next movie's SID; generation is trie-constrained inside vLLM, so every completion is one
real item. Rewards (debug.yaml): `ecpm` (business value of the generated item, min-max within the group) and
`semantic_judge` (an LLM judge of profile fit, future interest, novelty and context, weighted by w(x)) on a sampled
fraction of rollouts. A2PO (`algorithm.advantage: a2po`, rl/advantages.py) standardises both within the group and
adds λ·A_sem to A_biz only where the signs agree, so the judge can sharpen but never overturn the business signal;
unjudged rollouts keep A_biz. The judge's weight in `reward.rewards` is 0: `reward/total` is the business reward.
Evaluation on held-out users' next (validation) item: greedy constrained generation, HR@1, and the share and
diversity of the generated items.

Local (CPU or one GPU, everything colocated):
    recforge run sgrec_a2po --config debug [run.num_steps=30 ...]
    python -m recipes.sgrec_a2po --config debug
On a Ray cluster (token authentication on; see cluster/README.md):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m recipes.sgrec_a2po --config recipes/sgrec_a2po/cluster.yaml cluster.address=auto

How it differs from S-GRec: the paper post-trains a generative recommender already fine-tuned on SIDs (RQ-VAE codes)
over an industrial log with real bids and a large judge; here the SIDs are training-free residual k-means codes,
the bids are SYNTHETIC (rewards/ecpm.py: MovieLens has no ads), pCTR is a small DeepFM trained on MovieLens, the judge
is the embedded 135M model (debug: uniform aspect weights w, a quarter of the rollouts judged), and RL starts from
freshly added SID embeddings without an SFT warm-start, so expect reward movement rather than the paper's HR gains.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import sys
from pathlib import Path

from rl.config import Config, ConfigError, load_config, resolve_config_path
from rl.types import Sample

log = logging.getLogger(__name__)
RECIPE = "sgrec_a2po"
INDEX_FILE = "sid_index.json"
MODEL_DIR = "sid_model"


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


def make_evaluate(task, cfg: Config):
    """Greedy constrained next-item generation for held-out users: HR@1, valid and distinct item shares."""
    samples = task.samples(limit=cfg.data.num_eval_users, seed=cfg.run.seed + 17)

    def evaluate(trainer, step: int) -> dict[str, float]:
        rollouts = trainer.pool.generate_greedy(samples, max_new_tokens=cfg.rollout.max_new_tokens)
        items = [task.form.index.parse(r.text) for r in rollouts]
        got = [found[0] if len(found) == 1 else None for found in items]
        hits = [item == r.sample.metadata["item_id"] for item, r in zip(got, rollouts, strict=True)]
        valid = [item for item in got if item is not None]
        return {"eval/hr@1": sum(hits) / len(hits), "eval/valid_sid_frac": len(valid) / len(got),
                "eval/distinct_items_frac": len(set(valid)) / max(len(valid), 1)}

    return evaluate


def main(cfg: Config, *, run_dir: Path | None = None, callbacks=()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, index, curves.png)."""
    from transformers import AutoTokenizer

    from rl import assets
    from rl.plots import plot_run
    from rl.trainer import Trainer, resolve_model_path
    from rollouts.envs.rec import NextItemTask, RecData, SIDItemForm, leave_last_out

    if cfg.data.dataset != "movielens-100k":
        raise ConfigError(f"data.dataset='{cfg.data.dataset}': {RECIPE} supports 'movielens-100k'.")
    run_dir = run_dir or Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = RecData.load_movielens(assets.require("data"))
    index, index_path = sid_index(cfg, data, run_dir)
    cfg = with_sid_paths(cfg, sid_model(resolve_model_path(cfg.model.path), index, run_dir, cfg.run.seed), index_path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    split = leave_last_out(data, min_history=cfg.data.history_len)
    form = SIDItemForm(index, data.items, with_title=True)
    train = NextItemTask(data, split, render, form=form, history_len=cfg.data.history_len, seed=cfg.run.seed)
    valid = NextItemTask(data, split, render, form=form, history_len=cfg.data.history_len, part="valid",
                         seed=cfg.run.seed)
    trainer = Trainer(cfg, TrainPrompts(train, cfg.data.max_train_users), run_dir=run_dir,
                      evaluate=make_evaluate(valid, cfg), callbacks=callbacks)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    png = plot_run(trainer.run_dir)
    summary = ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.startswith(("eval/", "reward/")))
    print(f"\nRun finished: {trainer.run_dir}\n  {summary}\n  report: {png}")
    return trainer.run_dir


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{RECIPE}", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="debug", help=f"Config name under recipes/{RECIPE}/ or a YAML path.")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(resolve_config_path(RECIPE, args.config), args.overrides)
    except ConfigError as err:
        print(f"ConfigError: {err}", file=sys.stderr)
        return 2
    random.seed(cfg.run.seed)
    main(cfg)
    return 0
