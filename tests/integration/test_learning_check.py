"""Learning check on the embedded SmolLM2-135M (slow, ~1 h on 2 CPU cores): 30+ GRPO steps of the rec_reasoning
debug config raise the mean reward over its first-5-step mean. Writes the run (metrics, curves.png) under
`runs/learning-check` so the plot can be inspected and reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200)]  # ~30-60 min on 2 cores


def test_rec_reasoning_learns_on_embedded_model():
    from recipes.rec_reasoning.main import main as run_recipe

    cfg = load_config(ROOT / "recipes/rec_reasoning/debug.yaml",
                      ["run.num_steps=32", "run.save_every=4", "learner.gradient_checkpointing=true",
                       "run.name=learning-check", "run.resume=auto", f"run.output_dir={ROOT / 'runs'}"])
    run_dir = run_recipe(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = {r["step"]: r["reward/total"] for r in rows if "reward/total" in r}
    first = sum(rewards[s] for s in range(1, 6)) / 5
    last = sum(rewards[s] for s in range(28, 33)) / 5
    print(json.dumps({"first5_mean_reward": first, "last5_mean_reward": last, "plot": str(run_dir / "curves.png")}))
    assert last > first, (first, last)
