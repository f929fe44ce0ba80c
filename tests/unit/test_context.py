"""rollouts.context: chat rendering as token ids, step summaries, and prompt length per history mode.

Uses the embedded SmolLM2 tokenizer (ChatML template) and the screens and answers of gui_data.py.
"""

from __future__ import annotations

import pytest
from gui_data import answer, play, result, screen, trajectory

from rollouts.context import (
    ChatRenderer,
    ContextSettings,
    feedback_line,
    model_summary,
    render_semantic,
    rule_summary,
    truncate,
)
from rollouts.envs.actions import parse_action
from rollouts.envs.base import Element, Observation
from rollouts.multiturn import SamplingSettings, TurnPlanner


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rl.assets import prepare

    return AutoTokenizer.from_pretrained(prepare("model")["model"])


def test_first_prompt_is_the_chat_template_tokenized_once(tokenizer):
    renderer = ChatRenderer(tokenizer, system_prompt="SYS")
    ids = renderer.first_prompt_ids("screen 1")
    expected = "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nscreen 1<|im_end|>\n<|im_start|>assistant\n"
    assert renderer.first_prompt_text("screen 1") == expected
    assert ids == tokenizer.encode(expected, add_special_tokens=False)


def test_observation_ids_close_the_answer_and_open_the_next_turn(tokenizer):
    renderer = ChatRenderer(tokenizer, system_prompt="SYS")
    after_eos = tokenizer.decode(renderer.observation_ids("screen 2", previous_ended_with_eos=True))
    assert after_eos == "\n<|im_start|>user\nscreen 2<|im_end|>\n<|im_start|>assistant\n"
    cut = tokenizer.decode(renderer.observation_ids("screen 2", previous_ended_with_eos=False))
    assert cut == "<|im_end|>\n<|im_start|>user\nscreen 2<|im_end|>\n<|im_start|>assistant\n"
    # The stream equals the template applied to the whole conversation (here, where tokenization agrees).
    answer = tokenizer.encode("click(4)", add_special_tokens=False) + [tokenizer.eos_token_id]
    stream = renderer.first_prompt_ids("screen 1") + answer + renderer.observation_ids(
        "screen 2", previous_ended_with_eos=renderer.ended_with_eos(answer))
    whole = tokenizer.apply_chat_template(
        [{"role": "system", "content": "SYS"}, {"role": "user", "content": "screen 1"},
         {"role": "assistant", "content": "click(4)"}, {"role": "user", "content": "screen 2"}],
        tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(stream) == whole


def _obs() -> Observation:
    elements = (Element(element_id=4, tag="button", text="Next", bbox=(2, 52, 43, 21)),
                Element(element_id=6, tag="input_text", value="", bbox=(2, 84, 106, 21)))
    return Observation(task="click-button", instruction='Click on the "Next" button.', text="Task: ...",
                       elements=elements, milestones=("target button clicked",))


def test_rule_summary_hand_written_cases():
    obs = _obs()
    ok = {"action": "click(4)", "penalty": False, "milestones_reached": ["target button clicked"], "num_milestones": 1}
    assert rule_summary(2, obs, ok) == 'Step 2: click(4) on button "Next"; progress 1/1.'
    assert rule_summary(1, obs, {"penalty": True, "action": None}) == "Step 1: no valid action."
    failed = {"action": "click(9)", "action_error": "No element with id 9 on the page.", "num_milestones": 1}
    assert rule_summary(3, obs, failed) == "Step 3: click(9) failed: No element with id 9 on the page.."
    typed = {"action": 'type(6, "hello")', "milestones_reached": [], "num_milestones": 1}
    assert rule_summary(4, obs, typed) == 'Step 4: type(6, "hello") on input_text; progress 0/1.'
    assert len(rule_summary(5, obs, {**typed, "action": 'type(6, "' + "x" * 300 + '")'}, max_chars=40)) == 40


def test_model_summary_takes_the_last_summary_line():
    text = "I look.\nSummary: first thought\nthen\n**Summary:** clicked Next to submit  \nclick(4)"
    assert model_summary(text) == "clicked Next to submit"
    assert model_summary("click(4)") is None
    assert model_summary("Summary: " + "y" * 200, max_chars=20) == "y" * 17 + "..."


def test_feedback_and_truncate():
    assert feedback_line(None) == "" and feedback_line({"penalty": False, "action_error": None}) == ""
    parse = feedback_line({"penalty": True, "parse_error": "No action found in the answer 'hi'. Valid actions: ..."})
    assert parse == "Your last answer had no valid action (No action found in the answer 'hi')."
    assert truncate("a  b\nc", 10) == "a b c" and truncate("abcdefghijk", 6) == "abc..."


def test_semantic_context_keeps_the_last_summaries():
    text = render_semantic(_obs(), [f"Step {i}: x." for i in range(1, 7)], max_summaries=3)
    assert "(3 earlier steps not shown.)" in text
    assert "- Step 4: x.\n- Step 5: x.\n- Step 6: x." in text and "Step 3: x." not in text
    assert render_semantic(_obs(), [], max_summaries=3).startswith("Previous steps: none.")


def _prompt_lengths(tokenizer, history: str, *, turns: int = 10, **ctx) -> list[int]:
    """Prompt tokens per turn over one 10-turn episode (the policy never clicks the target; the environment gives up
    after `turns` actions)."""
    texts = ["The page lists divs. I try one.\nclick(6)", "click(7)", "scroll(down)"]
    steps = []
    for step in range(1, turns + 1):
        text = texts[(step - 1) % len(texts)]
        steps.append((answer(tokenizer, text, max_new_tokens=32),
                      result(step, str(parse_action(text)), done=step == turns, reason="max steps")))
    planner = TurnPlanner(ChatRenderer(tokenizer), context=ContextSettings(history=history, **ctx),
                          sampling=SamplingSettings(temperature=1.0, max_new_tokens=32, max_model_len=8192),
                          max_turns=turns)
    traj = trajectory(seed=0)
    play(planner, traj, screen(0), steps)
    assert len(traj.turns) == turns and traj.end_reason == "max steps"
    return [len(t.prompt_ids) for t in traj.turns]


def test_semantic_context_keeps_prompt_length_bounded(tokenizer, capsys):
    full = _prompt_lengths(tokenizer, "full")
    last_k = _prompt_lengths(tokenizer, "last_k", last_k=2)
    semantic = _prompt_lengths(tokenizer, "semantic_context", max_summaries=4)
    with capsys.disabled():
        print("\nprompt tokens per turn over a 10-turn episode (6-element click-button page):")
        for name, lengths in (("full", full), ("last_k=2", last_k), ("semantic_context", semantic)):
            print(f"  {name:>17}: {lengths}")
    # full grows every turn by a screen plus an answer; the others stop growing.
    assert all(b - a > 60 for a, b in zip(full, full[1:], strict=False))
    assert max(last_k[3:]) - min(last_k[3:]) < 40  # the window slides: same number of screens from turn 3 on
    # semantic_context: at most 4 summaries of <= 120 chars, so from turn 5 on the length moves only with the
    # screen's own text and which summaries are shown; the bound is the first turn plus 4 summary lines.
    assert max(semantic[5:]) - min(semantic[5:]) < 40
    assert max(semantic) < semantic[0] + 4 * 45
    assert full[-1] > 3 * max(semantic)


def test_demonstration_comes_before_the_first_screen(tokenizer):
    renderer = ChatRenderer(tokenizer, system_prompt="SYS", demonstrations=[("demo screen", "click(5)")])
    assert renderer.first_prompt_text("screen 1") == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\ndemo screen<|im_end|>\n<|im_start|>assistant\n"
        "click(5)<|im_end|>\n<|im_start|>user\nscreen 1<|im_end|>\n<|im_start|>assistant\n")
    after_eos = tokenizer.decode(renderer.observation_ids("screen 2", previous_ended_with_eos=True))
    assert after_eos == "\n<|im_start|>user\nscreen 2<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="not supported with screenshot"):
        ChatRenderer(tokenizer, image_placeholder=True, demonstrations=[("a", "b")])
