"""The no-Ray scorer and the logic it shares with the service: result checks, timeouts, retries, micro-batches,
failure policies, combiners and metrics."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from rewards.api import RewardError, TransientRewardError
from rewards.local import (
    LocalRewardScorer,
    RewardRunner,
    check_results,
    constrained,
    make_batches,
    weighted_sum,
)
from rl.config import ConfigError, RewardConfig, RewardSpec
from rl.rollout_io import make_rollout
from rl.types import RewardResult

M = __name__


def ones(rollouts):
    return [RewardResult(score=1.0, components={"c": 0.5}) for _ in rollouts]


def bad_when_flagged(rollouts):
    """NaN on rollouts whose metadata has bad=True."""
    return [math.nan if r.sample.metadata.get("bad") else 2.0 for r in rollouts]


def raises(rollouts):
    raise RuntimeError("judge returned HTTP 500")


def sleeps(rollouts, *, sleep_s=10.0):
    time.sleep(sleep_s)
    return [1.0 for _ in rollouts]


async def async_half(rollouts):
    await asyncio.sleep(0.01)
    return [0.5 for _ in rollouts]


FLAKY_CALLS = []


def flaky(rollouts, *, failures=1):
    FLAKY_CALLS.append(len(rollouts))
    if len(FLAKY_CALLS) <= failures:
        raise TransientRewardError("endpoint restarting")
    return [1.0 for _ in rollouts]


def _rollouts(num_groups=3, size=2, bad=()):
    return [make_rollout(f"text {g} {i}\nRating: 4", sample_id=f"g{g}", index=i,
                         metadata={"bad": f"g{g}/{i}" in bad, "rating": 4})
            for g in range(num_groups) for i in range(size)]


def _scorer(*specs, combiner="weighted_sum"):
    return LocalRewardScorer(RewardConfig(rewards=list(specs), combiner=combiner))


@pytest.mark.parametrize(("value", "cause"), [
    ([1.0], "returned 1 results for a batch of 2 rollouts"),
    ({"a": 1.0}, "returned a dict instead of a list of RewardResult"),
    (None, "returned a NoneType instead of a list"),
    (["1.0", 1.0], "returned a str ('1.0') instead of a RewardResult or a number"),
    ([True, 1.0], "returned a bool"),
    ([math.inf, 1.0], "non-finite score (inf)"),
    ([RewardResult(score=1.0, components={"x": math.nan}), 1.0], "non-finite component 'x' (nan)"),
    ([RewardResult(score=1.0, components={"x": "high"}), 1.0], "component 'x' of type str"),
])
def test_check_results_names_what_is_wrong(value, cause):
    results, errors = check_results(value, 2)
    assert results[0] is None and cause in errors[0]


def test_check_results_accepts_numbers_and_results():
    results, errors = check_results([1, RewardResult(score=0.5)], 2)
    assert results == [RewardResult(score=1.0), RewardResult(score=0.5)] and errors == [None, None]


def test_the_runner_times_out_a_sync_plugin_without_waiting_for_it():
    runner = RewardRunner("sleepy", sleeps, {"sleep_s": 30.0}, timeout_s=0.2)
    start = time.perf_counter()
    outcome = asyncio.run(runner.score(_rollouts(1, 2)))
    assert time.perf_counter() - start < 5.0
    assert outcome.timed_out and outcome.errors == ["timed out after 0.2 s (RewardSpec.timeout_s)"] * 2


def test_the_runner_reports_where_a_plugin_raised():
    outcome = asyncio.run(RewardRunner("r", raises, {}, timeout_s=5).score(_rollouts(1, 1)))
    assert outcome.errors[0].startswith("raised RuntimeError: judge returned HTTP 500 (at ")
    assert "test_rewards_local.py" in outcome.errors[0] and "in raises" in outcome.errors[0]
    assert not outcome.transient


def test_the_runner_loads_a_target_by_path_and_awaits_async_rewards():
    runner = RewardRunner("half", f"{M}:async_half", {}, timeout_s=5)
    assert asyncio.run(runner.score(_rollouts(1, 2))).results == [RewardResult(score=0.5)] * 2


def test_micro_batches_keep_groups_together_and_split_only_oversized_groups():
    rollouts = _rollouts(3, 2)  # g0: 0,1  g1: 2,3  g2: 4,5
    assert make_batches(rollouts, 4) == [[0, 1, 2, 3], [4, 5]]
    assert make_batches(rollouts, 3) == [[0, 1], [2, 3], [4, 5]]
    assert make_batches(rollouts, 1) == [[0], [1], [2], [3], [4], [5]]
    interleaved = [rollouts[0], rollouts[2], rollouts[1], rollouts[3]]  # g0, g1, g0, g1
    assert make_batches(interleaved, 2) == [[0, 2], [1, 3]]
    big = _rollouts(1, 5)
    assert make_batches(big, 2) == [[0, 1], [2, 3], [4]]


def test_fail_policy_raises_the_first_error_with_the_rollout_and_a_hint():
    with pytest.raises(RewardError) as info:
        _scorer(RewardSpec(name=f"{M}:bad_when_flagged")).score(_rollouts(3, 2, bad={"g1/0", "g2/1"}))
    err = info.value
    assert err.rollout_id == "g1/0" and err.reward == f"{M}:bad_when_flagged"
    assert "non-finite score (nan)" in str(err) and "1 more rollout(s) failed too (g2/1)" in str(err)
    assert "failure_policy: skip_group" in str(err)


def test_skip_group_drops_whole_groups_and_counts_them():
    spec = RewardSpec(name=f"{M}:bad_when_flagged", failure_policy="skip_group")
    report = _scorer(spec).score(_rollouts(3, 2, bad={"g1/0"}))
    assert report.dropped_group_ids == ["g1"]
    assert [s.rollout.rollout_id for s in report.scored] == ["g0/0", "g0/1", "g2/0", "g2/1"]
    assert report.metrics["reward/dropped_groups"] == 1.0
    assert len(report.errors) == 1 and "rollout 'g1/0'" in report.errors[0]


def test_a_raising_batch_drops_every_group_in_it_under_skip_group():
    spec = RewardSpec(name=f"{M}:raises", failure_policy="skip_group", batch_size=4)
    report = _scorer(spec).score(_rollouts(3, 2))
    assert report.dropped_group_ids == ["g0", "g1", "g2"] and report.scored == []
    assert "reward/total" not in report.metrics  # no kept rollout: no mean, rather than a made-up 0


def test_a_fail_reward_fails_the_step_even_when_a_skip_reward_also_failed():
    specs = [RewardSpec(name=f"{M}:bad_when_flagged", failure_policy="skip_group"),
             RewardSpec(name=f"{M}:raises", failure_policy="fail")]
    with pytest.raises(RewardError, match="judge returned HTTP 500"):
        _scorer(*specs).score(_rollouts(2, 2, bad={"g0/0"}))


def test_transient_errors_are_retried_then_reported():
    FLAKY_CALLS.clear()
    report = _scorer(RewardSpec(name=f"{M}:flaky", max_retries=1)).score(_rollouts(1, 2))
    assert [s.reward for s in report.scored] == [1.0, 1.0] and FLAKY_CALLS == [2, 2]
    FLAKY_CALLS.clear()
    spec = RewardSpec(name=f"{M}:flaky", kwargs={"failures": 9}, max_retries=2)
    with pytest.raises(RewardError, match="transient error.*still failing after 3 attempt"):
        _scorer(spec).score(_rollouts(1, 2))
    assert len(FLAKY_CALLS) == 3


def test_weighted_sum_and_metrics_by_hand():
    specs = [RewardSpec(name=f"{M}:ones", weight=0.5), RewardSpec(name=f"{M}:bad_when_flagged", weight=2.0)]
    report = _scorer(*specs).score(_rollouts(2, 2))
    assert [s.reward for s in report.scored] == [4.5] * 4  # 0.5 · 1 + 2 · 2
    assert report.metrics["reward/total"] == 4.5
    assert report.metrics[f"reward/{M}:ones"] == 1.0 and report.metrics[f"reward/{M}:ones/c"] == 0.5
    assert report.metrics[f"reward/{M}:bad_when_flagged"] == 2.0
    assert report.metrics["reward/dropped_groups"] == 0.0 and report.metrics["timing/reward"] > 0


def test_combiners_by_hand():
    specs = {"acc": RewardSpec(name="ranking", weight=1.0), "fmt": RewardSpec(name="format", threshold=1.0),
             "len": RewardSpec(name="length", weight=0.3, threshold=0.5)}
    assert weighted_sum({"acc": 0.75, "fmt": 1.0, "len": 0.5}, specs) == 0.75 + 1.0 + 0.3 * 0.5
    assert constrained({"acc": 0.75, "fmt": 1.0, "len": 0.5}, specs) == 0.75  # every gate R_k >= τ_k passes
    assert constrained({"acc": 0.75, "fmt": 0.0, "len": 0.5}, specs) == 0.0  # format gate fails
    assert constrained({"acc": 0.75, "fmt": 1.0, "len": 0.4}, specs) == 0.0  # length gate fails


def test_constrained_combiner_on_real_rule_rewards():
    specs = [RewardSpec(name="ranking", kwargs={"mode": "rating"}), RewardSpec(name="format", threshold=1.0)]
    rollouts = [make_rollout("...\nRating: 3", sample_id="a", metadata={"rating": 4}),
                make_rollout("...\nRating: 3\nthanks", sample_id="b", metadata={"rating": 4})]
    report = _scorer(*specs, combiner="constrained").score(rollouts)
    # a: format passes, R = 1 − |3 − 4| / 4 = 0.75; b: no final answer → format 0 < τ = 1 → R = 0
    assert [s.reward for s in report.scored] == [0.75, 0.0]


def test_config_mistakes_fail_before_scoring():
    with pytest.raises(ConfigError, match="both named 'ranking'.*alias"):
        _scorer(RewardSpec(name="ranking"), RewardSpec(name="ranking", kwargs={"mode": "yes_no"}))
    with pytest.raises(ConfigError, match="threshold=0.5 is set, but reward.combiner='weighted_sum'"):
        _scorer(RewardSpec(name="format", threshold=0.5))
    with pytest.raises(ConfigError, match="needs at least one reward without a threshold"):
        _scorer(RewardSpec(name="format", threshold=1.0), combiner="constrained")
    with pytest.raises(RewardError, match="Did you mean 'format'"):
        _scorer(RewardSpec(name="fromat"))
    with pytest.raises(RewardError, match="kwargs \\['k'\\] do not fit"):
        _scorer(RewardSpec(name="format", kwargs={"k": 3}))


def test_aliases_let_one_reward_appear_twice():
    specs = [RewardSpec(name="ranking", alias="rating_acc", kwargs={"mode": "rating"}),
             RewardSpec(name="ranking", alias="liked_acc", kwargs={"mode": "yes_no"})]
    report = _scorer(*specs).score([make_rollout("Rating: 4", metadata={"rating": 5, "liked": True})])
    results = dict(report.scored[0].results)
    assert results["rating_acc"].score == 0.75  # 1 − |4 − 5| / 4
    assert results["liked_acc"].details["parsed"] is False  # no "Answer: yes|no" line
    assert report.metrics["reward/rating_acc"] == 0.75 and report.metrics["reward/liked_acc"] == 0.0


def test_duplicate_rollout_ids_are_refused():
    rollouts = _rollouts(1, 2)
    with pytest.raises(ValueError, match="appears twice"):
        _scorer(RewardSpec(name="format")).score([*rollouts, rollouts[0]])
