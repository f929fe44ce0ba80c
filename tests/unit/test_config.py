"""Config tree: loading, overrides, and errors that name the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl.config import Config, ConfigError, load_config, resolve_config_path, save_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "recipes" / "rec_reasoning" / "debug.yaml"


def test_debug_yaml_loads_and_overrides_apply():
    cfg = load_config(DEBUG, ["rollout.temperature=0.7", "reward.rewards.1.weight=2", "cluster.address=null"])
    assert isinstance(cfg, Config)
    assert cfg.rollout.temperature == 0.7
    assert cfg.reward.rewards[1].weight == 2.0
    assert cfg.reward.rewards[1].kwargs["mode"] == "rating"
    assert cfg.cluster.address is None


def test_group_of_one_is_rejected_with_the_key():
    with pytest.raises(ConfigError, match=r"rollout\.num_samples_per_prompt=1.*>= 2"):
        load_config(DEBUG, ["rollout.num_samples_per_prompt=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("rollout.temprature=1", r"rollout\.temprature.*Did you mean 'temperature'"),
        ("rolout.temperature=1", r"'rolout'.*Did you mean 'rollout'"),
        ("learner.zero_stage=4", r"learner\.zero_stage=4 is not one of 2, 3"),
        ("rollout.top_p=2", r"rollout\.top_p=2.0 is out of range: it must be <= 1.0"),
        ("rollout.temperature=0", r"rollout\.temperature=0.0 is out of range: it must be > 0.0"),
        ("run.num_steps=abc", r"run\.num_steps must be int, got str"),
        ("run.num_steps=2.5", r"run\.num_steps must be int, got float"),
        ("logging.tensorboard=yes please", r"logging\.tensorboard must be bool"),
        ("algorithm.advantage=grop", r"algorithm\.advantage='grop'.*Did you mean 'grpo'"),
        ("reward.rewards.5.weight=1", r"'5' is not a valid index into a list of 2"),
        ("reward.rewards.0.failure_policy=skip", r"failure_policy='skip' is not one of.*Did you mean 'skip_group'"),
        ("rollout.temperature", r"must look like key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG, [override])


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  num_samples_per_promt: 4\n")
    with pytest.raises(ConfigError, match=r"rollout\.num_samples_per_promt.*num_samples_per_prompt.*bad\.yaml"):
        load_config(path)


def test_missing_required_reward_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("reward:\n  rewards:\n    - weight: 1.0\n")
    with pytest.raises(ConfigError, match=r"reward\.rewards\.0 is missing required key\(s\): name"):
        load_config(path)


def test_values_are_never_rewritten():
    # An int for a float field is exact and accepted; a float for an int field is an error, not a truncation.
    assert load_config(DEBUG, ["rollout.temperature=1"]).rollout.temperature == 1.0
    with pytest.raises(ConfigError):
        load_config(DEBUG, ["rollout.max_new_tokens=10.7"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(DEBUG, ["run.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"]["seed"] == 3


def test_config_names_resolve_to_recipe_yaml():
    assert resolve_config_path("rec_reasoning", "debug") == DEBUG.resolve() or resolve_config_path(
        "rec_reasoning", "debug").samefile(DEBUG)
    with pytest.raises(ConfigError, match="Known: .*debug"):
        resolve_config_path("rec_reasoning", "nope")


def test_cli_fails_before_starting_anything():
    """`recforge run ... rollout.num_samples_per_prompt=1` exits 2 naming the key, without importing ray/vllm."""
    code = (
        "import sys; from rl.cli import main; rc = main(['run', 'rec_reasoning', '--config', 'debug', "
        "'rollout.num_samples_per_prompt=1']); "
        "assert not {'ray', 'vllm', 'deepspeed'} & set(sys.modules), sorted(sys.modules); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "rollout.num_samples_per_prompt" in out.stderr
    typo = subprocess.run([sys.executable, "-m", "rl.cli", "run", "rec_reasoning", "--config", "debug",
                           "rollout.temprature=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "Did you mean 'temperature'" in typo.stderr


def test_help_lists_recipes():
    out = subprocess.run([sys.executable, "-m", "rl.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "rec_reasoning" in out.stdout


def test_exponent_floats_parse_as_numbers():
    # PyYAML (YAML 1.1) reads `1e-3` as a string; the config loader reads it as the float users mean.
    assert load_config(DEBUG, ["learner.lr=1e-3"]).learner.lr == 1e-3
