"""Progressive-curriculum config (`curriculum.stages`) and the trainer's per-stage prompt sources and KL β."""

from __future__ import annotations

import pytest

from rl.config import ConfigError, load_config
from rl.curriculum import schedule_from_config

STAGES = ("curriculum.stages=[{name: recent_negatives, num_steps: 2}, {name: all_negatives, num_steps: 1, "
          "kl_coef: 0.05}, {name: negatives_and_positives, data_filter: mixed}]")


def test_stages_build_the_schedule_with_defaults():
    cfg = load_config(None, [STAGES, "algorithm.kl_coef=0.01", "run.num_steps=10"])
    schedule = schedule_from_config(cfg.curriculum, default_kl=cfg.algorithm.kl_coef)
    assert [s.data_filter for s in schedule.stages] == ["recent_negatives", "all_negatives", "mixed"]
    assert [s.kl_beta for s in schedule.stages] == [0.01, 0.05, 0.01]
    assert [schedule.stage_at(k).index for k in range(5)] == [0, 0, 1, 2, 2]


def test_stage_kl_needs_a_reference_model():
    with pytest.raises(ConfigError, match=r"stages.1.kl_coef=0.05.*algorithm.kl_coef=0"):
        load_config(None, [STAGES])


def test_budget_shorter_than_the_run_is_refused():
    closed = "curriculum.stages=[{name: a, num_steps: 2}, {name: b, num_steps: 1}]"
    with pytest.raises(ConfigError, match="shorter than run.num_steps=4"):
        load_config(None, [closed, "run.num_steps=4"])
    with pytest.raises(ConfigError, match="not the last stage"):
        load_config(None, ["curriculum.stages=[{name: a}, {name: b, num_steps: 1}]"])


def test_eval_k_must_be_positive():
    with pytest.raises(ConfigError, match="eval_k"):
        load_config(None, ["data.eval_k=[0, 5]"])


def test_trainer_checks_the_prompt_sources_against_the_stages():
    pytest.importorskip("ray")
    from rl.trainer import check_curriculum_prompts

    cfg = load_config(None, [STAGES, "algorithm.kl_coef=0.01"])
    sources = {"recent_negatives": [1], "all_negatives": [2], "mixed": [3]}
    assert check_curriculum_prompts(cfg, sources) is not None
    with pytest.raises(ConfigError, match=r"\['mixed'\] are not offered"):
        check_curriculum_prompts(cfg, {"recent_negatives": [1], "all_negatives": [2]})
    with pytest.raises(ConfigError, match="single prompt source"):
        check_curriculum_prompts(cfg, [1, 2])
    with pytest.raises(ConfigError, match="no curriculum.stages"):
        check_curriculum_prompts(load_config(None, []), sources)
    assert check_curriculum_prompts(load_config(None, []), [1]) is None
