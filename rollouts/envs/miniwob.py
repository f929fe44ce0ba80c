"""MiniWoB++ web tasks in real headless Chromium, behind the multi-turn `Environment` protocol (rollouts.envs.base).

Setup (see shared/STACK.md): `pip install -e ".[gui]"` (miniwob==1.1.0, selenium) and Debian's browser with its own
driver, `bash cluster/install_gui_deps.sh` (`apt-get install -y chromium chromium-driver`). Then:

    from rollouts.envs.miniwob import MiniWoBConfig, MiniWoBEnv
    env = MiniWoBEnv(MiniWoBConfig(screenshot_dir="/tmp/shots"))
    obs = env.reset("enter-text", seed=3)
    print(obs.text)        # instruction + "input_text#tt [5] value=\"\" @(...)" lines
    result = env.step('The field is [5].\ntype(5, "Kasey")')
    env.close()

How it works: the task pages come from the miniwob wheel (`miniwob/html/miniwob/<task>.html`, opened as file://).
The pages are driven directly with selenium through MiniWoB's own page API (`core.startEpisodeReal`,
`core.getDOMInfo`, `core.elementClick`, `WOB_DONE_GLOBAL`, `WOB_RAW_REWARD_GLOBAL`), not through miniwob's gymnasium
env, so that start-up flags, per-command timeouts and crash recovery are ours. Element ids are MiniWoB's element refs:
stable within an episode and identical for the same (task, seed), because every reset reloads the page and seeds the
page's `Math.random` (seedrandom) before the task instance is generated.

Reward: MiniWoB's raw reward (not time-discounted) > 0 means success (reward 1.0); note that this counts partial
credit as success on tasks that give it (click-checkboxes: more boxes right than wrong). `info["raw_reward"]` keeps
the raw value for stricter reward functions.

Robustness: chromedriver starts in its own process group (Chromium joins it), every WebDriver command has a timeout
(`command_timeout_s`), and any browser failure during a step ends the episode with `info["env_error"]`, kills the
whole group and starts a fresh browser on the next reset. Process groups of environments whose owning process died
without cleaning up (e.g. a Ray actor killed after a timeout) are reaped when a new browser starts on the same host.
The browser's process management is in rollouts/envs/browser.py, the tasks' milestones (ATP) in miniwob_tasks.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollouts.envs.actions import Action, ActionParseError, parse_action
from rollouts.envs.base import Element, EnvStartError, EnvUsageError, Observation, StepResult
from rollouts.envs.browser import Browser, press_key
from rollouts.envs.miniwob_tasks import TASKS, MilestoneContext

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = (
    "click-button", "click-link", "enter-text", "click-checkboxes", "login-user", "enter-password", "click-option",
    "focus-text", "click-dialog", "click-tab", "click-test", "click-test-2",
)
TASK_AREA = (160, 210)
"""MiniWoB's task area (width, height) in CSS pixels at the page's top-left; screenshots are cropped to it."""


@dataclass(frozen=True, kw_only=True)
class MiniWoBConfig:
    """How MiniWoB++ environments run. Unset paths fall back to the env vars of shared/STACK.md, then Debian's."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Tasks `reset` accepts (MiniWoB page names); each must exist in the miniwob wheel."""
    max_steps: int = 8
    """Actions per episode; the step that reaches it ends the episode (truncated, failed)."""
    episode_timeout_s: float = 300.0
    """Wall-clock limit per episode, model thinking time included; also the page's own timer."""
    command_timeout_s: float = 20.0
    """Limit on one WebDriver command; a browser that does not answer in time is treated as dead."""
    start_attempts: int = 2
    """Browser (re)starts `reset` tries before raising EnvStartError."""
    screenshot_dir: str | None = None
    """Save a PNG of the task area for every observation under this directory (None: no screenshots)."""
    chrome_binary: str = ""
    """Chromium executable; "" = $MINIWOB_CHROME_BINARY or /usr/bin/chromium."""
    chromedriver: str = ""
    """chromedriver executable (same major version as Chromium); "" = $MINIWOB_CHROMEDRIVER or /usr/bin/chromedriver."""
    html_dir: str = ""
    """Directory of the task pages; "" = the installed miniwob wheel's html/miniwob."""
    window_size: tuple[int, int] = (500, 400)
    """Browser window (width, height); headless Chromium's viewport is ~143 px shorter, and must hold 160x210."""
    max_elements: int = 60
    """Elements listed in the observation text (the rest are summarised in one line)."""
    max_text_chars: int = 80
    """Longest element text shown; longer texts are cut with "..."."""
    scroll_pixels: int = 100
    """Distance of one scroll(...) action."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "start_attempts", "max_elements", "max_text_chars", "scroll_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"MiniWoBConfig.{name}={getattr(self, name)}, but it must be >= 1.")
        for name in ("episode_timeout_s", "command_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MiniWoBConfig.{name}={getattr(self, name)}, but it must be > 0 seconds.")
        if not self.tasks:
            raise ValueError("MiniWoBConfig.tasks is empty; list at least one MiniWoB task, e.g. ('click-button',).")


def _default_html_dir() -> Path:
    spec = importlib.util.find_spec("miniwob")  # finds the wheel without importing it (its import registers gym envs)
    if spec is None or not spec.submodule_search_locations:
        raise EnvStartError("The miniwob package is not installed: pip install -e '.[gui]' (miniwob==1.1.0, "
                            "selenium), or set MiniWoBConfig.html_dir to a MiniWoB++ html/miniwob directory.")
    return Path(next(iter(spec.submodule_search_locations))) / "html" / "miniwob"


def resolve_paths(cfg: MiniWoBConfig) -> tuple[str, str, Path]:
    """(chromium, chromedriver, task page directory), checked to exist; raises EnvStartError saying what to do."""
    chrome = cfg.chrome_binary or os.environ.get("MINIWOB_CHROME_BINARY") or "/usr/bin/chromium"
    driver = cfg.chromedriver or os.environ.get("MINIWOB_CHROMEDRIVER") or "/usr/bin/chromedriver"
    for what, path in (("Chromium", chrome), ("chromedriver", driver)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise EnvStartError(f"{what} not found at {path}. Install Debian's chromium and chromium-driver with "
                                "`bash cluster/install_gui_deps.sh` (as root), or point MINIWOB_CHROME_BINARY / "
                                "MINIWOB_CHROMEDRIVER (or MiniWoBConfig) at a matching pair.")
    html = Path(cfg.html_dir) if cfg.html_dir else _default_html_dir()
    missing = [task for task in cfg.tasks if not (html / f"{task}.html").is_file()]
    if missing:
        raise ValueError(f"MiniWoBConfig.tasks: task page(s) {missing} not found in {html}. Task names are the "
                         "page names there, e.g. click-button, enter-text.")
    return chrome, driver, html


# ---------------------------------------------------------------------------------------------------------------------
# The environment

_JS_START = """
Math.seedrandom(String(arguments[0]));
core.EPISODE_MAX_TIME = arguments[1];
core.startEpisodeReal();
return WOB_TASK_READY;
"""
_JS_STATE = """
var u = core.getUtterance();
return {utterance: (typeof u === 'object' && u !== null) ? u.utterance : u, dom: core.getDOMInfo(),
        done: WOB_DONE_GLOBAL, raw: WOB_RAW_REWARD_GLOBAL, reason: WOB_REWARD_REASON,
        viewport: [window.innerWidth, window.innerHeight]};
