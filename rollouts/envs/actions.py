"""The GUI action grammar and its strict parser.

A policy answers each turn with free text; the environment executes exactly one action parsed from it:

    click(ID)              click the element with that id in the observation's element list
    click(X, Y)            click at page coordinates (CSS pixels from the page's top-left corner)
    type(ID, "TEXT")       focus the text field ID, replace its content with TEXT (keystroke by keystroke)
    press(KEY)             press one key, optionally with modifiers: press("Enter"), press("Control+a")
    scroll(DIR)            scroll the page: DIR is up, down, left or right
    done()                 declare the task finished (MiniWoB tasks end themselves on success, so this gives up)

ID is a non-negative integer; X and Y are non-negative numbers; TEXT is a double-quoted string with JSON escapes
(`\\"`, `\\\\`, `\\n`, `\\u00e9`); KEY and DIR are a double-quoted string or a bare word. Arguments are positional.

Which action counts (the LAST-action rule): models write their reasoning first and the action last, so the parser
takes the *last* occurrence of an action name directly followed by `(` (`click(`, `type(`, `press(`, `scroll(`,
`done(`; matched case-insensitively so that `Click(3)` is reported as a mistake rather than skipped). A call inside
the quoted text of an earlier complete action (`type(4, "click(2)")`) does not count. If that last call is
malformed, parsing fails even when an earlier call was well formed: the model's final answer is what is judged.
Text after the closing parenthesis is ignored.

`parse_action` raises `ActionParseError` (a `ValueError`) naming what was wrong, the offending snippet and the
grammar; environments turn it into a failed, penalised step (`StepResult.info["penalty"]`) instead of crashing.
This module is pure Python (no ray, selenium or torch).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

ActionKind = Literal["click", "type", "press", "scroll", "done"]

GRAMMAR = (
    'Valid actions: click(ID) | click(X, Y) | type(ID, "TEXT") | press(KEY) | scroll(DIR) | done() — '
    "ID: element id from the list; X, Y: page coordinates in pixels; TEXT: double-quoted string; "
    'KEY: e.g. "Enter", "Tab", "Backspace", "Control+a"; DIR: up, down, left or right. '
    "The last action in the answer is executed."
)

NAMED_KEYS: tuple[str, ...] = (
    "Enter", "Tab", "Backspace", "Delete", "Escape", "Space", "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight",
    "Home", "End", "PageUp", "PageDown",
)
"""Keys with names; any single printable ASCII character is a key too."""
MODIFIERS: dict[str, str] = {"control": "Control", "ctrl": "Control", "shift": "Shift", "alt": "Alt", "meta": "Meta"}
"""Accepted modifier spellings (case-insensitive) and their canonical names."""
DIRECTIONS: tuple[str, ...] = ("up", "down", "left", "right")

_NAMED_KEYS_LOWER = {name.lower(): name for name in NAMED_KEYS}
_CALL_START = re.compile(r"(?<![A-Za-z0-9_])(click|type|press|scroll|done)\(", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?![A-Za-z0-9_.])")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*")
_SNIPPET_CHARS = 80


class ActionParseError(ValueError):
    """A completion holds no valid action; the message says what was wrong and gives the grammar."""


@dataclass(frozen=True, kw_only=True)
class Action:
    """One parsed action. Exactly the fields of its kind are set; `str(action)` is its canonical text."""

    kind: ActionKind
    element_id: int | None = None
    """click(ID) and type(ID, ...): the element's id in the observation."""
    x: float | None = None
    """click(X, Y): page x coordinate in CSS pixels."""
    y: float | None = None
    """click(X, Y): page y coordinate in CSS pixels."""
    text: str | None = None
    """type(...): the text that replaces the field's content."""
    key: str | None = None
    """press(...): canonical key, modifiers first: "Enter", "a", "Control+a", "Shift+Tab"."""
    direction: str | None = None
    """scroll(...): one of DIRECTIONS."""

    def __post_init__(self) -> None:
        expected = {
            "click": {"element_id"} if self.x is None else {"x", "y"},
            "type": {"element_id", "text"},
            "press": {"key"},
            "scroll": {"direction"},
            "done": set(),
        }[self.kind]
        present = {name for name in ("element_id", "x", "y", "text", "key", "direction")
                   if getattr(self, name) is not None}
        if present != expected:
            raise ValueError(f"Action(kind={self.kind!r}) needs exactly the fields {sorted(expected)}, got "
                             f"{sorted(present)}.")

    @property
    def is_coordinate_click(self) -> bool:
        return self.kind == "click" and self.x is not None

    def __str__(self) -> str:
        if self.kind == "click":
            return f"click({_num(self.x)}, {_num(self.y)})" if self.is_coordinate_click else f"click({self.element_id})"
        if self.kind == "type":
            return f"type({self.element_id}, {json.dumps(self.text, ensure_ascii=False)})"
        if self.kind == "press":
            return f"press({json.dumps(self.key)})"
        if self.kind == "scroll":
            return f"scroll({json.dumps(self.direction)})"
        return "done()"


