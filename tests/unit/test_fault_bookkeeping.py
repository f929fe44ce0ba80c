"""Fault bookkeeping without a cluster: tidying an interrupted checkpoint save, the save's fault-injection pause,
per-step fault metrics, and the learner failure error (its message and that it survives pickling through Ray)."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest

from rl import checkpoint as ckpt
from rl.health import FaultCounters
from rl.learner_group import LearnerFailedError


def _checkpoint(path: Path, step: int, *, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    state = {"step": step, "policy_version": step, "data_position": 2 * step, "rng": {}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    if complete:
        (path / ckpt.COMPLETE).write_text("ok\n")
    return path


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_is_tidied_on_resume(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root / "step_000001", 1)
    _checkpoint(root / ".partial-step_000002-0a1b2c3d", 2, complete=False)  # killed before COMPLETE
    _checkpoint(root / ".stale-step_000001-deadbeef", 1)  # an older copy of a step that still exists
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000001"
    actions = ckpt.recover_interrupted(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]
    assert len(actions) == 2 and any(".partial-step_000002" in a for a in actions)
    assert ckpt.load_trainer_state(root / "step_000001").step == 1


def test_a_save_killed_after_its_marker_but_before_its_rename_is_kept(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root / "step_000003", 3)
    _checkpoint(root / ".partial-step_000004-99887766", 4)  # complete, never renamed into place
    ckpt.recover_interrupted(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]
    assert ckpt.load_trainer_state(root / "step_000004").step == 4


def test_a_resave_killed_between_its_two_renames_gets_its_checkpoint_back(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root / "step_000003", 3)
    _checkpoint(root / ".stale-step_000004-0a1b2c3d", 4)  # step_000004 moved aside ...
    _checkpoint(root / ".partial-step_000004-99887766", 4, complete=False)  # ... and its new copy unfinished
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000003"
    ckpt.recover_interrupted(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000004"
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]


def test_the_fault_pause_hook_pauses_only_the_named_step(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_PAUSE_ENV, "2:0.3")
    state = ckpt.TrainerState(step=1, policy_version=1, data_position=2, rng={})
    start = time.monotonic()
    ckpt.save_checkpoint(tmp_path, state, config_yaml="{}\n", save_learner=lambda d, tag: None, keep=2)
    assert time.monotonic() - start < 0.3
    start = time.monotonic()
    ckpt.save_checkpoint(tmp_path, ckpt.TrainerState(step=2, policy_version=2, data_position=4, rng={}),
                         config_yaml="{}\n", save_learner=lambda d, tag: None, keep=2)
    assert time.monotonic() - start >= 0.3
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001", "step_000002"]


def test_fault_metrics_are_per_step_increases():
    counters = FaultCounters()
    first = counters.step_metrics({"fault/rollout_restarts": 0, "fault/reissued_shards": 0,
                                   "fault/reward_restarts": 0})
    assert first == {"fault/rollout_restarts": 0.0, "fault/reissued_shards": 0.0, "fault/reward_restarts": 0.0,
                     "fault/restarts_total": 0.0}
    second = counters.step_metrics({"fault/rollout_restarts": 1, "fault/reissued_shards": 1,
                                    "fault/reward_restarts": 2})
    assert second == {"fault/rollout_restarts": 1.0, "fault/reissued_shards": 1.0, "fault/reward_restarts": 2.0,
                      "fault/restarts_total": 3.0}
    third = counters.step_metrics({"fault/rollout_restarts": 1, "fault/reissued_shards": 1,
                                   "fault/reward_restarts": 2})
    assert third["fault/rollout_restarts"] == 0.0 and third["fault/restarts_total"] == 3.0


def test_learner_failure_names_the_rank_the_call_and_how_to_resume():
    err = LearnerFailedError("learner rank 1", "train", "ActorDiedError: the actor died unexpectedly")
    text = str(err)
    assert text.startswith("learner rank 1 failed during train: ActorDiedError")
    assert "run.resume=auto" in text and "learner_timeout_s" not in text
    late = LearnerFailedError("learner rank 0", "checkpoint save", "no answer within 5 s", timed_out=True)
    assert "did not answer during checkpoint save" in str(late) and "cluster.learner_timeout_s" in str(late)
    again = pickle.loads(pickle.dumps(late))
    assert isinstance(again, LearnerFailedError) and str(again) == str(late) and again.timed_out
    with pytest.raises(RuntimeError):
        raise again
