"""What a GUI agent sees each turn: the chat rendering of screens as token ids, and the three history modes.

History modes (`gui.history`), for turn t of an episode (obs_t = the screen the t-th action is taken on, a_t = the
model's sampled answer):

- `full`: the whole episode as one token stream. The chat template is applied ONCE, to [system, user: obs_1]; each
  later screen is appended as the tokens of a rendered user turn (`ChatRenderer.observation_ids`), each answer as the
  sampled ids verbatim. Turn t's prompt = stream so far; it grows with every turn.
- `last_k`: a sliding window over that stream: the screens obs_{t-k} .. obs_t and the answers between them, anchored
  by rendering obs_{t-k} as the first user message (with a note of how many earlier steps are hidden). Past answers
  and screens inside the window are the same token ids as in `full`.
- `semantic_context` (SecAgent's semantic context): one user message holding a one-line summary of each past step
  plus the current screen. Summaries are written by a rule-based summariser (`rule_summary`: the action, the element
  it hit, errors, milestone progress), or by the model itself (`summariser: model`: the system prompt asks for a
  `Summary: ...` line before the action; `model_summary` extracts it, falling back to the rule when it is missing).
  At most `max_summaries` summaries of at most `summary_max_chars` characters are kept, so the prompt stays bounded
  whatever the episode length.

Whenever a prompt is rebuilt (every turn of `semantic_context`, every turn past k+1 of `last_k`), the turn starts a
new training segment (rollouts.multiturn); a turn whose prompt extends the previous stream stays in its segment.

Token-exactness: every piece is tokenized once, without adding special tokens (the template put them in), and never
decoded and re-tokenized: the learner trains on exactly the ids the sampler was given and produced.

This module imports neither ray nor vllm nor selenium; it needs only a Hugging Face tokenizer (duck-typed:
`apply_chat_template`, `encode`, `eos_token_id`, `decode`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rollouts.envs.actions import GRAMMAR, ActionParseError, parse_action
from rollouts.envs.base import Element, Observation

HistoryMode = Literal["full", "last_k", "semantic_context"]
HISTORY_MODES: tuple[str, ...] = ("full", "last_k", "semantic_context")

SYSTEM_PROMPT = (
    "You operate a web page to complete a task. Each turn you see the task and the page's elements, one per line: "
    'tag "text" [ID] @(left,top,width x height). Answer in two lines: first the target element\'s "text" [ID] '
    "copied from the list, then one action.\n"
    f"{GRAMMAR}"
)
"""Default system prompt for element-list observations. The copy line before the action lets a small model find the
id by copying (text, then the id that follows it in the list) rather than recalling it; see `DEMONSTRATION`."""
SCREENSHOT_SYSTEM_PROMPT = (
    "You operate a web page to complete a task. Each turn you see a screenshot of the page (160x210 pixels) and the "
    "task. Answer with one action on the last line, clicking by pixel coordinates: click(X, Y).\n" + GRAMMAR
)
"""Default system prompt for screenshot observations (vision-language models, `gui.observation: screenshot`)."""
DEMONSTRATION: tuple[tuple[str, str], ...] = ((
    'Task: Click on the "OK" button.\nElements:\nbutton "Cancel" [4] @(2,52,50x21)\nbutton "OK" [5] @(60,52,40x21)\n'
    'div "lorem ipsum dolor" [6] @(2,80,156x11)',
    '"OK" [5]\nclick(5)',
),)
"""A one-shot example exchange (made-up screen, answer) placed before the first screen (`gui.demonstration`). Without
it the embedded SmolLM2-135M rarely answers with a parsable action. Greedy, on the learning check's 64 held-out
click-button/click-link episodes it picks the named element in 29 with this copy-then-act answer and text-first
lines, against 12 with the earlier `[5] button "OK"` lines answered by a bare `click(5)` (chance level)."""
MODEL_SUMMARY_INSTRUCTION = (
    "\nBefore the action, write one line `Summary: <what this step does and why>`; it is all you will remember "
    "of this step."
)
_SUMMARY_LINE = re.compile(r"(?im)^[ \t*]*summary[ \t*]*:[ \t*]*(.+?)[ \t]*$")
_SENTINEL = "\u2063RECFORGE-ASSISTANT\u2063"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be split into turns the way multi-turn rollouts need."""


def truncate(text: str, max_chars: int) -> str:
    """`text` on one line, cut to `max_chars` with "..." when longer."""
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= max_chars else one_line[: max(max_chars - 3, 0)] + "..."