def _num(value: float | None) -> str:
    assert value is not None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_action(completion: str) -> Action:
    """The last action in `completion` (see the module docstring for the rule); raises ActionParseError."""
    if not isinstance(completion, str):
        raise ActionParseError(f"Expected the completion as a string, got {type(completion).__name__}. {GRAMMAR}")
    last: tuple[int, Action | ActionParseError] | None = None
    pos = 0
    while (match := _CALL_START.search(completion, pos)) is not None:
        try:
            action, end = _parse_call(completion, match)
            last, pos = (match.start(), action), end  # calls inside this call's string argument are skipped
        except ActionParseError as err:
            last, pos = (match.start(), err), match.end()
    if last is None:
        raise ActionParseError(f"No action found in the answer {_snippet(completion, 0)!r}. {GRAMMAR}")
    if isinstance(last[1], ActionParseError):
        raise last[1]
    return last[1]


def _snippet(text: str, start: int) -> str:
    piece = text[start:start + _SNIPPET_CHARS]
    return piece + ("..." if len(text) > start + _SNIPPET_CHARS else "")


def _parse_call(text: str, match: re.Match[str]) -> tuple[Action, int]:
    """Parse the call whose name `match` found; returns the action and the index after its `)`."""
    name, start = match.group(1), match.start()
    if name != name.lower():
        raise ActionParseError(f"Action names are lowercase: write {name.lower()}(...), not {name}(...) in "
                               f"{_snippet(text, start)!r}. {GRAMMAR}")
    args, end = _tokenize_args(text, match.end(), start)
    call = text[start:end]
    builder = {"click": _click, "type": _type, "press": _press, "scroll": _scroll, "done": _done}[name]
    try:
        return builder(args), end
    except _ArgError as err:
        raise ActionParseError(f"Invalid {name}(...) in {call!r}: {err} {GRAMMAR}") from None


class _ArgError(Exception):
    """Wrong arguments for an action; re-raised as ActionParseError with the call's text."""


_Arg = tuple[Literal["number", "string", "word"], str]


def _tokenize_args(text: str, pos: int, start: int) -> tuple[list[_Arg], int]:
    """Comma-separated arguments from `pos` (just after `(`) to the closing `)`; returns them and the end index."""
    args: list[_Arg] = []
    expect_arg = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise ActionParseError(f"Unclosed action call {_snippet(text, start)!r}: missing ')'. {GRAMMAR}")
        char = text[pos]
        if char == ")" and (not args or not expect_arg):
            return args, pos + 1
        if not expect_arg:
            if char != ",":
                raise ActionParseError(f"Expected ',' or ')' at {text[pos:pos + 20]!r} in {_snippet(text, start)!r}"
                                       f". {GRAMMAR}")
            pos, expect_arg = pos + 1, True
            continue
        token, pos = _read_token(text, pos, start)
        args.append(token)
        expect_arg = False


def _read_token(text: str, pos: int, start: int) -> tuple[_Arg, int]:
    char = text[pos]
    if char == '"':
        return ("string", _read_string(text, pos, start)), _string_end(text, pos, start)
    if char == "'":
        raise ActionParseError(f"Strings use double quotes, not single quotes, in {_snippet(text, start)!r}. "
                               f"{GRAMMAR}")
    if number := _NUMBER.match(text, pos):
        return ("number", number.group()), number.end()
    if word := _WORD.match(text, pos):
        after = word.end()
        if after < len(text) and text[after] == "=":
            raise ActionParseError(f"Arguments are positional: drop {word.group()}= in {_snippet(text, start)!r}. "
                                   f"{GRAMMAR}")
        return ("word", word.group()), after
    if char == ")":
        raise ActionParseError(f"Missing argument before ')' in {_snippet(text, start)!r}. {GRAMMAR}")
    raise ActionParseError(f"Unexpected {text[pos:pos + 20]!r} in {_snippet(text, start)!r}. {GRAMMAR}")


