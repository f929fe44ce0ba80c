"""Rollout JSONL files: round trip, the documented fields, malformed lines naming file:line, the shipped sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards.rules import format_reward
from rl.rollout_io import (
    FIELDS,
    RolloutFileError,
    make_rollout,
    read_rollouts,
    rollout_to_json,
    write_rollouts,
)
from rl.types import ROLLOUT_FORMAT_VERSION, RewardResult, Rollout, Sample, ScoredRollout

SAMPLE = Path(__file__).resolve().parents[2] / "rewards" / "data" / "sample_rollouts.jsonl"


def _rollout(index: int) -> Rollout:
    sample = Sample(sample_id="u1-i2-t3", prompt="<|im_start|>user\nRate it.<|im_end|>\n",
                    metadata={"rating": 4, "liked": True, "history": [1, 2]})
    return Rollout(rollout_id=f"u1-i2-t3/{index}", sample=sample, index=index, prompt_token_ids=(1, 2, 3),
                   completion_token_ids=(7, 8), text=f"Nice.\nRating: {index + 3}", logprobs=(-0.5, -1.25),
                   finish_reason="stop", policy_version=2)


def test_scored_rollouts_round_trip_with_token_ids(tmp_path):
    scored = [ScoredRollout(rollout=_rollout(i), reward=0.5 + i,
                            results={"format": RewardResult(score=1.0, details={"answer": str(i + 3)}),
                                     "ranking": RewardResult(score=0.75, components={"exact": 0.0})})
              for i in range(2)]
    path = tmp_path / "steps" / "step_3.jsonl"
    assert write_rollouts(path, scored, step=3, include_token_ids=True) == 2
    records = read_rollouts(path)
    assert [r.rollout for r in records] == [s.rollout for s in scored]
    assert [r.rewards for r in records] == [dict(s.results) for s in scored]
    assert [(r.reward, r.step, r.num_prompt_tokens, r.num_completion_tokens) for r in records] == \
        [(0.5, 3, 3, 2), (1.5, 3, 3, 2)]


def test_without_token_ids_counts_are_kept_and_lines_follow_the_documented_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    write_rollouts(path, [_rollout(0)])
    line = json.loads(path.read_text())
    assert list(line) == [f for f in FIELDS if f not in ("prompt_token_ids", "completion_token_ids", "logprobs")]
    assert line["format_version"] == ROLLOUT_FORMAT_VERSION and line["reward"] is None and line["rewards"] == {}
    [record] = read_rollouts(path)
    assert record.rollout.completion_token_ids == () and record.num_completion_tokens == 2
    assert record.rollout.text == "Nice.\nRating: 3" and record.rollout.sample.metadata["history"] == [1, 2]
    write_rollouts(path, [_rollout(1)], append=True)
    assert [r.rollout.index for r in read_rollouts(path)] == [0, 1]
    assert len(read_rollouts(path, limit=1)) == 1


def test_a_minimal_hand_written_line_is_enough(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text('{"format_version": 1, "rollout_id": "s/0", "sample_id": "s", "prompt": "p", '
                    '"completion": "Rating: 4"}\n\n')
    [record] = read_rollouts(path)
    assert record.rollout.finish_reason == "stop" and record.rollout.sample.metadata == {}


@pytest.mark.parametrize(("line", "message"), [
    ('{"format_version": 1, "rollout_id": "s/0"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object per line"),
    ('{"rollout_id": "s/0"}', "required field 'format_version' is missing"),
    ('{"format_version": 9, "rollout_id": "s/0"}', "format_version 9 is newer than this RecForge reads"),
    ('{"format_version": 1, "rollout_id": "s/0", "sample_id": "s", "prompt": "p"}',
     "required field 'completion' is missing"),
    ('{"format_version": 1, "rollout_id": "s/0", "sample_id": "s", "prompt": "p", "completion": 4}',
     "field 'completion' must be str, got int"),
    ('{"format_version": 1, "rollout_id": "s/0", "sample_id": "s", "prompt": "p", "completion": "c", '
     '"metdata": {}}', "unknown field 'metdata'. Did you mean 'metadata'?"),
    ('{"format_version": 1, "rollout_id": "s/0", "sample_id": "s", "prompt": "p", "completion": "c", '
     '"completion_token_ids": [1, 2], "logprobs": [-1.0]}', "1 log-probs for 2 completion tokens"),
    ('{"format_version": 1, "rollout_id": "s/0", "sample_id": "s", "prompt": "p", "completion": "c", '
     '"rewards": {"format": {"components": {}}}}', "rewards.format: required field 'score' is missing"),
])
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(rollout_to_json(make_rollout("ok")))
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(RolloutFileError) as info:
        read_rollouts(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RolloutFileError, match="no such rollout file"):
        read_rollouts(tmp_path / "nope.jsonl")


def test_unserialisable_metadata_names_the_rollout(tmp_path):
    rollout = make_rollout("x", sample_id="odd", metadata={"when": object()})
    with pytest.raises(ValueError, match="Rollout odd/0 cannot be written.*not JSON-serialisable"):
        write_rollouts(tmp_path / "r.jsonl", [rollout])


def test_the_shipped_sample_is_rec_reasoning_style_and_readable():
    records = read_rollouts(SAMPLE)
    assert len(records) == 12
    assert sorted({r.rollout.sample.sample_id for r in records}) == ["u9001-i1201-t14", "u9002-i1202-t31",
                                                                     "u9003-i1203-t22"]
    for r in records:
        meta = r.rollout.sample.metadata
        assert {"user_id", "item_id", "rating", "liked"} <= set(meta) and meta["liked"] == (meta["rating"] >= 4)
        assert "Rating: N" in r.rollout.sample.prompt and r.num_completion_tokens > 0
    scores = [res.score for res in format_reward([r.rollout for r in records])]
    # parsable final `Rating: N` lines, written by hand: 5, 3, five, (cut off) | 2, **4**, prose, 1 | 4, 3, (trailer), 6
    assert scores == [1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0]
