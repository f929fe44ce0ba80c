"""Acceptance: a reward plugin package made outside the repo (its own pyproject declaring the `recforge.rewards`
entry point), pip-installed into this environment, is listed by `reward list`, runs under `reward test`, passes its
own tests, and is usable by name in a recipe's reward config, locally and by Ray reward actors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rewards import cli
from rewards.api import resolve_reward
from rewards.local import LocalRewardScorer
from rl.config import RewardConfig, build
from rl.rollout_io import read_rollouts

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "rewards" / "data" / "sample_rollouts.jsonl"
RECIPE_SECTION = """
combiner: weighted_sum
rewards:
  - name: format
    weight: 0.5
  - name: {name}
    kwargs: {{min_words: 12}}
"""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, timeout=300,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rewards.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    name = f"acceptance_{os.getpid()}"  # unique: other sessions may share this venv
    parent = tmp_path_factory.mktemp("plugin_src")
    assert cli.main(["new", name, "--dir", str(parent)]) == 0
    root = parent / f"recforge-reward-{name.replace('_', '-')}"
    _pip("install", "-q", "--no-deps", "--no-build-isolation", str(root))
    try:
        yield name, root
    finally:
        _pip("uninstall", "-y", "-q", root.name)


def test_the_installed_plugin_is_listed_with_its_distribution(installed_plugin):
    name, root = installed_plugin
    proc = _cli("list")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if name in line)
    assert "plugin" in row and root.name in " ".join(proc.stdout.split())


def test_the_installed_plugin_runs_under_reward_test(installed_plugin):
    name, _ = installed_plugin
    proc = _cli("test", name, "--rollouts", str(SAMPLE), "--kwargs", '{"min_words": 12}')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{name} from plugin" in proc.stdout and "Score distribution (n=12)" in proc.stdout
    assert "No errors." in proc.stdout


def test_the_plugin_packages_own_tests_pass_against_the_installed_entry_point(installed_plugin):
    _, root = installed_plugin
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_a_recipe_uses_the_plugin_by_name(installed_plugin):
    name, _ = installed_plugin
    info = resolve_reward(name)  # the resolver recipes, the service and the CLI share
    assert info.source.startswith(f"plugin recforge-reward-{name.replace('_', '-')} 0.1.0") and info.deterministic
    cfg = build(RewardConfig, yaml.safe_load(RECIPE_SECTION.format(name=name)), prefix="reward")
    rollouts = [r.rollout for r in read_rollouts(SAMPLE)]
    report = LocalRewardScorer(cfg).score(rollouts)
    assert len(report.scored) == 12 and f"reward/{name}/answered" in report.metrics
    # 0.5 · format + plugin (skeleton: a `Rating: N` line anywhere and >= 12 words). By rollout of the sample:
    #   format: 1 1 0 0 | 1 1 0 1 | 1 1 0 0     plugin: 1 1 0 0 | 1 0 0 0 | 1 1 1 0
    #   (u9002/1 answers "**Rating:** 4", which the skeleton's plain regex misses; u9002/3 has 11 words;
    #    u9003/2 answers on a middle line, which `format` rejects and the skeleton accepts)
    expected = [1.5, 1.5, 0.0, 0.0, 1.5, 0.5, 0.0, 0.5, 1.5, 1.5, 1.0, 0.0]
    assert [s.reward for s in report.scored] == expected

    ray = pytest.importorskip("ray")
    from rewards.service import RewardService

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with RewardService(cfg) as service:  # Ray workers import the installed plugin by its entry point
            remote = service.score(rollouts)
        assert [s.reward for s in remote.scored] == expected
    finally:
        ray.shutdown()
