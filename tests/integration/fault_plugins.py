"""A reward for the fault-tolerance tests (tests/integration/test_fault_tolerance.py). A real module, not a closure,
so Ray reward actors can import it: the test puts this directory on every worker's PYTHONPATH.

`probe` scores a rollout by a hash of its completion tokens: deterministic (an interrupted run and an uninterrupted
one give the same rewards) yet varied within a group (advantages are non-zero, so the weights move). Every call
appends "policy_version rollout_id" per rollout to `{state_dir}/scored.log` after scoring, which counts how often
each rollout was scored. While `{state_dir}/arm` exists a call first writes `{state_dir}/scoring-{pid}` and sleeps,
so a test can SIGKILL the actor in the middle of a batch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rl.types import RewardResult, Rollout


def probe(rollouts: Sequence[Rollout], *, state_dir: str) -> list[RewardResult]:
    directory = Path(state_dir)
    arm = directory / "arm"
    if arm.exists():
        (directory / f"scoring-{os.getpid()}").write_text(" ".join(r.rollout_id for r in rollouts))
        deadline = time.monotonic() + 120.0
        while arm.exists() and time.monotonic() < deadline:  # the test kills this process in here
            time.sleep(0.05)
    results = []
    for r in rollouts:
        digest = hashlib.sha256(repr(r.completion_token_ids).encode()).digest()
        results.append(RewardResult(score=int.from_bytes(digest[:2], "little") / 65535.0))
    with (directory / "scored.log").open("a") as handle:
        handle.writelines(f"{r.policy_version} {r.rollout_id}\n" for r in rollouts)
    return results
