"""Reward plugins for the reward-service tests. A real module (not closures) so Ray reward actors can import it:
the tests put this directory on the workers' PYTHONPATH through `ray.init(runtime_env=...)`."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rewards.api import TransientRewardError, per_sample, reward
from rl.types import RewardResult, Rollout


@reward("test_slow_sync")
def slow_sync(rollouts: Sequence[Rollout], *, sleep_s: float = 5.0) -> list[RewardResult]:
    """Sleeps past any reasonable timeout."""
    time.sleep(sleep_s)
    return [RewardResult(score=1.0) for _ in rollouts]


@reward("test_nan_for_bad")
@per_sample
def nan_for_bad(rollout: Rollout) -> float:
    """NaN for rollouts whose sample metadata says bad=True, else 1.0."""
    return math.nan if rollout.sample.metadata.get("bad") else 1.0


@reward("test_async_sleep")
async def async_sleep(rollouts: Sequence[Rollout], *, sleep_s: float = 0.5) -> list[RewardResult]:
    """An I/O-bound reward (a judge call): sleeps without blocking the actor's event loop."""
    await asyncio.sleep(sleep_s)
    return [RewardResult(score=float(len(r.text))) for r in rollouts]


@reward("test_counting", deterministic=True)
def counting(rollouts: Sequence[Rollout], *, log_path: str) -> list[RewardResult]:
    """Appends one line per rollout it scores to `log_path` (the count survives process boundaries)."""
    with open(log_path, "a") as handle:
        for r in rollouts:
            handle.write(f"{r.rollout_id}\n")
    return [RewardResult(score=float(len(r.text.split())), components={"chars": float(len(r.text))})
            for r in rollouts]


@reward("test_flaky")
def flaky(rollouts: Sequence[Rollout], *, state_path: str, failures: int = 1) -> list[RewardResult]:
    """Raises TransientRewardError on its first `failures` calls (counted in `state_path`), then scores 1.0."""
    path = Path(state_path)
    calls = int(path.read_text()) if path.exists() else 0
    path.write_text(str(calls + 1))
    if calls < failures:
        raise TransientRewardError(f"judge endpoint restarting (call {calls + 1}, pid {os.getpid()})")
    return [RewardResult(score=1.0) for _ in rollouts]


@reward("test_wrong_count")
def wrong_count(rollouts: Sequence[Rollout]) -> list[RewardResult]:
    """Forgets the last rollout."""
    return [RewardResult(score=1.0) for _ in rollouts[:-1]]


@reward("test_raises")
def raises(rollouts: Sequence[Rollout]) -> list[RewardResult]:
    """A plugin bug."""
    return [RewardResult(score=float(r.sample.metadata["missing_key"])) for r in rollouts]


@reward("test_dies_once")
def dies_once(rollouts: Sequence[Rollout], *, state_path: str) -> list[RewardResult]:
    """Kills its own process on the first call ever (the actor dies and Ray restarts it), then scores 1.0."""
    path = Path(state_path)
    if not path.exists():
        path.write_text("died")
        os._exit(1)
    return [RewardResult(score=1.0) for _ in rollouts]
