"""rl/evaluation.py: ranking metrics by hand, checkpoint resolution, the recipe protocol and `recforge eval` errors."""

from __future__ import annotations

import json
import math

import pytest

from rl import cli
from rl.config import ConfigError
from rl.evaluation import hit_at_k, load_recipe, mean, ndcg_at_k, rank_candidates, resolve_checkpoint, write_report


def test_ranking_metrics_by_hand():
    order = rank_candidates([0.2, 0.9, 0.5], seed=0)
    assert order == [1, 2, 0]
    labels = [0, 0, 1]  # the relevant candidate is ranked 2nd
    assert hit_at_k(order, labels, 1) == 0.0 and hit_at_k(order, labels, 2) == 1.0
    assert ndcg_at_k(order, labels, 3) == pytest.approx(1 / math.log2(3))
    assert math.isnan(ndcg_at_k(order, [0, 0, 0], 3))
    assert mean([1.0, float("nan"), 0.0]) == 0.5 and math.isnan(mean([]))


def test_ties_are_broken_by_the_seed_not_by_position():
    firsts = {rank_candidates([1.0] * 5, seed=s)[0] for s in range(50)}
    assert len(firsts) > 1


def test_every_rec_recipe_exposes_its_evaluation():
    for recipe in ("rec_reasoning", "negfeedback_pgrpo", "recgpt_tags"):
        assert callable(load_recipe(recipe).build_evaluate)
    with pytest.raises(ConfigError, match="defines no build_evaluate"):
        load_recipe("gui_agent")


def test_resolve_checkpoint(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    with pytest.raises(ConfigError, match="neither a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "run"))
    (step / "COMPLETE").write_text("ok\n")
    assert resolve_checkpoint(str(tmp_path / "run")) == step
    assert resolve_checkpoint(str(step)) == step


def test_report_json(tmp_path):
    write_report({"eval/hr@1": 0.5, "eval/ndcg@1": float("nan")}, tmp_path / "r.json", recipe="x", checkpoint=None)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metrics"]["eval/hr@1"] == 0.5 and math.isnan(saved["metrics"]["eval/ndcg@1"])


def test_cli_eval_errors(tmp_path, capsys):
    assert cli.main(["eval", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert cli.main(["eval", "negfeedback_pgrpo", "--checkpoint", str(tmp_path)]) == 2
    assert "neither a complete checkpoint" in capsys.readouterr().err
    assert cli.main(["eval", "negfeedback_pgrpo", "data.eval_k=[0]"]) == 2
    assert "data.eval_k" in capsys.readouterr().err
