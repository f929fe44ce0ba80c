"""Fixtures shared by the recipe integration tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ctr_model_dir(tmp_path_factory) -> Path:
    """The prepared CTR artifact of the `ecpm` reward, or one trained here for one epoch on a clean machine."""
    from rl import assets

    default = assets.home() / "artifacts" / "ctr"
    if (default / "model.pt").is_file():
        return default
    out = tmp_path_factory.mktemp("ctr")
    cmd = [sys.executable, "-m", "rewards.train", "ctr", "--out", str(out), "--epochs", "1", "--threads", "1"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (2 CPUs, no dashboard); modules with their own `ray_local` override it."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def sid_recipe_config(recipe: str, model_dir: Path, ctr_model_dir: Path, *overrides: str):
    """A semantic-ID recipe's (sgrec_a2po, gpr_hepo) debug.yaml made small for a 2-step test on `model_dir`: 20
    train users, 4 eval users, 8 codes per SID level, 2 prompts per step, no checkpoints or evaluations in between,
    the `ecpm` reward (their first) on `ctr_model_dir`; `overrides` are applied after these."""
    from rl.config import load_config

    return load_config(ROOT / f"recipes/{recipe}/debug.yaml", [
        f"model.path={model_dir}", "data.history_len=3", "data.max_train_users=20", "data.num_eval_users=4",
        "data.sid_codes_per_level=8", "rollout.num_prompts_per_step=2", "rollout.kv_cache_gib=0.5",
        f"reward.rewards.0.kwargs.ctr_model={ctr_model_dir}", "learner.lr=1e-3", "logging.tensorboard=false",
        "logging.progress_bar=false", "run.num_steps=2", "run.save_every=0", "run.eval_every=0", *overrides,
    ])


def read_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    """A run's metrics.jsonl merged per step ({step: {metric: value}}; the train and eval rows of a step together)."""
    import json

    rows: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update(row)
    return rows
