"""recgpt_tags: tag parsing, `tag_accuracy` / `tag_diversity` by hand, the constrained gate, and the task's samples."""

from __future__ import annotations

import pytest

from rewards.local import constrained
from rewards.tags import covered_genres, parse_tags, tag_accuracy, tag_diversity
from rl import assets
from rl.config import RewardSpec
from rl.types import Rollout, Sample


def rollout(text: str, **metadata) -> Rollout:
    return Rollout(rollout_id="s/0", sample=Sample(sample_id="s", prompt="p", metadata=metadata), index=0,
                   prompt_token_ids=(1,), completion_token_ids=(), text=text, logprobs=(), finish_reason="stop",
                   policy_version=0)


def test_parse_tags_reads_the_last_tags_line():
    assert parse_tags("Tags: a\nsome text\n**Tags:** Space Opera, #90s  Comedies; noir|") == [
        "space opera", "90s comedies", "noir"]
    assert parse_tags("I like movies") is None
    assert covered_genres(["space opera", "90s comedies", "noir"]) == {"Sci-Fi", "Comedy", "Film-Noir"}
    assert covered_genres(["warm stories"]) == set()  # "war" is a word prefix, not a substring anywhere


def test_tag_accuracy_by_hand():
    future = ["Sci-Fi", "Action", "Comedy", "Sci-Fi"]  # two movies: (Sci-Fi, Action), (Comedy, Sci-Fi)
    good, partial, none = tag_accuracy([rollout("Tags: space, action heroes, funny", future_genres=future),
                                        rollout("Tags: sci-fi, drama", future_genres=future),
                                        rollout("no tags", future_genres=future)])
    assert good.score == 1.0 and partial.score == 0.5  # 2 of 4 entries are Sci-Fi
    assert none.score == 0.0 and none.details["parsed"] is False and none.components == {"parsed": 0.0}
    with pytest.raises(KeyError, match="future_genres"):
        tag_accuracy([rollout("Tags: x")])


def test_tag_diversity_by_hand():
    results = tag_diversity([rollout("Tags: a, b, c"), rollout("Tags: a, a, b"), rollout("Tags: a"),
                             rollout("Tags: " + ", ".join("abcdefghij"))], min_tags=3, max_tags=8)
    assert [r.score for r in results] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.8])


def test_the_constrained_gate():
    specs = {"tag_accuracy": RewardSpec(name="tag_accuracy"), "agent_judge": RewardSpec(name="agent_judge",
             threshold=0.5), "tag_diversity": RewardSpec(name="tag_diversity", threshold=0.6)}
    assert constrained({"tag_accuracy": 0.7, "agent_judge": 1.0, "tag_diversity": 0.6}, specs) == 0.7
    assert constrained({"tag_accuracy": 0.7, "agent_judge": 0.0, "tag_diversity": 1.0}, specs) == 0.0


def test_task_samples_and_user_split():
    from rollouts.envs.rec import RecData
    from rollouts.envs.tags import TagsTask

    data = RecData.load_movielens(assets.require("data"))
    task = TagsTask(data, lambda m: m[-1]["content"], history_len=5, max_train_users=30)
    assert all(u % 10 for u in task.train_users) and all(u % 10 == 0 for u in task.eval_users)
    sample = task.sample(0)
    user, pos = task.cuts[0]
    future = sample.metadata["future_items"]
    assert future and all(data.items[i].genres for i in future)
    assert all(x.item_id in future for x in data.by_user[user][pos:] if x.rating >= 4 and len(future) < 5)
    assert sample.metadata["future_genres"] == [g for i in future for g in data.items[i].genres]
    assert "Tags: tag one" in sample.prompt
    evals = task.eval_samples(num_users=3, seed=0)
    assert len(evals) == 3 and all(len(s.metadata["future_items"]) == 5 for s in evals)