"""
_JS_CLEAR = "var el = core.previousDOMInfo[arguments[0]]; var r = core.elementClick(arguments[0]); " \
            "if (r === true && 'value' in el) { el.value = ''; } return r;"
_JS_REF_AT = "var e = document.elementFromPoint(arguments[0], arguments[1]); " \
             "return (e && e.dataset && e.dataset.wob_ref) ? +e.dataset.wob_ref : null;"
_TYPEABLE = ("input_text", "input_password", "input_email", "input_number", "input_search", "input_tel",
             "input_url", "input_date", "input_time", "textarea")
_LISTED = ("button", "a", "select", "option", "textarea", "label")


@dataclass(kw_only=True)
class _Episode:
    task: str
    seed: int
    fields: dict[str, str]
    started: float
    steps: int = 0
    done: bool = False
    reached: set[str] = field(default_factory=set)


class MiniWoBEnv:
    """One MiniWoB++ environment (one browser). Implements `rollouts.envs.base.Environment`; see the module docstring.

    seed: draws the episode seeds when `reset` gets none. name: prefix of screenshot files (e.g. "env3").
    """

    def __init__(self, cfg: MiniWoBConfig | None = None, *, seed: int = 0, name: str = "env0") -> None:
        self.cfg = cfg or MiniWoBConfig()
        self.name = name
        self._chrome, self._driver_path, self._html = resolve_paths(self.cfg)
        self._rng = random.Random(seed)
        self._browser: Browser | None = None
        self._episode: _Episode | None = None
        self._num_episodes = 0
        self._elements: dict[int, Element] = {}
        self._viewport = (0, 0)
        self._last_obs: Observation | None = None

    # -- protocol ------------------------------------------------------------------------------------------------------

    def reset(self, task: str, seed: int | None = None) -> Observation:
        if task not in self.cfg.tasks:
            raise EnvUsageError(f"Unknown task {task!r}: this environment runs {list(self.cfg.tasks)} "
                                "(MiniWoBConfig.tasks).")
        seed = self._rng.randrange(2**31) if seed is None else int(seed)
        self._episode = None
        last_err: Exception | None = None
        for attempt in range(1, self.cfg.start_attempts + 1):
            try:
                if self._browser is None:
                    self._browser = Browser(self._chrome, self._driver_path, window_size=self.cfg.window_size,
                                           command_timeout_s=self.cfg.command_timeout_s)
                return self._begin(task, seed)
            except Exception as err:  # a dead or wedged browser: start a fresh one and try again
                last_err = err
                log.warning("%s: reset(%s, %d) attempt %d/%d failed (%s); restarting the browser.", self.name,
                            task, seed, attempt, self.cfg.start_attempts, _short(err))
                self._kill_browser()
        raise EnvStartError(f"{self.name}: could not start {task} (seed {seed}) after {self.cfg.start_attempts} "
                            f"browser start(s): {_short(last_err)}. Check that {self._chrome} and "
                            f"{self._driver_path} are the same major version and start by hand with --headless.")

    def step(self, action_text: str) -> StepResult:
        ep = self._episode
        if ep is None or ep.done:
            raise EnvUsageError(f"{self.name}: step() needs a running episode; call reset(task, seed) first "
                                "(the last episode is done)." if ep else f"{self.name}: step() before reset().")
        ep.steps += 1
        if time.monotonic() - ep.started > self.cfg.episode_timeout_s:
            return self._end(ep, reason="episode timeout", truncated=True)
        try:
            action = parse_action(action_text)
        except ActionParseError as err:
            return self._after_failed_parse(ep, str(err))
        try:
            target, action_error = self._execute(action)
            state = self._read_state()
            obs = self._observe(ep, state)
        except Exception as err:  # the browser died or stopped answering: end the episode, never hang or raise
            log.warning("%s: browser failed during step %d of %s: %s", self.name, ep.steps, ep.task, _short(err))
            self._kill_browser()
            return self._end(ep, env_error=f"{type(err).__name__}: {_short(err)}", action=action)
        self._update_milestones(ep, action, target)
        obs = self._with_milestones(obs, ep)
        self._last_obs = obs
        if state["done"]:
            raw = float(state["raw"])
            reason = str(state["reason"] or ("task succeeded" if raw > 0 else "task failed"))
            return self._end(ep, success=raw > 0, raw_reward=raw, reason=reason, action=action,
                             action_error=action_error, truncated=reason == "timed out")
        if action.kind == "done":
            return self._end(ep, reason="agent called done()", action=action)
        if ep.steps >= self.cfg.max_steps:
            return self._end(ep, reason="max steps", truncated=True, action=action, action_error=action_error)
        return StepResult(observation=obs, reward=0.0, done=False,
                          info=self._info(ep, action=action, action_error=action_error))

    def close(self) -> None:
        if self._browser is not None:
            self._browser.quit()
            self._browser = None
        self._episode = None

    def browser_pids(self) -> dict[str, list[int]]:
        """Live process ids of this environment's chromedriver and Chromium (for tests and debugging)."""
        return self._browser.pids() if self._browser else {"chromedriver": [], "chromium": []}

    # -- episode plumbing ----------------------------------------------------------------------------------------------

    def _begin(self, task: str, seed: int) -> Observation:
        assert self._browser is not None
        driver = self._browser.driver
        driver.get((self._html / f"{task}.html").as_uri())  # a fresh page per episode: no state leaks across seeds
        ready = driver.execute_script(_JS_START, seed, int(self.cfg.episode_timeout_s * 1000))
        deadline = time.monotonic() + 2.0
        while not ready and time.monotonic() < deadline:
            time.sleep(0.05)
            ready = driver.execute_script("return WOB_TASK_READY;")
        if not ready:
            raise RuntimeError(f"task page {task} did not become ready within 2 s")
        self._num_episodes += 1
        ep = _Episode(task=task, seed=seed, fields={}, started=time.monotonic())
        state = self._read_state()
        spec = TASKS.get(task)
        if spec is not None:
            match = re.fullmatch(spec.instruction_pattern, state["utterance"])
            if match is None:
                log.warning("%s: instruction %r does not match the %s pattern; its milestones cannot be reached.",
                            self.name, state["utterance"], task)
            ep.fields = match.groupdict() if match else {}
        self._episode = ep
        self._last_obs = self._with_milestones(self._observe(ep, state), ep)
        return self._last_obs

    def _kill_browser(self) -> None:
        if self._browser is not None:
            self._browser.kill()
            self._browser = None

    def _after_failed_parse(self, ep: _Episode, message: str) -> StepResult:
        assert self._last_obs is not None
        if ep.steps >= self.cfg.max_steps:
            return self._end(ep, reason="max steps", truncated=True, parse_error=message)
        obs = dataclasses.replace(self._last_obs, step=ep.steps)
        self._last_obs = obs
        return StepResult(observation=obs, reward=0.0, done=False, info=self._info(ep, parse_error=message))

    def _end(self, ep: _Episode, *, success: bool = False, reason: str | None = None, **info: Any) -> StepResult:
        ep.done = True
        if success and ep.task in TASKS:  # success implies every milestone of the task
            ep.reached.update(m.name for m in TASKS[ep.task].milestones)
        assert self._last_obs is not None
        obs = self._with_milestones(dataclasses.replace(self._last_obs, step=ep.steps), ep)
        self._last_obs = obs
        return StepResult(observation=obs, reward=1.0 if success else 0.0, done=True,
                          info=self._info(ep, success=success, reason=reason, **info))

    def _info(self, ep: _Episode, *, action: Action | None = None, parse_error: str | None = None,
              action_error: str | None = None, env_error: str | None = None, success: bool = False,
              raw_reward: float | None = None, reason: str | None = None, truncated: bool = False) -> dict[str, Any]:
        milestones = TASKS[ep.task].milestones if ep.task in TASKS else ()
        reached = [m.name for m in milestones if m.name in ep.reached]
        return {
            "task": ep.task, "seed": ep.seed, "step": ep.steps, "action": str(action) if action else None,
            "penalty": parse_error is not None, "parse_error": parse_error, "action_error": action_error,
            "env_error": env_error, "success": success, "raw_reward": raw_reward, "reason": reason,
            "truncated": truncated, "elapsed_s": round(time.monotonic() - ep.started, 3),
            "milestones_reached": reached, "num_milestones": len(milestones),
            "progress": len(reached) / len(milestones) if milestones else 0.0,
        }

    def _update_milestones(self, ep: _Episode, action: Action, target: Element | None) -> None:
        spec = TASKS.get(ep.task)
        if spec is None:
            return
        ctx = MilestoneContext(fields=ep.fields, elements=tuple(self._elements.values()), action=action,
                               target=target)
        ep.reached.update(m.name for m in spec.milestones if m.name not in ep.reached and m.check(ctx))

    def _with_milestones(self, obs: Observation, ep: _Episode) -> Observation:
        names = tuple(m.name for m in TASKS[ep.task].milestones) if ep.task in TASKS else ()
        return dataclasses.replace(obs, milestones=names, milestones_reached=tuple(n for n in names if n in ep.reached))

    # -- the page ------------------------------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        assert self._browser is not None
        state = self._browser.driver.execute_script(_JS_STATE)
        self._elements = {}
        _flatten(state["dom"], self._elements, label_text="")
        self._viewport = tuple(state["viewport"])
        state["utterance"] = str(state["utterance"] or "")
        return state

    def _observe(self, ep: _Episode, state: Mapping[str, Any]) -> Observation:
        listed = [e for e in self._elements.values()
                  if e.tag != "body" and (e.text or e.focused or e.tag.startswith("input_") or e.tag in _LISTED)]
        lines = [f"Task: {state['utterance']}", "Elements:"]
        lines += [e.describe(self.cfg.max_text_chars) for e in listed[: self.cfg.max_elements]]
        if len(listed) > self.cfg.max_elements:
            lines.append(f"... {len(listed) - self.cfg.max_elements} more elements not shown")
        return Observation(task=ep.task, instruction=state["utterance"], text="\n".join(lines), elements=tuple(listed),
                           seed=ep.seed, step=ep.steps, screenshot_path=self._screenshot(ep))

    def _screenshot(self, ep: _Episode) -> str | None:
        if self.cfg.screenshot_dir is None:
            return None
        assert self._browser is not None
        png = self._browser.driver.get_screenshot_as_png()
        path = Path(self.cfg.screenshot_dir) / self.name / f"ep{self._num_episodes:05d}_step{ep.steps:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from PIL import Image

            Image.open(io.BytesIO(png)).crop((0, 0, *TASK_AREA)).save(path)
        except ImportError:  # no Pillow: keep the whole viewport
            path.write_bytes(png)
        return str(path)

    def _execute(self, action: Action) -> tuple[Element | None, str | None]:
        """Run `action` in the page; returns (the element it hit, why it could not run or None)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

        assert self._browser is not None
        driver = self._browser.driver
        if action.kind in ("click", "type") and not action.is_coordinate_click:
            target = self._elements.get(action.element_id)
            if target is None:
                return None, (f"No element with id {action.element_id} on the page; use an id in brackets from "
                              "the element list.")
            if action.kind == "type" and target.tag not in _TYPEABLE:
                return target, f"Element {action.element_id} is a {target.tag}; type() needs a text field."
            result = driver.execute_script(_JS_CLEAR if action.kind == "type" else
                                           "return core.elementClick(arguments[0]);", action.element_id)
            if result is not True:
                return target, f"The page could not click element {action.element_id}: {result}"
            if action.kind == "type":
                ActionChains(driver, duration=0).send_keys(action.text).perform()
            return target, None
        if action.is_coordinate_click:
            x, y = round(action.x), round(action.y)
            if not (x < self._viewport[0] and y < self._viewport[1]):
                return None, f"Point ({x}, {y}) is outside the page ({self._viewport[0]}x{self._viewport[1]} px)."
            ref = driver.execute_script(_JS_REF_AT, x, y)
            chain = ActionChains(driver, duration=0)
            chain.w3c_actions.pointer_action.move_to_location(x, y)
            chain.w3c_actions.pointer_action.click()
            chain.w3c_actions.perform()
            return self._elements.get(ref) if ref is not None else None, None
        if action.kind == "press":
            press_key(driver, action.key)
        elif action.kind == "scroll":
            dx, dy = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[action.direction]
            origin = ScrollOrigin.from_viewport(TASK_AREA[0] // 2, TASK_AREA[1] // 2)
            ActionChains(driver).scroll_from_origin(origin, dx * self.cfg.scroll_pixels,
                                                    dy * self.cfg.scroll_pixels).perform()
        return None, None


def _flatten(node: Mapping[str, Any], out: dict[int, Element], *, label_text: str) -> None:
    """MiniWoB's DOM info tree -> Elements by ref, in document order. Text pseudo-nodes ("t") fold into their parent's
    text; a checkbox or radio takes the text of the <label> around it."""
    tag = str(node["tag"]).lower()
    children = node.get("children") or []
    own_text = node.get("text") or " ".join(c.get("text", "") for c in children if c["tag"] == "t")
    own_text = " ".join(str(own_text).split())
    value, checked = node.get("value"), None
    if tag in ("input_checkbox", "input_radio"):
        checked, value = bool(value), None
    text = label_text if tag in ("input_checkbox", "input_radio") and not own_text else own_text
    if node["ref"] > 0:
        out[node["ref"]] = Element(
            element_id=node["ref"], tag=tag, text=text, dom_id=str(node.get("id") or ""),
            value=None if value is None else str(value), checked=checked, focused=bool(node.get("focused")),
            bbox=(float(node["left"]), float(node["top"]), float(node["width"]), float(node["height"])))
    for child in children:
        if child["tag"] != "t":
            _flatten(child, out, label_text=own_text if tag == "label" else "")


def _short(err: BaseException | None, limit: int = 300) -> str:
    text = " ".join(str(err).split()) if err is not None else "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."
