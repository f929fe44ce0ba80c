"""`recforge reward list|test|new` through `rewards.cli.main` (and once as `python -m rewards.cli`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import cli
from rl.rollout_io import make_rollout, write_rollouts
from rl.types import RewardResult

M = __name__


def needs_rating(rollouts):
    """Fails on rollouts without a rating in their metadata."""
    return [RewardResult(score=float(r.sample.metadata["rating"])) for r in rollouts]


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_list_shows_the_built_ins_with_their_source(capsys):
    code, out = _run(capsys, "list")
    assert code == 0
    for name in ("format", "ranking", "length"):
        assert name in out
    assert "built-in (rewards.rules)" in out and "1.0 in [lo, hi]" in out


def test_test_on_the_shipped_sample_prints_scores_distribution_and_timing(capsys):
    code, out = _run(capsys, "test", "ranking", "--kwargs", '{"mode": "rating"}', "--limit", "8")
    assert code == 0
    assert "ranking from built-in (rewards.rules)" in out and "8 rollouts" in out
    assert "u9001-i1201-t14/0" in out and "u9003-i1203-t22/0" not in out  # --limit 8
    assert "Score distribution (n=8)" in out and "Components" in out and "parsed" in out
    assert "No errors." in out and "ms per call" in out


def test_errors_are_shown_with_the_offending_rollout_and_exit_1(capsys, tmp_path):
    path = tmp_path / "r.jsonl"
    write_rollouts(path, [make_rollout("fine", sample_id="a", metadata={"rating": 4}),
                          make_rollout("no ground truth here", sample_id="b")])
    code, out = _run(capsys, "test", f"{M}:needs_rating", "--rollouts", str(path), "--batch-size", "1")
    assert code == 1
    assert "Errors: 1 of 2 rollouts" in out and "b/0" in out and "raised KeyError: 'rating'" in out
    assert "no ground truth here" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["test", "rankin"], "Did you mean 'ranking'?"),
    (["test", "format", "--kwargs", "{mode: 1}"], "--kwargs is not valid JSON"),
    (["test", "format", "--kwargs", "[1]"], "--kwargs must be a JSON object"),
    (["test", "format", "--kwargs", '{"k": 3}'], "do not fit"),
    (["test", "format", "--timeout", "0"], "timeout_s=0.0 is out of range"),
    (["test", "format", "--rollouts", "/nonexistent/r.jsonl"], "no such rollout file"),
    (["new", "Bad-Name"], "is not a valid reward name"),
    (["new", "format"], "a reward named 'format' already exists (built-in (rewards.rules))"),
])
def test_bad_input_exits_2_with_a_reason(capsys, argv, message):
    code, out = _run(capsys, *argv)
    assert code == 2 and message in " ".join(out.split())


def test_a_malformed_rollouts_file_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json}\n")
    code, out = _run(capsys, "test", "format", "--rollouts", str(path))
    assert code == 2 and f"{path}:1: not valid JSON" in "".join(out.split("\n"))


def test_new_writes_a_plugin_package_whose_reward_works(capsys, tmp_path):
    code, out = _run(capsys, "new", "mentions_rating", "--dir", str(tmp_path))
    assert code == 0 and "pip install -e" in out
    root = tmp_path / "recforge-reward-mentions-rating"
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points."recforge.rewards"]' in pyproject
    assert 'mentions_rating = "recforge_reward_mentions_rating.reward:mentions_rating"' in pyproject
    assert (root / "tests" / "test_mentions_rating.py").is_file() and (root / "README.md").is_file()
    spec = importlib.util.spec_from_file_location("skeleton_reward", root / "recforge_reward_mentions_rating" /
                                                  "reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    long = "The user rated similar films highly and this one fits their taste well.\nRating: 4"
    assert [r.score for r in module.mentions_rating([make_rollout(long), make_rollout("Rating: 4")])] == [1.0, 0.0]
    assert _run(capsys, "new", "mentions_rating", "--dir", str(tmp_path))[0] == 2  # refuses to overwrite


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "rewards.cli", "test", "format", "--limit", "2"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "Score distribution (n=2)" in proc.stdout
