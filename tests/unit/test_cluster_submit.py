"""`recforge submit` (cluster/submit.py) without a cluster: the command it builds, token checks, runtime env."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import submit

ROOT = Path(__file__).resolve().parents[2]


def test_command_uploads_the_repository_with_the_runtime_env_and_joins_the_cluster():
    cmd = submit.build_command("rec_reasoning", "debug", ["run.num_steps=2"], address="http://h:8265", ray_bin="ray",
                               runtime_env=submit.DEFAULT_RUNTIME_ENV)
    assert cmd == ["ray", "job", "submit", "--address", "http://h:8265", "--working-dir", str(ROOT), "--runtime-env",
                   str(submit.DEFAULT_RUNTIME_ENV), "--", "python", "-m", "recipes.rec_reasoning", "--config", "debug",
                   "run.num_steps=2", "cluster.address=auto"]
    kept = submit.build_command("rec_reasoning", "debug", ["cluster.address=ray://x:10001"], address="a", ray_bin="ray",
                                no_wait=True)
    assert kept[-1] == "cluster.address=ray://x:10001" and "--no-wait" in kept and "--runtime-env" not in kept


def test_the_shipped_runtime_env_is_a_mapping_without_a_working_dir():
    data = yaml.safe_load(submit.DEFAULT_RUNTIME_ENV.read_text())
    assert data["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "working_dir" not in data and "runs/" in data["excludes"]
    assert submit.check_runtime_env(str(submit.DEFAULT_RUNTIME_ENV)) == submit.DEFAULT_RUNTIME_ENV
    assert submit.check_runtime_env("none") is None


def test_a_bad_runtime_env_file_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        submit.check_runtime_env(str(tmp_path / "list.yaml"))
    with pytest.raises(ValueError, match="no such file"):
        submit.check_runtime_env(str(tmp_path / "missing.yaml"))


def test_token_sources_are_the_ones_ray_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    assert submit.auth_problem({"RAY_AUTH_MODE": "disabled"}) is None
    assert submit.auth_problem({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}) is None
    assert "no token was found" in submit.auth_problem({"RAY_AUTH_MODE": "token"})
    token_file = tmp_path / "token"
    assert "not a readable, non-empty token file" in submit.auth_problem(
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    token_file.write_text("secret\n")
    assert submit.auth_problem({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret")
    assert submit.auth_problem({"RAY_AUTH_MODE": "token"}) is None


def test_submit_stops_before_uploading_without_a_token_or_with_a_bad_config(tmp_path, monkeypatch, capsys):
    def no_submit(*args, **kwargs):
        raise AssertionError(f"ray job submit should not run: {args}")

    monkeypatch.setattr(subprocess, "run", no_submit)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert submit.main(["rec_reasoning", "--config", "debug"]) == 2
    assert "no token was found" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert submit.main(["rec_reasoning", "--config", "debug", "rollout.temprature=0.5"]) == 2
    assert "Did you mean 'temperature'" in capsys.readouterr().err
