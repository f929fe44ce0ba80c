"""RewardService on a real local Ray cluster (2 CPUs): timeouts, NaN under both failure policies, async concurrency,
the result cache, retries after transient errors and a dead actor, and parity with the no-Ray scorer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import reward_plugins  # noqa: E402,F401  (registers the test_* rewards in the driver)

from rewards.api import RewardError  # noqa: E402
from rewards.local import LocalRewardScorer  # noqa: E402
from rewards.service import RewardService  # noqa: E402
from rl.config import RewardConfig, RewardSpec  # noqa: E402
from rl.rollout_io import make_rollout, read_rollouts  # noqa: E402

SAMPLE = REPO / "rewards" / "data" / "sample_rollouts.jsonl"


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    # Reward actors import `reward_plugins` by name, so this directory goes on the workers' path.
    path = os.pathsep.join(p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _groups(num_groups: int, group_size: int, bad: set[str] = frozenset()) -> list:
    """Rollouts of groups g0..g{n-1}; `bad` holds rollout ids whose sample says bad=True (per rollout: own sample)."""
    out = []
    for g in range(num_groups):
        for i in range(group_size):
            rid = f"g{g}/{i}"
            out.append(make_rollout(f"completion {g} {i} " + "word " * i + "\nRating: 4", sample_id=f"g{g}",
                                    index=i, metadata={"bad": rid in bad}))
    return out


def _service(*specs: RewardSpec, combiner: str = "weighted_sum") -> RewardService:
    return RewardService(RewardConfig(rewards=list(specs), combiner=combiner))


def test_a_slow_plugin_hits_its_timeout_and_the_error_names_it(ray_cluster):
    with _service(RewardSpec(name="test_slow_sync", kwargs={"sleep_s": 30.0}, timeout_s=0.5)) as service:
        start = time.perf_counter()
        expected = r"Reward 'test_slow_sync' failed on rollout 'g0/0': timed out after 0.5 s"
        with pytest.raises(RewardError, match=expected):
            service.score(_groups(2, 2))
        assert time.perf_counter() - start < 15.0  # the step does not wait for the 30 s sleep


def test_nan_fails_the_step_under_fail(ray_cluster):
    with _service(RewardSpec(name="test_nan_for_bad", failure_policy="fail")) as service:
        with pytest.raises(RewardError) as info:
            service.score(_groups(3, 2, bad={"g1/1"}))
    err = info.value
    assert (err.reward, err.rollout_id) == ("test_nan_for_bad", "g1/1")
    assert "non-finite score (nan)" in str(err)


def test_nan_drops_exactly_the_affected_groups_under_skip_group(ray_cluster):
    rollouts = _groups(4, 2, bad={"g1/1", "g3/0", "g3/1"})
    specs = (RewardSpec(name="test_nan_for_bad", failure_policy="skip_group", batch_size=3),
             RewardSpec(name="format", weight=0.5))
    with _service(*specs) as service:
        report = service.score(rollouts)
    assert report.dropped_group_ids == ["g1", "g3"]
    assert [s.rollout.rollout_id for s in report.scored] == ["g0/0", "g0/1", "g2/0", "g2/1"]
    assert [s.reward for s in report.scored] == [1.5] * 4  # 1.0 · 1.0 (nan_for_bad) + 0.5 · 1.0 (format)
    assert report.metrics["reward/dropped_groups"] == 2.0
    assert report.metrics["reward/test_nan_for_bad"] == 1.0
    assert report.metrics["reward/format"] == 1.0
    assert report.metrics["reward/total"] == 1.5
    assert report.metrics["timing/reward"] > 0
    assert len(report.errors) == 3 and all("test_nan_for_bad" in e for e in report.errors)


def test_an_async_plugin_runs_calls_concurrently(ray_cluster):
    num_calls, sleep_s = 8, 0.5
    spec = RewardSpec(name="test_async_sleep", kwargs={"sleep_s": sleep_s}, batch_size=1, max_concurrency=num_calls)
    rollouts = _groups(num_calls, 1)
    with _service(spec) as service:
        service.score(rollouts[:1])  # warm-up: the actor has started and imported the plugin
        start = time.perf_counter()
        report = service.score(rollouts)
        elapsed = time.perf_counter() - start
    assert [s.reward for s in report.scored] == [float(len(r.text)) for r in rollouts]
    # Serial would take num_calls × sleep_s = 4 s; concurrent ≈ 0.5 s plus overhead. Half of serial is tolerant.
    assert elapsed < 0.5 * num_calls * sleep_s, f"{num_calls} calls of {sleep_s} s took {elapsed:.2f} s"


def test_cached_results_of_a_deterministic_reward_are_not_recomputed(ray_cluster, tmp_path):
    log = tmp_path / "calls.log"
    rollouts = _groups(3, 2)
    with _service(RewardSpec(name="test_counting", kwargs={"log_path": str(log)})) as service:
        first = service.score(rollouts)
        second = service.score(rollouts)
        assert len(log.read_text().splitlines()) == 6  # the second step computed nothing
        assert second.metrics["reward/cache_hits"] == 6.0
        assert [s.results["test_counting"] for s in second.scored] == [s.results["test_counting"] for s in first.scored]
        changed = [*rollouts[:5], make_rollout("a brand new completion", sample_id="g2", index=1)]
        service.score(changed)
        assert log.read_text().splitlines()[6:] == ["g2/1"]  # only the new (sample, completion) pair
    assert first.metrics["reward/test_counting/chars"] == sum(len(r.text) for r in rollouts) / 6


def test_a_reward_declared_non_deterministic_in_config_is_not_cached(ray_cluster, tmp_path):
    log = tmp_path / "calls.log"
    spec = RewardSpec(name="test_counting", kwargs={"log_path": str(log)}, deterministic=False)
    with _service(spec) as service:
        service.score(_groups(1, 2))
        service.score(_groups(1, 2))
    assert len(log.read_text().splitlines()) == 4


def test_transient_errors_are_retried_up_to_max_retries(ray_cluster, tmp_path):
    ok_state, bad_state = tmp_path / "ok", tmp_path / "bad"
    spec = RewardSpec(name="test_flaky", kwargs={"state_path": str(ok_state), "failures": 1}, max_retries=1)
    with _service(spec) as service:
        report = service.score(_groups(1, 2))
    assert [s.reward for s in report.scored] == [1.0, 1.0] and ok_state.read_text() == "2"
    spec = RewardSpec(name="test_flaky", kwargs={"state_path": str(bad_state), "failures": 5}, max_retries=1)
    with _service(spec) as service, pytest.raises(RewardError, match=r"still failing after 2 attempt"):
        service.score(_groups(1, 2))


def test_a_dead_actor_is_restarted_and_its_call_reissued(ray_cluster, tmp_path):
    spec = RewardSpec(name="test_dies_once", kwargs={"state_path": str(tmp_path / "died")}, max_retries=2)
    with _service(spec) as service:
        report = service.score(_groups(2, 2))
    assert [s.rollout.rollout_id for s in report.scored] == ["g0/0", "g0/1", "g1/0", "g1/1"]
    assert (tmp_path / "died").read_text() == "died"


def test_wrong_count_and_raising_plugins_name_the_cause(ray_cluster):
    with _service(RewardSpec(name="test_wrong_count")) as service:
        with pytest.raises(RewardError, match=r"returned 1 results for a batch of 2 rollouts"):
            service.score(_groups(1, 2))
    with _service(RewardSpec(name="reward_plugins:raises")) as service:
        with pytest.raises(RewardError, match=r"rollout 'g0/0': raised KeyError: 'missing_key' \(at .*reward_plugins"):
            service.score(_groups(1, 2))


def test_the_service_and_the_local_scorer_agree_on_the_shipped_sample(ray_cluster):
    cfg = RewardConfig(rewards=[RewardSpec(name="format", threshold=1.0),
                                RewardSpec(name="ranking", kwargs={"mode": "rating"}, batch_size=5)],
                       combiner="constrained")
    rollouts = [r.rollout for r in read_rollouts(SAMPLE)]
    local = LocalRewardScorer(cfg).score(rollouts)
    with RewardService(cfg) as service:
        remote = service.score(rollouts)
    assert [(s.rollout.rollout_id, s.reward, dict(s.results)) for s in remote.scored] == \
        [(s.rollout.rollout_id, s.reward, dict(s.results)) for s in local.scored]
    untimed = {k: v for k, v in local.metrics.items() if not k.startswith("timing/")}
    assert {k: remote.metrics[k] for k in untimed} == untimed


def test_a_reward_the_actors_cannot_import_fails_at_start_up_naming_it(ray_cluster, tmp_path, monkeypatch):
    (tmp_path / "driver_only_rewards.py").write_text("def only_here(rollouts):\n    return [1.0 for _ in rollouts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable on the driver, not on the Ray workers
    with pytest.raises(RewardError, match=r"Reward 'driver_only_rewards:only_here' failed: its reward actor could not "
                                          r"start: .*No module named 'driver_only_rewards'"):
        _service(RewardSpec(name="driver_only_rewards:only_here"))
