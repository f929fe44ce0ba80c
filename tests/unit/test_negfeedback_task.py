"""negfeedback_pgrpo's data: curriculum filters, candidates, user split, and the evaluation's vote ranking."""

from __future__ import annotations

import pytest

from rl import assets
from rl.types import Rollout, Sample
from rollouts.envs.negfeedback import DATA_FILTERS, NegFeedbackTask, is_eval_user
from rollouts.envs.rec import RecData

RENDER = lambda messages: messages[-1]["content"]  # noqa: E731


@pytest.fixture(scope="module")
def task() -> NegFeedbackTask:
    data = RecData.load_movielens(assets.require("data"))
    return NegFeedbackTask(data, RENDER, history_len=4, num_candidates=6, recent_days=1.0, seed=3,
                           max_train_users=60)


def test_filters_nest_and_hold_only_training_negatives(task):
    recent, every, mixed = (set(task.targets[name]) for name in DATA_FILTERS)
    assert recent and recent < every and every == mixed  # 1 day is recent enough to exclude some
    for user, pos in every:
        assert not is_eval_user(user) and task.data.by_user[user][pos].rating <= 2 and pos >= 1
    assert all(is_eval_user(u) for u in task.eval_users) and len(task.train_users) == 60


def test_samples_carry_what_the_reward_needs(task):
    for name in DATA_FILTERS:
        source = task.source(name)
        sample = source.sample(0)
        meta = sample.metadata
        user, pos = task.targets[name][0]
        target = task.data.by_user[user][pos]
        assert meta["item_id"] == target.item_id and meta["timestamp"] == target.timestamp - 1
        assert len(meta["candidates"]) == 6 and meta["item_id"] in meta["candidates"]
        assert f"#{meta['item_id']} " in sample.prompt and "Item: <number>" in sample.prompt
        assert sample.sample_id.startswith(name) and source.sample(0) == sample  # deterministic
    with pytest.raises(ValueError, match="unknown data filter 'nope'"):
        task.source("nope")


def test_hard_candidates_include_the_users_future_likes(task):
    found = 0
    for user, pos in task.targets["negatives_and_positives"][:50]:
        seq = task.data.by_user[user]
        liked_later = {x.item_id for x in seq[pos + 1:] if x.rating >= 4}
        easy = set(task.candidates(user, pos, hard=False, salt="x")) - {seq[pos].item_id}
        hard = set(task.candidates(user, pos, hard=True, salt="x")) - {seq[pos].item_id}
        assert not easy & task.data.seen_items(user)  # easy distractors: never rated by the user
        if liked_later:
            assert len(hard & liked_later) == min(len(liked_later), 2)
            found += 1
    assert found > 0


def test_eval_samples_are_eval_users_last_negatives(task):
    samples = task.eval_samples(num_users=5, seed=0)
    assert len(samples) == 5
    for sample in samples:
        user = sample.metadata["user_id"]
        seq = task.data.by_user[user]
        last_negative = max(p for p in range(1, len(seq)) if seq[p].rating <= 2)
        assert is_eval_user(user) and sample.sample_id == f"eval-u{user}-p{last_negative}"


def test_vote_scores_and_future_negatives(task):
    from recipes.negfeedback_pgrpo.main import future_negatives, vote_scores

    def answer(text: str) -> Rollout:
        return Rollout(rollout_id="s/0", sample=Sample(sample_id="s", prompt="p"), index=0, prompt_token_ids=(1,),
                       completion_token_ids=(), text=text, logprobs=(), finish_reason="stop", policy_version=0)

    answers = [answer("Item: 5"), answer("I think\nItem: #7"), answer("**Item:** 5"), answer("no idea")]
    assert vote_scores([7, 5, 9], answers) == [1.0, 2.0, 0.0]
    user, pos = task.targets["all_negatives"][0]
    target = task.data.by_user[user][pos]
    assert target.item_id in future_negatives(task, user, target.timestamp - 1, 7.0)
    assert future_negatives(task, user, target.timestamp, 7.0) == {
        x.item_id for x in task.data.by_user[user] if target.timestamp < x.timestamp <= target.timestamp + 7 * 86_400
        and x.rating <= 2}
