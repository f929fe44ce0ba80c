"""`ecpm` and `negative_feedback` through the Ray reward service, with a CTR model trained here on MovieLens-100K."""

from __future__ import annotations

import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from rewards.local import LocalRewardScorer  # noqa: E402
from rewards.service import RewardService  # noqa: E402
from rl.assets import prepare  # noqa: E402
from rl.config import RewardConfig, RewardSpec  # noqa: E402
from rl.rollout_io import make_rollout  # noqa: E402
from rollouts.envs.rec import RecData  # noqa: E402


@pytest.fixture(scope="module")
def ctr_dir(tmp_path_factory):
    prepare("data")  # a clean machine: the training command reads the prepared MovieLens files
    out = tmp_path_factory.mktemp("ctr")
    cmd = [sys.executable, "-m", "rewards.train", "ctr", "--out", str(out), "--epochs", "1", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def future_negative_case():
    """A user, a time just before one of their ratings <= 2, that item, and two items they never rated."""
    data = RecData.load_movielens(prepare("data")["data"])
    for user, seq in data.by_user.items():
        for inter in seq:
            if inter.rating <= 2:
                seen = {x.item_id for x in seq}
                unseen = [i for i in sorted(data.items) if i not in seen][:2]
                return user, inter.timestamp - 60, inter.item_id, unseen
    raise AssertionError("MovieLens has no negative feedback?")


def test_ecpm_and_negative_feedback_through_the_service(ctr_dir):
    user, t0, negative_item, unseen = future_negative_case()
    items = [negative_item, *unseen]
    rollouts = [make_rollout(f"I recommend item {item}", sample_id="g0", index=i,
                             metadata={"user_id": user, "timestamp": t0, "candidate_item_id": item})
                for i, item in enumerate(items)]
    cfg = RewardConfig(rewards=[
        RewardSpec(name="ecpm", kwargs={"ctr_model": str(ctr_dir)}, timeout_s=300),
        RewardSpec(name="negative_feedback", weight=1.0, timeout_s=300),
    ])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        service = RewardService(cfg)
        try:
            report = service.score(rollouts)
        finally:
            service.shutdown()
    finally:
        ray.shutdown()
    assert [s.rollout.rollout_id for s in report.scored] == ["g0/0", "g0/1", "g0/2"]
    ecpm_scores = [s.results["ecpm"].score for s in report.scored]
    # min-max within the group: the best item scores 1, the worst 0, and raw eCPM = 1000 · bid · pCTR
    assert max(ecpm_scores) == pytest.approx(1.0) and min(ecpm_scores) == pytest.approx(0.0)
    for s in report.scored:
        comp = s.results["ecpm"].components
        assert comp["ecpm"] == pytest.approx(1000 * comp["bid"] * comp["pctr"])
    negative = [s.results["negative_feedback"] for s in report.scored]
    # the item the user rates <= 2 within the window is maximally similar to a future negative: penalty 1
    assert negative[0].components["penalty"] == pytest.approx(max(r.components["penalty"] for r in negative))
    assert negative[0].score <= min(r.score for r in negative[1:])
    # the service gives what the in-process scorer gives
    local = LocalRewardScorer(cfg).score(rollouts)
    for a, b in zip(report.scored, local.scored, strict=True):
        assert a.reward == pytest.approx(b.reward)
