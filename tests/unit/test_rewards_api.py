"""rewards.api: registration, per-sample rewards, the resolver (import paths, built-ins, entry points, did-you-mean),
kwargs checks, and the layering rule (no ray/vllm/deepspeed). Entry points are passed in as `plugins=`; finding them
among the installed distributions is tested with a real pip-installed plugin package in
tests/integration/test_reward_plugin_package.py."""

from __future__ import annotations

import asyncio
import importlib.metadata
import pickle
import subprocess
import sys
import time

import pytest

from rewards import api
from rewards.api import (
    ENTRY_POINT_GROUP,
    RewardError,
    UnknownRewardError,
    check_kwargs,
    group_entry_points,
    list_rewards,
    per_sample,
    resolve_reward,
    reward,
)
from rl.rollout_io import make_rollout
from rl.types import RewardResult


@reward("unit_length_chars", deterministic=True)
def length_chars(rollouts, *, scale: float = 1.0):
    """Characters of the completion times `scale`."""
    return [RewardResult(score=scale * len(r.text)) for r in rollouts]


@reward("unit_per_sample")
@per_sample
def words(rollout, *, bonus: float = 0.0):
    return len(rollout.text.split()) + bonus


@per_sample
async def slow_words(rollout):
    await asyncio.sleep(0.2)
    return RewardResult(score=float(len(rollout.text.split())))


def plain_reward(rollouts):
    """A plugin function that never used @reward."""
    return [1.0 for _ in rollouts]


NOT_CALLABLE = 3


def test_reward_registers_the_function_unchanged_with_its_declaration():
    info = resolve_reward("unit_length_chars")
    assert info.fn is length_chars and info.deterministic and not info.is_async
    assert info.target == f"{__name__}:length_chars"
    assert info.source == f"registered in {__name__}"
    assert info.description == "Characters of the completion times `scale`."
    assert length_chars([make_rollout("abcd")], scale=0.5)[0].score == 2.0


def test_a_taken_name_cannot_be_registered_by_another_function():
    with pytest.raises(ValueError, match=r"'unit_length_chars' is already registered by .*length_chars"):
        reward("unit_length_chars")(lambda rollouts: [])


@pytest.mark.parametrize("bad", ["", "9lives", "pkg.mod:fn", "with space"])
def test_invalid_names_are_rejected(bad):
    with pytest.raises(ValueError, match="is not valid"):
        reward(bad)


def test_per_sample_turns_numbers_into_results_and_keeps_kwargs():
    results = words([make_rollout("one two three"), make_rollout("four")], bonus=0.5)
    assert results == [RewardResult(score=3.5), RewardResult(score=1.5)]
    assert not resolve_reward("unit_per_sample").is_async


def test_async_per_sample_gathers_the_samples_concurrently():
    start = time.perf_counter()
    results = asyncio.run(slow_words([make_rollout("a b"), make_rollout("c"), make_rollout("d e f")]))
    assert [r.score for r in results] == [2.0, 1.0, 3.0]
    assert time.perf_counter() - start < 0.5  # 3 × 0.2 s one after another would be 0.6 s
    assert api.is_async_reward(slow_words)


def test_per_sample_below_reward_is_rejected():
    with pytest.raises(TypeError, match="above @per_sample"):
        per_sample(length_chars)


def test_builtins_resolve_by_name():
    for name in ("format", "ranking", "length"):
        info = resolve_reward(name)
        assert info.source == "built-in (rewards.rules)" and info.deterministic
        assert info.target.startswith("rewards.rules:")


def test_unknown_names_list_the_known_ones_and_suggest_the_closest():
    with pytest.raises(UnknownRewardError) as info:
        resolve_reward("rankng")
    message = str(info.value)
    assert "Unknown reward 'rankng'" in message and "Did you mean 'ranking'?" in message
    assert "Known rewards: " in message and "format" in message and "length" in message
    assert isinstance(info.value, RewardError) and isinstance(info.value, ValueError)