def _string_end(text: str, pos: int, start: int) -> int:
    """Index after the closing quote of the string literal opening at `pos`."""
    i = pos + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    raise ActionParseError(f"Unterminated string in {_snippet(text, start)!r}: missing closing '\"'. {GRAMMAR}")


def _read_string(text: str, pos: int, start: int) -> str:
    literal = text[pos:_string_end(text, pos, start)]
    try:
        value = json.loads(literal, strict=False)  # strict=False: a raw newline inside the quotes is kept
    except json.JSONDecodeError as err:
        raise ActionParseError(f"Bad string {literal!r} ({err.msg}; escapes follow JSON: \\\", \\\\, \\n). "
                               f"{GRAMMAR}") from None
    assert isinstance(value, str)
    return value


def _arity(args: list[_Arg], allowed: tuple[int, ...], usage: str) -> None:
    if len(args) not in allowed:
        raise _ArgError(f"got {len(args)} argument(s); usage: {usage}.")


def _element_id(arg: _Arg) -> int:
    kind, value = arg
    if kind != "number" or "." in value or value.startswith("-"):
        shown = json.dumps(value) if kind == "string" else value
        raise _ArgError(f"the element id must be a non-negative integer from the element list, got {shown}.")
    return int(value)


def _coordinate(arg: _Arg, axis: str) -> float:
    kind, value = arg
    if kind != "number" or value.startswith("-"):
        raise _ArgError(f"{axis} must be a non-negative number of pixels, got {value}.")
    return float(value)


def _click(args: list[_Arg]) -> Action:
    _arity(args, (1, 2), "click(ID) or click(X, Y)")
    if len(args) == 1:
        return Action(kind="click", element_id=_element_id(args[0]))
    return Action(kind="click", x=_coordinate(args[0], "X"), y=_coordinate(args[1], "Y"))


def _type(args: list[_Arg]) -> Action:
    _arity(args, (2,), 'type(ID, "TEXT")')
    kind, value = args[1]
    if kind != "string":
        raise _ArgError(f'the text must be a double-quoted string, got {value}; write type(ID, "{value}").')
    return Action(kind="type", element_id=_element_id(args[0]), text=value)


def _press(args: list[_Arg]) -> Action:
    _arity(args, (1,), 'press(KEY), e.g. press("Enter")')
    kind, value = args[0]
    if kind == "number" and len(value) == 1:  # press(5): a digit key
        return Action(kind="press", key=value)
    if kind == "number":
        raise _ArgError(f"{value} is not a key; a key is one character or a named key.")
    return Action(kind="press", key=canonical_key(value))


def canonical_key(spec: str) -> str:
    """`"ctrl+A"` -> `"Control+A"`; raises _ArgError for an unknown key or modifier."""
    if spec == "+" or spec.endswith("++"):  # the key itself is "+": "+", "Shift++"
        *mods, key = [*spec[:-2].split("+"), "+"] if len(spec) > 1 else ["+"]
    else:
        *mods, key = spec.split("+")
    canonical_mods = []
    for mod in mods:
        if mod.lower() not in MODIFIERS:
            raise _ArgError(f"unknown modifier {mod!r} in {spec!r}; modifiers: Control, Shift, Alt, Meta.")
        canonical_mods.append(MODIFIERS[mod.lower()])
    if key.lower() in _NAMED_KEYS_LOWER:
        key = _NAMED_KEYS_LOWER[key.lower()]
    elif not (len(key) == 1 and " " <= key <= "~"):
        raise _ArgError(f"unknown key {key!r}; use one printable character or one of {', '.join(NAMED_KEYS)}.")
    return "+".join([*canonical_mods, key])


def _scroll(args: list[_Arg]) -> Action:
    _arity(args, (1,), "scroll(DIR)")
    kind, value = args[0]
    if kind == "number" or value.lower() not in DIRECTIONS:
        raise _ArgError(f"the direction must be one of {', '.join(DIRECTIONS)}, got {value}.")
    return Action(kind="scroll", direction=value.lower())


def _done(args: list[_Arg]) -> Action:
    _arity(args, (0,), "done()")
    return Action(kind="done")
