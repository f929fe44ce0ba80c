"""MiniWoB++ milestones (rollouts/envs/miniwob_tasks.py) checked on hand-built pages; the same checks in real Chromium
run in tests/integration/test_gui_env.py."""

from __future__ import annotations

import re

from rollouts.envs.actions import parse_action
from rollouts.envs.base import Element
from rollouts.envs.miniwob_tasks import TASKS, MilestoneContext


def reached(task: str, instruction: str, elements: list[Element], action: str, target: Element | None) -> list[str]:
    spec = TASKS[task]
    fields = re.fullmatch(spec.instruction_pattern, instruction).groupdict()
    ctx = MilestoneContext(fields=fields, elements=tuple(elements), action=parse_action(action), target=target)
    return [m.name for m in spec.milestones if m.check(ctx)]


def test_enter_text_needs_the_exact_text_then_a_click_on_submit():
    instruction = 'Enter "Kasey" into the text field and press Submit.'
    field = Element(element_id=5, tag="input_text", dom_id="tt", value="Kasey")
    submit = Element(element_id=6, tag="button", dom_id="subbtn", text="Submit")
    assert reached("enter-text", instruction, [field, submit], 'type(5, "Kasey")', field) == ["text entered"]
    assert reached("enter-text", instruction, [field, submit], "click(6)", submit) == ["text entered",
                                                                                      "submit clicked"]
    wrong = Element(element_id=5, tag="input_text", dom_id="tt", value="Kase")
    assert reached("enter-text", instruction, [wrong, submit], "click(6)", submit) == ["submit clicked"]


def test_checkboxes_must_match_the_listed_labels_exactly():
    instruction = "Select 7Zo, ZJN and click Submit."
    boxes = [Element(element_id=i, tag="input_checkbox", text=t, checked=c)
             for i, (t, c) in enumerate([("7Zo", True), ("ZJN", True), ("abc", False)], start=4)]
    assert reached("click-checkboxes", instruction, boxes, "click(5)", boxes[1]) == ["targets checked"]
    extra = [*boxes[:2], Element(element_id=6, tag="input_checkbox", text="abc", checked=True)]
    assert reached("click-checkboxes", instruction, extra, "click(6)", extra[2]) == []
    none = [Element(element_id=4, tag="input_checkbox", text="x", checked=False)]
    assert reached("click-checkboxes", "Select nothing and click Submit.", none, "scroll(down)", None) == [
        "targets checked"]


def test_a_click_on_the_target_button_by_its_text():
    ok = Element(element_id=4, tag="button", text="Submit")
    other = Element(element_id=5, tag="button", text="Cancel")
    instruction = 'Click on the "Submit" button.'
    assert reached("click-button", instruction, [ok, other], "click(4)", ok) == ["target button clicked"]
    assert reached("click-button", instruction, [ok, other], "click(5)", other) == []
    assert reached("click-button", instruction, [ok, other], 'type(4, "x")', ok) == []  # not a click
