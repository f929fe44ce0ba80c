"""The multi-turn environment protocol shared by GUI environments, and the data they return.

An episode:

    obs = env.reset("click-button", seed=7)         # Observation: instruction + element list (+ screenshot path)
    while True:
        result = env.step(completion_text)          # the LAST action in the text is executed (rollouts.envs.actions)
        if result.done:
            break
        obs = result.observation
    env.close()

Rules every environment follows:
- `step` never raises for anything the policy wrote: an unparsable action is a failed step (`info["penalty"]` set,
  the page untouched); a well-formed action that cannot be executed (unknown element id, point off the page) is a
  failed step with `info["action_error"]` and no penalty flag.
- A browser or driver that dies or stops answering ends the episode (`done=True`, reward 0, `info["env_error"]`);
  the environment restarts it on the next `reset` instead of hanging or raising.
- `reward` is the task-success reward only (1.0 on success, else 0.0), given on the final step. Shaping (step
  efficiency, unparsable-action penalties, milestone progress) belongs to the reward functions, which read `info`.
- Calling `step` before `reset` or after `done` is a caller bug and raises `EnvUsageError`.

Milestones (AndroidLens' Average Task Progress): each task declares named milestones; `milestones_reached` grows
monotonically during an episode and ATP = reached / declared (`Observation.progress`). Success reaches them all.

Everything here is frozen and JSON-friendly so it crosses Ray actor boundaries cheaply; this module imports neither
ray nor selenium.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict


class EnvUsageError(ValueError):
    """An environment method was called out of order (step before reset or after done) or with an unknown task."""


class EnvStartError(RuntimeError):
    """The environment's backend (browser, driver) could not be started; the message says what to install or set."""


@dataclass(frozen=True, kw_only=True)
class Element:
    """One visible page element, as listed in the observation text."""

    element_id: int
    """The id actions refer to: `click(element_id)`, `type(element_id, "...")`. Stable within an episode."""
    tag: str
    """Lower-case tag; inputs carry their type: `input_text`, `input_password`, `input_checkbox`, `button`, `a`."""
    text: str = ""
    """The element's own visible text (for a checkbox or radio inside a <label>, the label's text)."""
    dom_id: str = ""
    """The HTML `id` attribute, if any."""
    value: str | None = None
    """Current value of a text field or textarea; None for other elements."""
    checked: bool | None = None
    """Checkbox/radio state; None for other elements."""
    focused: bool = False
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """(left, top, width, height) in CSS pixels from the page's top-left corner."""

    @property
    def center(self) -> tuple[float, float]:
        left, top, width, height = self.bbox
        return left + width / 2, top + height / 2

    def describe(self, max_text_chars: int = 80) -> str:
        """One line: `button#subbtn "Submit" [12] @(10,75,52x22)`, with value/checked/focused after the id when set.

        The text comes before the id so that a model which copies the target's text (`"Submit" [`) continues with
        its id by plain copying (the embedded 135M model picks the named element more than twice as often as with
        the id first; rollouts/context.py's prompt asks for that copy line before the action)."""
        parts = [self.tag + (f"#{self.dom_id}" if self.dom_id else "")]
        if self.text:
            text = self.text if len(self.text) <= max_text_chars else self.text[: max_text_chars - 3] + "..."
            parts.append(_quote(text))
        parts.append(f"[{self.element_id}]")
        if self.value is not None:
            parts.append(f"value={_quote(self.value)}")
        if self.checked is not None:
            parts.append("checked" if self.checked else "unchecked")
        if self.focused:
            parts.append("focused")
        left, top, width, height = (round(v) for v in self.bbox)
        parts.append(f"@({left},{top},{width}x{height})")
        return " ".join(parts)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What the policy sees at one turn."""

    task: str
    """Task name, e.g. "click-button"."""
    instruction: str
    """The task's natural-language instruction (MiniWoB's utterance)."""
    text: str
    """Prompt-ready text: the instruction followed by one line per element (see `Element.describe`)."""
    elements: tuple[Element, ...] = ()
    seed: int | None = None
    """The episode's seed: (task, seed) identifies the task instance."""
    step: int = 0
    """Actions taken so far in this episode (0 after reset)."""
    screenshot_path: str | None = None
    """PNG of the task area when the environment saves screenshots, else None."""
    milestones: tuple[str, ...] = ()
    """The task's declared milestones, in order."""
    milestones_reached: tuple[str, ...] = ()
    """Milestones reached so far (a subset of `milestones`, in declaration order)."""

    @property
    def progress(self) -> float:
        """Average Task Progress of the episode so far: reached / declared milestones (0.0 when none declared)."""
        return len(self.milestones_reached) / len(self.milestones) if self.milestones else 0.0


class StepInfo(TypedDict):
    """The `info` of every StepResult; all keys are always present and JSON-serialisable."""

    task: str
    seed: int
    """The seed the episode was reset with (drawn by the environment when reset got None)."""
    step: int
    """1-based index of this step within the episode."""
    action: str | None
    """Canonical text of the executed action, None when the answer did not parse."""
    penalty: bool
    """True when the answer held no valid action (an unparsable action, to be penalised)."""
    parse_error: str | None
    """ActionParseError message for an unparsable answer."""
    action_error: str | None
    """Why a well-formed action could not be executed (unknown element id, point off the page)."""
    env_error: str | None
    """Browser/driver failure that ended the episode; the backend is restarted on the next reset."""
    success: bool
    """The task reported success (MiniWoB: raw reward > 0)."""
    raw_reward: float | None
    """The task's own reward in [-1, 1] once it ended (MiniWoB's raw reward, not time-discounted), else None."""
    reason: str | None
    """Why the episode ended: the task's reason, "agent called done()", "max steps", "episode timeout", or None."""
    truncated: bool
    """The episode hit `max_steps` or its time limit."""
    elapsed_s: float
    """Seconds since reset."""
    milestones_reached: list[str]
    num_milestones: int
    progress: float
    """Average Task Progress: len(milestones_reached) / num_milestones."""


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """The outcome of one `step`."""

    observation: Observation
    """The page after the action (for a final step, the last page seen)."""
    reward: float
    """1.0 when this step ended the episode with task success, else 0.0."""
    done: bool
    info: Mapping[str, Any] = field(default_factory=dict)
    """A `StepInfo`."""

    @property
    def success(self) -> bool:
        return bool(self.info.get("success", False))

    @property
    def penalised(self) -> bool:
        """True when the answer was unparsable."""
        return bool(self.info.get("penalty", False))

    @property
    def env_error(self) -> str | None:
        return self.info.get("env_error")


class Environment(Protocol):
    """A multi-turn text-action environment. Implementations: `rollouts.envs.miniwob.MiniWoBEnv`."""

    def reset(self, task: str, seed: int | None = None) -> Observation:
        """Start an episode of `task`; the same (task, seed) gives the same task instance. None draws a seed."""
        ...

    def step(self, action_text: str) -> StepResult:
        """Execute the last action in `action_text` (a model completion) and return what happened."""
        ...

    def close(self) -> None:
        """Release the backend (browser, driver, temp files). Safe to call twice."""
        ...