def test_import_paths_resolve_and_their_errors_say_what_is_missing():
    info = resolve_reward(f"{__name__}:plain_reward")
    assert info.fn is plain_reward and info.source == "import path" and not info.deterministic
    with pytest.raises(UnknownRewardError, match="cannot import module 'no_such_pkg_xyz.mod': No module named"):
        resolve_reward("no_such_pkg_xyz.mod:fn")
    with pytest.raises(UnknownRewardError, match="has no attribute 'plain_rewrd'.*Did you mean 'plain_reward'"):
        resolve_reward(f"{__name__}:plain_rewrd")
    with pytest.raises(UnknownRewardError, match="is a int, not a callable reward"):
        resolve_reward(f"{__name__}:NOT_CALLABLE")


def plugins(*pairs: tuple[str, str]) -> api.Plugins:
    """Entry points as a distribution would declare them (real `EntryPoint`s: resolving one imports its target)."""
    return group_entry_points(importlib.metadata.EntryPoint(name=n, value=v, group=ENTRY_POINT_GROUP) for n, v in pairs)


def test_entry_points_are_grouped_by_name_and_a_target_seen_twice_counts_once():
    found = plugins(("a", f"{__name__}:plain_reward"), ("b", f"{__name__}:words"), ("a", f"{__name__}:plain_reward"),
                    ("a", f"{__name__}:words"))
    assert {name: [ep.value for ep in eps] for name, eps in found.items()} == {
        "a": [f"{__name__}:plain_reward", f"{__name__}:words"], "b": [f"{__name__}:words"]}


def test_plugin_entry_points_resolve_and_are_listed():
    found = plugins(("unit_plugin", f"{__name__}:plain_reward"), ("unit_broken", "no_such_pkg_xyz.mod:fn"),
                    ("format", f"{__name__}:plain_reward"))
    info = resolve_reward("unit_plugin", plugins=found)
    assert info.fn is plain_reward and info.source == f"plugin (unknown distribution) ({__name__}:plain_reward)"
    assert resolve_reward("format", plugins=found).source == "built-in (rewards.rules)"  # built-ins cannot be shadowed
    with pytest.raises(RewardError, match="unit_broken.*failed to import no_such_pkg_xyz.mod:fn"):
        resolve_reward("unit_broken", plugins=found)
    with pytest.raises(UnknownRewardError, match="Did you mean 'unit_plugin'"):
        resolve_reward("unit_plugn", plugins=found)
    rows = {(row.name, row.source.split(" ")[0]): row for row in list_rewards(plugins=found)}
    assert rows[("unit_plugin", "plugin")].info.fn is plain_reward
    assert "ModuleNotFoundError" in rows[("unit_broken", "plugin")].error
    assert rows[("format", "built-in")].info is not None
    assert rows[("unit_length_chars", "registered")].info.fn is length_chars


def test_two_plugins_claiming_one_name_is_an_error():
    found = plugins(("unit_twice", f"{__name__}:plain_reward"), ("unit_twice", f"{__name__}:words"))
    with pytest.raises(RewardError, match="several installed plugins declare this name"):
        resolve_reward("unit_twice", plugins=found)


def test_kwargs_are_checked_against_the_signature():
    check_kwargs(resolve_reward("unit_length_chars"), {"scale": 2.0})
    with pytest.raises(RewardError, match=r"kwargs \['scal'\] do not fit.*It accepts: scale"):
        check_kwargs(resolve_reward("unit_length_chars"), {"scal": 2.0})
    check_kwargs(resolve_reward("unit_per_sample"), {"bonus": 1.0})  # per-sample: the inner signature counts
    with pytest.raises(RewardError, match="It accepts: mode, k, pattern"):
        check_kwargs(resolve_reward("ranking"), {"mdoe": "rating"})


def test_reward_errors_survive_pickling_with_their_fields():
    err = RewardError("format", "returned a non-finite score (nan)", rollout_id="s1/0", hint="Fix it.")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reward, back.rollout_id, back.cause, str(back)) == ("format", "s1/0", err.cause, str(err))
    assert str(err) == "Reward 'format' failed on rollout 's1/0': returned a non-finite score (nan) Fix it."


def test_reward_modules_import_neither_ray_vllm_nor_deepspeed():
    code = (
        "import sys\n"
        "import rewards.api, rewards.rules, rewards.local, rewards.cli, rl.rollout_io\n"
        "rewards.api.resolve_reward('format'); rewards.api.list_rewards()\n"
        "bad = sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
