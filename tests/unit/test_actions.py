"""The GUI action grammar (rollouts.envs.actions): hand-written completions, the last-action rule, error messages."""

import pytest

from rollouts.envs.actions import GRAMMAR, Action, ActionParseError, parse_action


@pytest.mark.parametrize("text, expected", [
    ("click(12)", Action(kind="click", element_id=12)),
    ("click( 7 )", Action(kind="click", element_id=7)),
    ("click(80, 105)", Action(kind="click", x=80.0, y=105.0)),
    ("click(12.5,40)", Action(kind="click", x=12.5, y=40.0)),
    ('type(4, "Kasey")', Action(kind="type", element_id=4, text="Kasey")),
    ('type(4, "")', Action(kind="type", element_id=4, text="")),
    ('type(4, "say \\"hi\\", C:\\\\x\\n\\u00e9")', Action(kind="type", element_id=4, text='say "hi", C:\\x\n\u00e9')),
    ('type(4, "two\nlines")', Action(kind="type", element_id=4, text="two\nlines")),
    ('press("Enter")', Action(kind="press", key="Enter")),
    ("press(Enter)", Action(kind="press", key="Enter")),
    ("press(enter)", Action(kind="press", key="Enter")),
    ('press("ctrl+a")', Action(kind="press", key="Control+a")),
    ("press(Shift+Tab)", Action(kind="press", key="Shift+Tab")),
    ('press("+")', Action(kind="press", key="+")),
    ('press("Control++")', Action(kind="press", key="Control++")),
    ('press(",")', Action(kind="press", key=",")),
    ("press(5)", Action(kind="press", key="5")),
    ("press(a)", Action(kind="press", key="a")),
    ("scroll(down)", Action(kind="scroll", direction="down")),
    ('scroll("Up")', Action(kind="scroll", direction="up")),
    ("done()", Action(kind="done")),
    ("done( )", Action(kind="done")),
])
def test_each_action_form_parses(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize("action", [
    Action(kind="click", element_id=3), Action(kind="click", x=1.5, y=2.0), Action(kind="type", element_id=0,
    text='a "quoted"\nline'), Action(kind="press", key="Control+a"), Action(kind="scroll", direction="left"),
    Action(kind="done"),
])
def test_canonical_text_parses_back_to_the_same_action(action):
    assert parse_action(str(action)) == action


def test_canonical_text_forms():
    assert str(parse_action("click(3)")) == "click(3)"
    assert str(parse_action("click(3.0, 4.50)")) == "click(3, 4.5)"
    assert str(parse_action("press(enter)")) == 'press("Enter")'
    assert str(parse_action("scroll(DOWN)")) == 'scroll("down")'


def test_the_last_action_in_the_completion_is_the_one_executed():
    completion = ("The instruction asks for the OK button. I could click(3), but [3] is Cancel.\n"
                  "OK is element 5.\nAction: click(5)")
    assert parse_action(completion) == Action(kind="click", element_id=5)


def test_text_after_the_last_action_is_ignored():
    assert parse_action("click(2) </answer>\n") == Action(kind="click", element_id=2)


def test_a_call_inside_an_earlier_actions_string_does_not_count():
    assert parse_action('type(4, "click(2)")') == Action(kind="type", element_id=4, text="click(2)")
    assert parse_action('click(1) then type(4, "done()")') == Action(kind="type", element_id=4, text="done()")


def test_a_malformed_last_action_fails_even_after_a_valid_one():
    with pytest.raises(ActionParseError, match="element id must be a non-negative integer"):
        parse_action("click(3) ... actually click(submit)")


def test_prose_with_a_space_before_the_parenthesis_is_not_an_action():
    assert parse_action("click(4)\nI am done (I think).") == Action(kind="click", element_id=4)


@pytest.mark.parametrize("text, message", [
    ("I would press the submit button", "No action found"),
    ("", "No action found"),
    ("Click(3)", "Action names are lowercase: write click(...)"),
    ("DONE()", "Action names are lowercase: write done(...)"),
    ("click(3", "Unclosed action call"),
    ('type(3, "abc)', "Unterminated string"),
    ("type(3, 'abc')", "Strings use double quotes"),
    ('type(3, "a\\qb")', "Bad string"),
    ("click(id=3)", "Arguments are positional: drop id="),
    ("click(1,)", "Missing argument before ')'"),
    ("click(1 2)", "Expected ',' or ')'"),
    ("click()", "got 0 argument(s); usage: click(ID) or click(X, Y)"),
    ("click(1, 2, 3)", "got 3 argument(s)"),
    ("click(submit)", "element id must be a non-negative integer from the element list, got submit"),
    ("click(-2)", "element id must be a non-negative integer"),
    ("click(2.5)", "element id must be a non-negative integer"),
    ('click("4")', 'element id must be a non-negative integer from the element list, got "4"'),
    ("click(-1, 5)", "X must be a non-negative number of pixels, got -1"),
    ("click(3px)", "Unexpected '3px)'"),
    ("type(3, hello)", 'the text must be a double-quoted string, got hello; write type(ID, "hello")'),
    ('type("Kasey")', 'got 1 argument(s); usage: type(ID, "TEXT")'),
    ("press(Foo)", "unknown key 'Foo'"),
    ('press("Hyper+a")', "unknown modifier 'Hyper'"),
    ("press(12)", "12 is not a key"),
    ("press()", "got 0 argument(s)"),
    ("scroll(sideways)", "direction must be one of up, down, left, right, got sideways"),
    ("scroll(3)", "direction must be one of"),
    ("done(now)", "usage: done()"),
])
def test_errors_say_what_was_wrong_and_give_the_grammar(text, message):
    with pytest.raises(ActionParseError) as info:
        parse_action(text)
    assert message in str(info.value)
    assert GRAMMAR in str(info.value)


def test_parse_error_is_a_value_error():
    assert issubclass(ActionParseError, ValueError)


def test_non_string_input_is_a_parse_error():
    with pytest.raises(ActionParseError, match="Expected the completion as a string, got NoneType"):
        parse_action(None)  # type: ignore[arg-type]


def test_error_snippets_are_truncated():
    with pytest.raises(ActionParseError) as info:
        parse_action("click(" + "x" * 500)
    assert len(str(info.value)) < 200 + len(GRAMMAR)


@pytest.mark.parametrize("fields", [
    {"kind": "click"},
    {"kind": "click", "element_id": 1, "x": 2.0, "y": 3.0},
    {"kind": "click", "x": 2.0},
    {"kind": "type", "element_id": 1},
    {"kind": "done", "key": "Enter"},
])
def test_action_rejects_fields_of_another_kind(fields):
    with pytest.raises(ValueError, match="needs exactly the fields"):
        Action(**fields)
