"""Progressive GRPO curriculum (negative-feedback modelling): stages, each with a data filter, step budget, KL beta.

The trainer (rl/trainer.py, when the config has `curriculum.stages`) asks the schedule, at every step, which stage
is active and uses that stage's data filter (by name: the recipe supplies one prompt source per filter) and KL
coefficient. The canonical three stages are recent negatives -> all negatives
-> negatives + positives (`negative_feedback_curriculum`). Stage changes are logged by `ProgressiveSchedule.observe`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CurriculumStage:
    """One stage of a progressive curriculum."""

    name: str
    """Shown in logs and metrics, e.g. "recent_negatives"."""
    data_filter: str
    """Name of the data filter the dataset applies while this stage is active."""
    num_steps: int | None
    """Step budget of the stage; None (last stage only) means "until training ends"."""
    kl_beta: float
    """KL-to-reference coefficient while this stage is active."""


@dataclass(frozen=True, kw_only=True)
class ActiveStage:
    """What `ProgressiveSchedule.stage_at` returns for one step."""

    index: int
    """0-based position of the stage in the schedule."""
    stage: CurriculumStage
    step_in_stage: int
    """Steps already spent in this stage before `step` (0 on its first step)."""


class ProgressiveSchedule:
    """Maps a global training step to the active `CurriculumStage`; stages run back to back in order.

    Raises ValueError for an empty schedule, a non-positive budget, or an open-ended (None) budget that is not last;
    `stage_at` raises for a negative step or a step past the last finite budget.
    """

    def __init__(self, stages: Sequence[CurriculumStage]) -> None:
        if not stages:
            raise ValueError("A progressive schedule needs at least one stage.")
        for i, stage in enumerate(stages):
            if stage.num_steps is None and i != len(stages) - 1:
                raise ValueError(
                    f"Stage {stage.name!r} has num_steps=None (open-ended) but is not the last stage; only the last "
                    "stage may run until training ends."
                )
            if stage.num_steps is not None and stage.num_steps < 1:
                raise ValueError(f"Stage {stage.name!r} has num_steps={stage.num_steps}; a stage needs >= 1 step.")
        self.stages: tuple[CurriculumStage, ...] = tuple(stages)
        self._last_index: int | None = None

    @property
    def total_steps(self) -> int | None:
        """Sum of the budgets, or None when the last stage is open-ended."""
        if self.stages[-1].num_steps is None:
            return None
        return sum(s.num_steps for s in self.stages if s.num_steps is not None)

    def stage_at(self, step: int) -> ActiveStage:
        """The stage active at 0-based `step` (pure: no logging, no state change)."""
        if step < 0:
            raise ValueError(f"step={step}: training steps count from 0.")
        start = 0
        for index, stage in enumerate(self.stages):
            if stage.num_steps is None or step < start + stage.num_steps:
                return ActiveStage(index=index, stage=stage, step_in_stage=step - start)
            start += stage.num_steps
        raise ValueError(
            f"step={step} is past the curriculum's {start} steps ({[s.name for s in self.stages]}). Train for at most "
            "that many steps, lengthen the last stage, or give it num_steps=None to run until training ends."
        )

    def observe(self, step: int) -> tuple[ActiveStage, bool]:
        """`stage_at(step)` plus whether the stage changed since the last `observe` call (logged at INFO)."""
        active = self.stage_at(step)
        changed = active.index != self._last_index
        if changed:
            logger.info(
                "curriculum: step %d enters stage %d/%d %r (data_filter=%r, kl_beta=%g, num_steps=%s)",
                step,
                active.index + 1,
                len(self.stages),
                active.stage.name,
                active.stage.data_filter,
                active.stage.kl_beta,
                active.stage.num_steps,
            )
        self._last_index = active.index
        return active, changed


def negative_feedback_curriculum(
    *,
    recent_negatives_steps: int,
    all_negatives_steps: int,
    mixed_steps: int | None,
    kl_betas: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> ProgressiveSchedule:
    """The three-stage curriculum: recent negatives -> all negatives -> negatives + positives.

    Data filter names are "recent_negatives", "all_negatives" and "negatives_and_positives".
    """
    names = ("recent_negatives", "all_negatives", "negatives_and_positives")
    budgets = (recent_negatives_steps, all_negatives_steps, mixed_steps)
    stages = zip(names, budgets, kl_betas, strict=True)
    return ProgressiveSchedule([CurriculumStage(name=n, data_filter=n, num_steps=b, kl_beta=k) for n, b, k in stages])


def schedule_from_config(curriculum_cfg: Any, *, default_kl: float) -> ProgressiveSchedule:
    """The schedule of a `rl.config.CurriculumConfig`: a stage's data filter defaults to its name, its β to
    `default_kl` (algorithm.kl_coef)."""
    return ProgressiveSchedule([
        CurriculumStage(name=s.name, data_filter=s.data_filter or s.name, num_steps=s.num_steps,
                        kl_beta=default_kl if s.kl_coef is None else s.kl_coef)
        for s in curriculum_cfg.stages
    ])
