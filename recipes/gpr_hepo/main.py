"""gpr_hepo: semantic-ID next-item generation on MovieLens-100K trained with HEPO (GPR's per-level policy optimisation).

Same generation setup as sgrec_a2po (whose helpers it reuses): items get semantic IDs by residual k-means over their
MiniLM text embeddings (saved as `{run_dir}/sid_index.json`, read back on resume, or `rollout.sid_index`), the SID
tokens are added to the model (`{run_dir}/sid_model`), the prompt lists the user's history as "<a_3><b_17><c_5>
Title (Year) [Genres]", and vLLM's trie-constrained decoding makes every completion one real item. Each request gets
K = `rollout.num_samples_per_prompt` candidates (the rollout group).

HEPO (`algorithm.advantage: hepo`; rl/hepo.py, rl/advantages.py, rl/value_head.py) treats the L code tokens of a SID
as L actions. Level l < L earns the process reward r_l = α_l·max(0, P_l(z_l) − mean_{t legal} P_l(t)), where P_l is
the popularity of level-l codes among the user's positive items (earlier interactions rated >= 4) and "legal" is what
the trie allowed after the chosen prefix; the last level earns the business value r_L = `ecpm` of the generated item
(min-max within the request). A value head on the policy's final hidden states gives V(s_l); advantages are
GAE(γ, λ) for l < L and the z-score of r_L over the request's K candidates at l = L; the loss is the clipped policy
loss per level weighted c_l plus the value loss. Optional SFT warm-start first (`sft.num_steps`, rl/sft.py: history
→ next SID plus title ↔ SID pairs), as in sgrec_a2po. Evaluation on held-out users' next (validation) item, shared
with sgrec_a2po: HR@K/NDCG@K over the catalogue (trie-constrained beam search in the vLLM workers), the share of valid
and of distinct greedy items, and the raw eCPM of greedy and sampled items.

Local (CPU or one GPU, everything colocated):
    recforge run gpr_hepo --config debug [run.num_steps=30 ...]
    python -m recipes.gpr_hepo --config debug
On a Ray cluster (token authentication on; see cluster/README.md):
    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m recipes.gpr_hepo --config recipes/gpr_hepo/cluster.yaml cluster.address=auto
Evaluate a checkpoint (its saved config names the SID model and index):
    recforge eval gpr_hepo --checkpoint runs/gpr_hepo-debug

How it differs from GPR: the paper's one-model advertising recommender is pre-trained (then fine-tuned) on
industrial logs with semantic IDs from a learned multimodal tokenizer, and HEPO's last-level value is the platform's
real business value. Here the SIDs are training-free residual k-means codes of MiniLM text embeddings (colliding
items get an extra level, so usually L = data.sid_levels + 1), the bids are SYNTHETIC (rewards/ecpm.py: MovieLens
has no ads) with a small DeepFM pCTR, the positives are MovieLens ratings >= 4, and RL starts from freshly added SID
embeddings on the embedded 135M model (after a short SFT warm-start at most) without the paper's pre-training
stages, so expect reward movement rather than the paper's gains.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from recipes.common import fit_and_report, recipe_cli
from recipes.sgrec_a2po.main import (
    TrainPrompts,
    build_tasks,
    make_evaluate,
    sft_warm_start,
    sid_index,
    sid_model,
    with_sid_paths,
)
from recipes.sgrec_a2po.main import build_evaluate as build_sid_evaluate
from rl.config import Config, ConfigError
from rl.types import Sample

log = logging.getLogger(__name__)
RECIPE = "gpr_hepo"
POSITIVE_RATING = 4
"""A user's positive items (for code popularity) are their earlier interactions rated at least this."""
POSITIVES_KEY = "positive_items"


class HepoPrompts:
    """The trainer's `PromptSource`: sgrec_a2po's `TrainPrompts`, each sample also listing the user's positive items
    before the target (`positive_items`: earlier interactions rated >= POSITIVE_RATING)."""

    def __init__(self, task, max_users: int) -> None:
        self.task = task
        self.prompts = TrainPrompts(task, max_users)

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, index: int) -> Sample:
        sample = self.prompts.sample(index)
        user, pos = self.task.targets[self.prompts.positions[index]]
        positives = [x.item_id for x in self.task.data.by_user[user][:pos] if x.rating >= POSITIVE_RATING]
        return dataclasses.replace(sample, metadata={**sample.metadata, POSITIVES_KEY: positives})


def check_config(cfg: Config) -> None:
    """Recipe-level checks the generic config validation cannot make."""
    if cfg.data.dataset != "movielens-100k":
        raise ConfigError(f"data.dataset='{cfg.data.dataset}': {RECIPE} supports 'movielens-100k'.")
    if cfg.algorithm.advantage != "hepo":
        raise ConfigError(f"algorithm.advantage='{cfg.algorithm.advantage}': {RECIPE} is the HEPO recipe; set "
                          "algorithm.advantage=hepo (or run sgrec_a2po for A2PO, rec_reasoning for GRPO).")


def build_evaluate(cfg: Config, model_path: str):
    """The recipe's evaluation (rl/evaluation.py protocol): `recforge eval gpr_hepo --checkpoint RUN_DIR` (the
    checkpoint's own config names the run's SID index and model). Same metrics as sgrec_a2po's."""
    check_config(cfg)
    return build_sid_evaluate(cfg, model_path)


def level_coder(cfg: Config, model_path: str):
    """HEPO's reader of generated SIDs (rollouts/sid_levels.py) over the run's index and the SID model's tokens."""
    from transformers import AutoTokenizer

    from rollouts.sid import SIDIndex
    from rollouts.sid_levels import SIDLevelCoder

    index = SIDIndex.load(cfg.rollout.sid_index)
    coder = SIDLevelCoder(index, AutoTokenizer.from_pretrained(model_path).get_vocab(), positives_key=POSITIVES_KEY)
    log.info("HEPO over %d semantic-ID levels (%d codes at most per level)", coder.num_levels, coder.num_codes)
    return coder


def main(cfg: Config, *, run_dir: Path | None = None, callbacks=()) -> Path:
    """Train with `cfg`; returns the run directory (config, metrics, rollouts, checkpoints, index, curves.png)."""
    from rl import assets
    from rl.trainer import Trainer, resolve_model_path
    from rollouts.envs.rec import RecData

    check_config(cfg)
    run_dir = run_dir or Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = RecData.load_movielens(assets.require("data"))
    index, index_path = sid_index(cfg, data, run_dir)
    model_path = sid_model(resolve_model_path(cfg.model.path), index, run_dir, cfg.run.seed)
    render, train, valid = build_tasks(cfg, data, index, model_path)
    prompts = HepoPrompts(train, cfg.data.max_train_users)
    cfg = with_sid_paths(cfg, sft_warm_start(cfg, model_path, prompts, data, index, render, run_dir), index_path)
    trainer = Trainer(cfg, prompts, run_dir=run_dir, evaluate=make_evaluate(valid, cfg), callbacks=callbacks,
                      level_coder=level_coder(cfg, cfg.model.path))
    return fit_and_report(trainer, summary_prefixes=("eval/", "reward/"))


def cli(argv: list[str] | None = None) -> int:
    return recipe_cli(RECIPE, __doc__, main, argv)
