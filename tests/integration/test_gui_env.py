"""MiniWoB++ in real headless Chromium (rollouts.envs.miniwob) and the Ray environment pool (rollouts.envs.pool).

Needs the `gui` extra (miniwob==1.1.0, selenium) and Debian's chromium + chromium-driver (`make gui`, or
`bash cluster/install_gui_deps.sh`); without them every test here is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import time

import pytest

from rollouts.envs.base import Element, EnvStartError, EnvUsageError, Observation, StepInfo, StepResult

for _module in ("selenium", "miniwob"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed: pip install -e '.[gui]' (miniwob==1.1.0, selenium), or `make gui`.",
                    allow_module_level=True)

from rollouts.envs.miniwob import MiniWoBConfig, MiniWoBEnv, resolve_paths  # noqa: E402

try:
    resolve_paths(MiniWoBConfig())
except EnvStartError as _err:
    pytest.skip(str(_err), allow_module_level=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environment = MiniWoBEnv(MiniWoBConfig(screenshot_dir=str(tmp_path_factory.mktemp("shots"))), seed=0)
    yield environment
    environment.close()


def _quoted(obs: Observation) -> list[str]:
    return re.findall(r'"([^"]*)"', obs.instruction)


def _find(obs: Observation, **attrs) -> Element:
    matches = [e for e in obs.elements if all(getattr(e, k) == v for k, v in attrs.items())]
    assert matches, f"no element with {attrs} in:\n{obs.text}"
    return matches[0]


def _solve_click_button(obs: Observation) -> str:
    target = _find(obs, tag="button", text=_quoted(obs)[0])
    return f"Reasoning first: the target is {target.text!r}, element {target.element_id}.\nclick({target.element_id})"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scripted_policy_solves_click_button(env, seed):
    obs = env.reset("click-button", seed=seed)
    assert obs.instruction.startswith("Click on the") and obs.step == 0 and obs.seed == seed
    result = env.step(_solve_click_button(obs))
    assert (result.done, result.reward, result.success) == (True, 1.0, True)
    assert result.info["raw_reward"] > 0 and result.info["penalty"] is False and result.info["env_error"] is None
    assert result.info["progress"] == 1.0 and result.observation.progress == 1.0
    assert set(result.info) == StepInfo.__required_keys__


@pytest.mark.parametrize("seed", [0, 1])
def test_scripted_policy_solves_enter_text(env, seed):
    obs = env.reset("enter-text", seed=seed)
    target = _quoted(obs)[0]
    typed = env.step(f'type({_find(obs, dom_id="tt").element_id}, "{target}")')
    assert not typed.done and typed.reward == 0.0
    assert _find(typed.observation, dom_id="tt").value == target
    assert typed.observation.milestones_reached == ("text entered",) and typed.info["progress"] == 0.5
    result = env.step(f"click({_find(typed.observation, dom_id='subbtn').element_id})")
    assert (result.done, result.reward, result.success, result.info["step"]) == (True, 1.0, True, 2)
    assert result.observation.milestones_reached == ("text entered", "submit clicked")


def test_wrong_click_fails(env):
    seed = next(s for s in range(50) if len({e.text for e in env.reset("click-button", seed=s).elements
                                             if e.tag == "button"}) > 1)
    obs = env.reset("click-button", seed=seed)
    wrong = next(e for e in obs.elements if e.tag == "button" and e.text != _quoted(obs)[0])
    result = env.step(f"click({wrong.element_id})")
    assert (result.done, result.reward, result.success, result.info["raw_reward"]) == (True, 0.0, False, -1.0)
    assert result.info["progress"] == 0.0

    obs = env.reset("click-test-2", seed=0)  # a coordinate click on the wrong button
    x, y = _find(obs, text="TWO").center
    result = env.step(f"click({x:.0f}, {y:.0f})")
    assert (result.done, result.reward, result.info["raw_reward"]) == (True, 0.0, -1.0)


def test_wrong_text_fails_enter_text(env):
    obs = env.reset("enter-text", seed=3)
    env.step(f'type({_find(obs, dom_id="tt").element_id}, "{_quoted(obs)[0]}x")')
    result = env.step(f"click({_find(obs, dom_id='subbtn').element_id})")
    assert (result.done, result.reward, result.success) == (True, 0.0, False)
    assert result.observation.milestones_reached == ("submit clicked",)


def test_unparsable_action_is_a_penalised_failed_step_not_a_crash(env):
    obs = env.reset("click-button", seed=4)
    result = env.step("I am not sure which button to press.")
    assert (result.done, result.reward, result.penalised) == (False, 0.0, True)
    assert "No action found" in result.info["parse_error"] and result.info["action"] is None
    assert set(result.info) == StepInfo.__required_keys__
    assert result.observation.text == obs.text and result.observation.step == 1

    result = env.step("click(9999)")  # well formed but no such element: failed step, not penalised
    assert not result.done and not result.penalised
    assert "No element with id 9999" in result.info["action_error"]

    result = env.step(_solve_click_button(obs))  # the episode is still alive and solvable
    assert (result.done, result.reward, result.info["step"]) == (True, 1.0, 3)


def test_login_user_milestones_give_partial_progress(env):
    obs = env.reset("login-user", seed=5)
    username, password = _quoted(obs)
    assert obs.milestones == ("username entered", "password entered", "login clicked")
    env.step(f'type({_find(obs, dom_id="username").element_id}, "{username}")')
    result = env.step(f'type({_find(obs, dom_id="password").element_id}, "{password}")')
    assert result.info["milestones_reached"] == ["username entered", "password entered"]
    result = env.step("done()")
    assert (result.done, result.reward, result.info["reason"]) == (True, 0.0, "agent called done()")
    assert result.observation.progress == pytest.approx(2 / 3)


def test_same_seed_gives_the_same_task_instance(env):
    first = env.reset("click-checkboxes", seed=17)
    env.step("press(Tab)")
    again = env.reset("click-checkboxes", seed=17)
    assert again.text == first.text and again.elements == first.elements
    instructions = {env.reset("click-checkboxes", seed=s).instruction for s in range(4)}
    assert len(instructions) > 1


def test_screenshot_of_the_task_area_is_saved(env):
    from PIL import Image

    obs = env.reset("click-test", seed=0)
    assert obs.screenshot_path is not None and os.path.isfile(obs.screenshot_path)
    assert Image.open(obs.screenshot_path).size == (160, 210)


def test_max_steps_truncates_and_step_after_done_raises(env):
    env.reset("click-test", seed=0)
    results = [env.step("press(Tab)") for _ in range(env.cfg.max_steps)]
    assert [r.done for r in results] == [False] * (env.cfg.max_steps - 1) + [True]
    assert results[-1].info["truncated"] and results[-1].info["reason"] == "max steps"
    with pytest.raises(EnvUsageError, match="call reset"):
        env.step("done()")
    with pytest.raises(EnvUsageError, match="Unknown task 'no-such-task'"):
        env.reset("no-such-task", seed=0)


def test_episode_timeout_ends_the_episode():
    env = MiniWoBEnv(MiniWoBConfig(tasks=("click-test",), episode_timeout_s=1.0))
    try:
        env.reset("click-test", seed=0)
        time.sleep(1.2)
        result = env.step("click(1)")
        assert (result.done, result.reward, result.info["truncated"]) == (True, 0.0, True)
        assert result.info["reason"] == "episode timeout"
    finally:
        env.close()


def _group_alive(pids: dict[str, list[int]]) -> list[int]:
    alive = []
    for pid in pids["chromedriver"] + pids["chromium"]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("victim", ["chromium", "chromedriver"])
def test_killed_browser_fails_the_episode_and_the_next_reset_recovers(victim):
    env = MiniWoBEnv(MiniWoBConfig(tasks=("click-button",), command_timeout_s=10.0))
    try:
        obs = env.reset("click-button", seed=1)
        pids = env.browser_pids()
        assert pids["chromedriver"] and pids["chromium"]
        os.kill(pids[victim][0], signal.SIGKILL)
        start = time.monotonic()
        result = env.step(_solve_click_button(obs))
        assert time.monotonic() - start < 10.0
        assert (result.done, result.reward, result.success) == (True, 0.0, False)
        assert result.env_error and result.info["step"] == 1
        assert set(result.info) == StepInfo.__required_keys__
        assert _group_alive(pids) == []  # the old driver and browser are gone, not orphaned
        obs = env.reset("click-button", seed=1)  # a fresh browser
        assert env.browser_pids()["chromedriver"] != pids["chromedriver"]
        assert env.step(_solve_click_button(obs)).reward == 1.0
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------------------------
# The pool


def _hanging_env_factory(hang_s: float):
    """A fake environment whose step sleeps `hang_s` (defined in a function so Ray pickles it by value)."""

    class HangingEnv:
        def reset(self, task: str, seed: int | None = None) -> Observation:
            return Observation(task=task, instruction="wait", text="wait", seed=seed)

        def step(self, action_text: str) -> StepResult:
            time.sleep(hang_s)
            return StepResult(observation=Observation(task="t", instruction="", text=""), reward=0.0, done=False)

        def close(self) -> None:
            pass

    return lambda index, seed: HangingEnv()


def test_env_worker_is_a_plain_class():
    from rollouts.envs.pool import EnvWorker

    worker = EnvWorker(None, index=0, seed=0, make_env=_hanging_env_factory(0.0))
    assert worker.reset("t", 3).seed == 3
    assert worker.step("done()").done is False
    worker.close()


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_pool_steps_envs_and_replaces_a_dead_actor(ray_session):
    from rollouts.envs.pool import EnvPool

    pool = EnvPool(2, MiniWoBConfig(tasks=("click-button", "click-test-2")), call_timeout_s=60.0)
    try:
        obs = pool.reset([0, 1], ["click-button", "click-test-2"], [1, 2])
        results = pool.step([0, 1], [_solve_click_button(obs[0]), "no action here"])
        assert [(r.reward, r.done, r.penalised) for r in results] == [(1.0, True, False), (0.0, False, True)]

        os.kill(ray_session.get(pool._slots[1].actor.ready.remote()), signal.SIGKILL)  # the env actor's process
        failed = pool.step([1], ["click(4)"])[0]
        assert failed.done and failed.reward == 0.0 and "actor was replaced" in failed.env_error
        assert set(failed.info) == StepInfo.__required_keys__

        obs = pool.reset([1], ["click-test-2"], [2])  # the replacement actor works
        one = _find(obs[0], text="ONE")
        assert pool.step([1], [f"click({one.element_id})"])[0].reward == 1.0
        with pytest.raises(ValueError, match="out of range"):
            pool.step([2], ["done()"])
    finally:
        pool.close()


def test_pool_call_timeout_fails_the_step_instead_of_hanging(ray_session):
    from rollouts.envs.pool import EnvPool

    pool = EnvPool(1, call_timeout_s=2.0, make_env=_hanging_env_factory(120.0))
    try:
        pool.reset([0], ["any"], [7])
        start = time.monotonic()
        result = pool.step([0], ["click(1)"])[0]
        assert time.monotonic() - start < 10.0
        assert result.done and "did not answer within 2 s" in result.env_error and result.info["seed"] == 7
        assert pool.reset([0], ["any"], [8])[0].seed == 8
    finally:
        pool.close()