class ChatRenderer:
    """Chat-template rendering of an episode's turns as token ids, each piece tokenized exactly once.

    tokenizer: a Hugging Face tokenizer with a chat template. system_prompt: the system message ("" = none).
    image_placeholder: True for vision-language models: user content becomes [image, text] parts, so the template
    emits the model's image placeholder (e.g. Qwen2.5-VL's <|vision_start|><|image_pad|><|vision_end|>).
    demonstrations: (user, assistant) example exchanges placed between the system message and the first screen
    (text observations only).
    """

    def __init__(self, tokenizer: Any, *, system_prompt: str = SYSTEM_PROMPT, image_placeholder: bool = False,
                 demonstrations: Sequence[tuple[str, str]] = ()) -> None:
        if demonstrations and image_placeholder:
            raise ValueError("Demonstrations are text exchanges; they are not supported with screenshot observations.")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.image_placeholder = image_placeholder
        self.demonstrations = tuple(demonstrations)
        self.eos_token_id = tokenizer.eos_token_id
        self._close_after_eos, self._close_without_eos, self._turn_prefix, self._turn_suffix = self._split_template()

    def _messages(self, user_content: str) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        demos = [{"role": role, "content": text} for user, answer in self.demonstrations
                 for role, text in (("user", user), ("assistant", answer))]
        return [*system, *demos, {"role": "user", "content": self._content(user_content)}]

    def _content(self, text: str) -> Any:
        if not self.image_placeholder:
            return text
        return [{"type": "image"}, {"type": "text", "text": text}]

    def _render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _split_template(self) -> tuple[str, str, str, str]:
        """From the template, the text that closes an assistant turn (after EOS, and in full) and the text around a
        user turn's content, found by rendering a conversation with sentinel contents and taking differences."""
        base = [*self._messages("u"), {"role": "assistant", "content": _SENTINEL}]
        before = self._render(base, generation_prompt=False)
        marker = "\u2063RECFORGE-USER\u2063"
        after = self._render([*base, {"role": "user", "content": self._content(marker)}], generation_prompt=True)
        if not after.startswith(before) or before.count(_SENTINEL) != 1 or after.count(marker) != 1:
            raise ChatTemplateError(
                "The chat template does not render a conversation as a prefix of its continuation, so observations "
                "cannot be appended as tokens. Use a model whose template appends turns (ChatML, Llama-3, Qwen), or "
                "gui.history=semantic_context, which renders each turn from scratch."
            )
        close = before.split(_SENTINEL, 1)[1]  # e.g. "<|im_end|>\n"
        eos_text = self.tokenizer.decode([self.eos_token_id]) if self.eos_token_id is not None else ""
        close_after_eos = close[len(eos_text):] if eos_text and close.startswith(eos_text) else close
        prefix, suffix = after[len(before):].split(marker, 1)
        return close_after_eos, close, prefix, suffix

    def encode(self, text: str) -> list[int]:
        """Token ids of already-rendered text (no special tokens added: the template wrote them)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def first_prompt_ids(self, user_content: str) -> list[int]:
        """[system, user: user_content] through the chat template, with the assistant generation prompt."""
        return self.encode(self._render(self._messages(user_content), generation_prompt=True))

    def first_prompt_text(self, user_content: str) -> str:
        return self._render(self._messages(user_content), generation_prompt=True)

    def observation_ids(self, user_content: str, *, previous_ended_with_eos: bool) -> list[int]:
        """The tokens appended after the model's answer: what closes its turn (only the part after EOS when it
        stopped on EOS; the whole closing text when it was cut at max tokens), then a user turn holding
        `user_content`, then the assistant generation prompt. These are observation tokens (loss-masked)."""
        close = self._close_after_eos if previous_ended_with_eos else self._close_without_eos
        if self.image_placeholder:
            raise ChatTemplateError("Screenshots are rendered per turn (gui.history=semantic_context or last_k with "
                                    "k=0); appending image turns to a running stream is not supported.")
        return self.encode(close + self._turn_prefix + user_content + self._turn_suffix)

    def ended_with_eos(self, token_ids: Sequence[int]) -> bool:
        return bool(token_ids) and token_ids[-1] == self.eos_token_id


# ---------------------------------------------------------------------------------------------------------------------
# Screens and summaries


def feedback_line(info: Mapping[str, Any] | None, *, max_chars: int = 160) -> str:
    """One line about the previous action when it went wrong ("" when it ran or there was none)."""
    if not info:
        return ""
    if info.get("penalty"):
        error = str(info.get("parse_error") or "")
        reason = error.split(". Valid actions:")[0] if error else "no action found"
        return truncate(f"Your last answer had no valid action ({reason}).", max_chars)
    if info.get("action_error"):
        return truncate(f"Your last action {info.get('action')} failed: {info['action_error']}", max_chars)
    return ""


def render_screen(obs: Observation, *, feedback: str = "", hidden_steps: int = 0, text_elements: bool = True,
                  summary_instruction: bool = False) -> str:
    """User content for one screen: feedback on the last action, the task and elements (or just the task when the
    screen is an image), and a note of hidden earlier steps (`last_k`)."""
    lines = []
    if hidden_steps:
        lines.append(f"({hidden_steps} earlier step{'s' if hidden_steps > 1 else ''} not shown.)")
    if feedback:
        lines.append(feedback)
    lines.append(obs.text if text_elements else f"Task: {obs.instruction}")
    if summary_instruction:
        lines.append(MODEL_SUMMARY_INSTRUCTION.strip())
    return "\n".join(lines)


def render_semantic(obs: Observation, summaries: Sequence[str], *, max_summaries: int, feedback: str = "",
                    text_elements: bool = True, summary_instruction: bool = False) -> str:
    """User content for `semantic_context`: the last `max_summaries` step summaries, then the current screen."""
    kept = list(summaries)[-max_summaries:] if max_summaries > 0 else []
    hidden = len(summaries) - len(kept)
    lines = ["Previous steps:" if summaries else "Previous steps: none."]
    if hidden:
        lines.append(f"({hidden} earlier step{'s' if hidden > 1 else ''} not shown.)")
    lines += [f"- {summary}" for summary in kept]
    lines.append("")
    lines.append(render_screen(obs, feedback=feedback, text_elements=text_elements,
                               summary_instruction=summary_instruction))
    return "\n".join(lines)


def _element_phrase(element: Element | None) -> str:
    if element is None:
        return ""
    text = f' "{truncate(element.text, 24)}"' if element.text else ""
    return f" on {element.tag}{text}"


def rule_summary(turn: int, obs: Observation, info: Mapping[str, Any], *, max_chars: int = 120) -> str:
    """A one-line summary of step `turn`, taken on screen `obs`, from the environment's StepInfo.

    "Step 2: click(4) on button "Next"; progress 1/1." / "Step 1: no valid action." / "Step 3: type(6, "x") failed:
    Element 6 is a div; ...". Only the action, its target and what the environment reported go in: never the model's
    reasoning, so the summary is short and faithful.
    """
    if info.get("penalty"):
        return truncate(f"Step {turn}: no valid action.", max_chars)
    action = info.get("action") or "?"
    target = None
    try:
        parsed = parse_action(action)
        if parsed.element_id is not None:
            target = next((e for e in obs.elements if e.element_id == parsed.element_id), None)
    except ActionParseError:
        pass
    text = f"Step {turn}: {action}{_element_phrase(target)}"
    if info.get("action_error"):
        text += f" failed: {info['action_error']}"
    elif info.get("env_error"):
        text += " (the browser failed)"
    elif info.get("num_milestones"):
        text += f"; progress {len(info.get('milestones_reached') or [])}/{info['num_milestones']}"
    return truncate(text + ".", max_chars)


def model_summary(answer_text: str, *, max_chars: int = 120) -> str | None:
    """The model's own `Summary: ...` line (the last one) from its answer, cut to `max_chars`; None when absent."""
    matches = _SUMMARY_LINE.findall(answer_text)
    if not matches or not matches[-1].strip():
        return None
    return truncate(matches[-1], max_chars)


@dataclass(frozen=True, kw_only=True)
class ContextSettings:
    """The history knobs (mirrors `rl.config.GuiConfig`; kept separate so this module needs no config tree)."""

    history: HistoryMode = "full"
    last_k: int = 2
    max_summaries: int = 8
    summary_max_chars: int = 120
    summariser: Literal["rule", "model"] = "rule"
    text_elements: bool = True
    """False for screenshot observations: the screen is the image, the text holds only the task."""

    def __post_init__(self) -> None:
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history={self.history!r} is not one of {HISTORY_MODES}.")
        if self.last_k < 0 or self.max_summaries < 0 or self.summary_max_chars < 8:
            raise ValueError(f"last_k={self.last_k} and max_summaries={self.max_summaries} must be >= 0 and "
                             f"summary_max_chars={self.summary_max_chars} >= 8.")
