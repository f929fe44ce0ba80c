"""Atomic run checkpoints: learner state (DeepSpeed), data position, RNG, step and config.

Layout: `{run_dir}/checkpoints/step_{k:06d}/` holding `learner/` (DeepSpeed, every rank), `trainer_state.json`,
`config.yaml` and, written last, `COMPLETE`. A checkpoint is built under a `.partial-*` name and renamed into place
only when complete, so a crash mid-save never damages the last good checkpoint; `latest_checkpoint` ignores anything
without `COMPLETE`, and `recover_interrupted` (run on resume) removes what an interrupted save left behind.

Fault injection (tests only): with `RECFORGE_FAULT_CHECKPOINT_PAUSE="<step>:<seconds>"` in the environment, saving
checkpoint `<step>` pauses for `<seconds>` after the learner state and trainer state are written and before the
`COMPLETE` marker, so a test can kill the driver at the worst moment of a save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
LEARNER_TAG = "learner"
FAULT_PAUSE_ENV = "RECFORGE_FAULT_CHECKPOINT_PAUSE"


@dataclass(frozen=True, kw_only=True)
class TrainerState:
    step: int
    """Completed training steps; the next step is `step + 1`."""
    policy_version: int
    data_position: int
    """Prompts consumed from the training sampler."""
    rng: dict[str, Any]
    """Python, NumPy and torch RNG states of the driver."""


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, state: TrainerState, *, config_yaml: str,
                    save_learner: Callable[[str, str], None], keep: int) -> Path:
    """Write checkpoint `state.step` atomically; `save_learner(directory, tag)` saves every rank's state."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    partial = root / f".partial-step_{state.step:06d}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        save_learner(str(partial), LEARNER_TAG)
        (partial / "trainer_state.json").write_text(json.dumps(asdict(state)))
        (partial / "config.yaml").write_text(config_yaml)
        _fault_pause(state.step, partial)
        _fsync_tree(partial)
        (partial / COMPLETE).write_text("ok\n")
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, never leave a gap
            stale = root / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
        _fsync_dir(root)  # the rename itself survives a power cut (matters on shared storage)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    _prune(root, keep)
    log.info("checkpoint saved: %s", final)
    return final


def _fault_pause(step: int, partial: Path) -> None:
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    if not spec:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        log.warning("%s=%s: pausing %s s inside the save of %s (fault-injection hook).", FAULT_PAUSE_ENV, spec,
                    seconds, partial.name)
        time.sleep(float(seconds))


def recover_interrupted(run_dir: Path) -> list[str]:
    """Tidy what a save killed midway left behind (call before resuming; the caller must be the run's only writer).

    A `.partial-step_k-*` directory that has its `COMPLETE` marker (killed just before its rename) becomes `step_k`
    when that is missing; any other `.partial-*` is removed. A `.stale-step_k-*` directory is the complete previous
    copy of step k moved aside while k was being re-saved: moved back when `step_k` is still missing, else removed.
    Returns one line per action, for the log.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    actions = []
    for kind in (".partial-", ".stale-"):
        for path in sorted(root.glob(f"{kind}step_*")):
            final = root / path.name[len(kind):].rsplit("-", 1)[0]
            if (path / COMPLETE).is_file() and not final.exists():
                os.replace(path, final)
                actions.append(f"moved the complete {path.name} into place as {final.name} (its save was interrupted "
                               "after it completed)")
    for path in sorted([*root.glob(".partial-*"), *root.glob(".stale-*")]):
        shutil.rmtree(path, ignore_errors=True)
        actions.append(f"removed {path.name} (left by an interrupted save)")
    if actions:
        _fsync_dir(root)
    return actions


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def load_trainer_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / "trainer_state.json"
    if not (checkpoint / COMPLETE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE} marker).")
    return TrainerState(**json.loads(path.read_text()))
