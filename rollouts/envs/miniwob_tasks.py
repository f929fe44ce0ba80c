"""MiniWoB++ tasks' milestones, for Average Task Progress (ATP): which instruction each task shows and which
intermediate states count as progress. Pure: checks read the page's elements and the last action, no browser.

`rollouts.envs.miniwob.MiniWoBEnv` matches the instruction against `TaskSpec.instruction_pattern` at reset and runs
every milestone's check after each step; an episode that succeeds reaches every milestone of its task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rollouts.envs.actions import Action
from rollouts.envs.base import Element


@dataclass(frozen=True, kw_only=True)
class MilestoneContext:
    """What a milestone check sees after a step."""

    fields: Mapping[str, str]
    """Named groups of the task's instruction pattern (the target text, username, ...)."""
    elements: tuple[Element, ...]
    action: Action | None
    target: Element | None
    """The element the action clicked or typed into (None for other actions or empty space)."""


@dataclass(frozen=True, kw_only=True)
class Milestone:
    name: str
    check: Callable[[MilestoneContext], bool]


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A task's instruction pattern and milestones. Success reaches every milestone."""

    instruction_pattern: str
    milestones: tuple[Milestone, ...]


def _value_is(dom_id: str, key: str) -> Callable[[MilestoneContext], bool]:
    return lambda c: key in c.fields and any(e.dom_id == dom_id and e.value == c.fields[key] for e in c.elements)


def _clicked(*, dom_id: str | None = None, tag: str | None = None, text_key: str | None = None,
             text: str | None = None) -> Callable[[MilestoneContext], bool]:
    def check(c: MilestoneContext) -> bool:
        t = c.target
        if t is None or c.action is None or c.action.kind != "click":
            return False
        wanted = c.fields.get(text_key) if text_key else text
        return ((dom_id is None or t.dom_id == dom_id) and (tag is None or t.tag == tag)
                and (wanted is None or t.text == wanted))
    return check


def _checked_exactly(key: str, *, kind: str) -> Callable[[MilestoneContext], bool]:
    """The checked boxes (by label text) are exactly the comma-separated names in fields[key] ("nothing" = none)."""
    def check(c: MilestoneContext) -> bool:
        if key not in c.fields:
            return False
        raw = c.fields[key]
        wanted = set() if raw == "nothing" else {name.strip() for name in raw.split(",")}
        checked = {e.text for e in c.elements if e.tag == f"input_{kind}" and e.checked}
        return checked == wanted
    return check


TASKS: dict[str, TaskSpec] = {
    "click-button": TaskSpec(instruction_pattern=r'Click on the "(?P<target>.*)" button\.', milestones=(
        Milestone(name="target button clicked", check=_clicked(tag="button", text_key="target")),)),
    "click-link": TaskSpec(instruction_pattern=r'Click on the link "(?P<target>.*)"\.', milestones=(
        Milestone(name="target link clicked", check=_clicked(text_key="target")),)),
    "enter-text": TaskSpec(
        instruction_pattern=r'Enter "(?P<target>.*)" into the text field and press Submit\.', milestones=(
            Milestone(name="text entered", check=_value_is("tt", "target")),
            Milestone(name="submit clicked", check=_clicked(dom_id="subbtn")))),
    "click-checkboxes": TaskSpec(instruction_pattern=r"Select (?P<targets>.*) and click Submit\.", milestones=(
        Milestone(name="targets checked", check=_checked_exactly("targets", kind="checkbox")),
        Milestone(name="submit clicked", check=_clicked(dom_id="subbtn")))),
    "login-user": TaskSpec(
        instruction_pattern=r'Enter the username "(?P<username>.*)" and the password "(?P<password>.*)" into the '
                            r"text fields and press login\.",
        milestones=(Milestone(name="username entered", check=_value_is("username", "username")),
                    Milestone(name="password entered", check=_value_is("password", "password")),
                    Milestone(name="login clicked", check=_clicked(dom_id="subbtn")))),
    "enter-password": TaskSpec(
        instruction_pattern=r'Enter the password "(?P<password>.*)" into both text fields and press submit\.',
        milestones=(Milestone(name="password entered", check=_value_is("password", "password")),
                    Milestone(name="password verified", check=_value_is("verify", "password")),
                    Milestone(name="submit clicked", check=_clicked(dom_id="subbtn")))),
    "click-option": TaskSpec(instruction_pattern=r"Select (?P<target>.*) and click Submit\.", milestones=(
        Milestone(name="option selected", check=_checked_exactly("target", kind="radio")),
        Milestone(name="submit clicked", check=_clicked(dom_id="subbtn")))),
    "focus-text": TaskSpec(instruction_pattern=r"Focus into the textbox\.", milestones=(
        Milestone(name="textbox clicked", check=_clicked(dom_id="tt")),)),
    "click-dialog": TaskSpec(instruction_pattern=r'Close the dialog box by clicking the "x"\.', milestones=(
        Milestone(name="close button clicked", check=_clicked(tag="button")),)),
    "click-tab": TaskSpec(instruction_pattern=r"Click on (?P<target>Tab #\d)\.", milestones=(
        Milestone(name="target tab clicked", check=_clicked(text_key="target")),)),
    "click-test": TaskSpec(instruction_pattern=r"Click the button\.", milestones=(
        Milestone(name="button clicked", check=_clicked(tag="button")),)),
    "click-test-2": TaskSpec(instruction_pattern=r"Click button ONE\.", milestones=(
        Milestone(name="button ONE clicked", check=_clicked(tag="button", text="ONE")),)),
}
"""Milestones per task for Average Task Progress. Tasks not listed here run with no milestones (ATP 0)."""
