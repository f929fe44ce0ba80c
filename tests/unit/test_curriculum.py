"""rl.curriculum: which stage is active at each step, its filter/beta/budget, and logged stage changes."""

from __future__ import annotations

import logging

import pytest

from rl.curriculum import CurriculumStage, ProgressiveSchedule, negative_feedback_curriculum


def test_negative_feedback_curriculum_boundaries():
    # Budgets 3 + 2 + 4 = 9 steps: steps 0-2 stage 0, 3-4 stage 1, 5-8 stage 2.
    schedule = negative_feedback_curriculum(
        recent_negatives_steps=3, all_negatives_steps=2, mixed_steps=4, kl_betas=(0.0, 0.01, 0.04)
    )
    assert schedule.total_steps == 9
    expected = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert [(a.index, a.step_in_stage) for a in map(schedule.stage_at, range(9))] == expected
    third = schedule.stage_at(5).stage
    assert third == CurriculumStage(
        name="negatives_and_positives", data_filter="negatives_and_positives", num_steps=4, kl_beta=0.04
    )
    assert schedule.stage_at(3).stage.data_filter == "all_negatives"
    with pytest.raises(ValueError, match="past the curriculum's 9 steps"):
        schedule.stage_at(9)
    with pytest.raises(ValueError, match="count from 0"):
        schedule.stage_at(-1)


def test_open_ended_last_stage():
    schedule = negative_feedback_curriculum(recent_negatives_steps=1, all_negatives_steps=1, mixed_steps=None)
    assert schedule.total_steps is None
    active = schedule.stage_at(1000)
    assert active.index == 2 and active.step_in_stage == 998


def test_observe_logs_each_stage_change_once(caplog):
    schedule = ProgressiveSchedule(
        [
            CurriculumStage(name="a", data_filter="fa", num_steps=2, kl_beta=0.1),
            CurriculumStage(name="b", data_filter="fb", num_steps=2, kl_beta=0.2),
        ]
    )
    with caplog.at_level(logging.INFO, logger="rl.curriculum"):
        changes = [schedule.observe(step)[1] for step in range(4)]
    assert changes == [True, False, True, False]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "stage 2/2 'b'" in messages[1] and "data_filter='fb'" in messages[1] and "kl_beta=0.2" in messages[1]


def test_invalid_schedules_are_errors():
    with pytest.raises(ValueError, match="at least one stage"):
        ProgressiveSchedule([])
    with pytest.raises(ValueError, match="only the last"):
        ProgressiveSchedule(
            [
                CurriculumStage(name="a", data_filter="fa", num_steps=None, kl_beta=0.0),
                CurriculumStage(name="b", data_filter="fb", num_steps=1, kl_beta=0.0),
            ]
        )
    with pytest.raises(ValueError, match=">= 1 step"):
        ProgressiveSchedule([CurriculumStage(name="a", data_filter="fa", num_steps=0, kl_beta=0.0)])
