"""`negative_feedback` reward: window look-ups, collaborative negatives, similarities and FHR@K, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.negative_feedback import (
    Feedback,
    FeedbackLog,
    ItemSpace,
    fhr_at_k,
    negative_feedback_penalty,
    negative_feedback_reward,
    score_item,
)
from rl.types import Rollout, Sample

DAY = 86_400
T0 = 1_000_000
# Item vectors (unit after normalisation): 10 and 11 orthogonal, 12 halfway between them, 14 orthogonal to both.
VECTORS = {10: [1.0, 0.0, 0.0], 11: [0.0, 1.0, 0.0], 12: [1.0, 1.0, 0.0], 14: [0.0, 0.0, 1.0], 20: [1.0, 0.0, 1.0],
           30: [0.0, 1.0, 1.0]}
LOG = {
    # user 1: liked 20 before the prompt; disliked 10 and liked 11 within 7 days after it; disliked 12 a month later
    1: [Feedback(20, 5, T0 - DAY), Feedback(10, 1, T0 + DAY), Feedback(11, 5, T0 + 2 * DAY),
        Feedback(12, 1, T0 + 30 * DAY)],
    # user 2 shares item 20 with user 1's history and disliked 14: a neighbour, so 14 is a collaborative negative
    2: [Feedback(20, 4, T0 - 5 * DAY), Feedback(14, 2, T0 - 4 * DAY)],
    # user 3 has nothing in common with user 1: not a neighbour, so its dislike of 30 does not count
    3: [Feedback(30, 1, T0 - 3 * DAY)],
}


@pytest.fixture()
def space() -> ItemSpace:
    ids = sorted(VECTORS)
    return ItemSpace.from_matrix(ids, torch.tensor([VECTORS[i] for i in ids]))


def rollout(sample_id: str, index: int, text: str = "", **metadata) -> Rollout:
    return Rollout(rollout_id=f"{sample_id}/{index}", sample=Sample(sample_id=sample_id, prompt="p", metadata=metadata),
                   index=index, prompt_token_ids=(1,), completion_token_ids=(), text=text, logprobs=(),
                   finish_reason="stop", policy_version=0)


def test_window_and_collaborative_sets():
    sets = FeedbackLog(LOG).feedback(1, T0, days=7, num_neighbours=5)
    assert sets.negatives == {10}  # 12 is outside the 7-day window
    assert sets.positives == {11}
    assert sets.collaborative == {14}  # user 2's dislike; user 3 (Jaccard 0) is no neighbour
    assert sets.num_neighbours == 1
    assert FeedbackLog(LOG).feedback(1, T0, days=31, num_neighbours=5).negatives == {10, 12}
    assert FeedbackLog(LOG).feedback(1, T0, days=7, num_neighbours=0).collaborative == frozenset()
    with pytest.raises(KeyError, match="user 99 is not in the feedback log"):
        FeedbackLog(LOG).feedback(99, T0, days=7, num_neighbours=5)


def test_an_item_the_user_liked_is_never_a_collaborative_negative():
    log = dict(LOG)
    log[1] = [*LOG[1], Feedback(14, 5, T0 + 3 * DAY)]
    assert FeedbackLog(log).feedback(1, T0, days=7, num_neighbours=5).collaborative == frozenset()


def test_penalty_by_hand(space):
    sets = FeedbackLog(LOG).feedback(1, T0, days=7, num_neighbours=5)
    results = {i: score_item(space, i, sets, collab_weight=0.5, gamma=0.5) for i in VECTORS}
    penalty = {i: r.components["penalty"] for i, r in results.items()}
    # 10 is the future negative itself: maxsim(N) = 1, maxsim(P) = cos(10, 11) = 0 → penalty 1, the maximum
    assert penalty[10] == pytest.approx(1.0)
    assert max(penalty, key=penalty.get) == 10 and results[10].score == min(r.score for r in results.values())
    assert results[10].components["hit_negative"] == 1.0
    # 12 = (1, 1, 0)/√2: cos 1/√2 to the negative and to the positive → 1/√2 − 0.5/√2
    assert penalty[12] == pytest.approx(0.5 / math.sqrt(2))
    # 11 is the future positive: 0 − 0.5 · 1
    assert penalty[11] == pytest.approx(-0.5) and results[11].score == pytest.approx(0.5)
    # 14 is only a collaborative negative: max(0, 0.5 · 1) − 0.5 · 0
    assert penalty[14] == pytest.approx(0.5)
    assert results[14].components["sim_collaborative"] == pytest.approx(1.0)
    assert negative_feedback_penalty(0.2, 0.9, 0.4, collab_weight=1.0, gamma=0.25) == pytest.approx(0.9 - 0.1)


def test_no_future_feedback_scores_zero_and_says_why(space):
    sets = FeedbackLog(LOG).feedback(3, T0, days=7, num_neighbours=5)
    result = score_item(space, 10, sets, collab_weight=0.5, gamma=0.5)
    assert result.score == 0.0 and result.details["num_negatives"] == 0 and result.details["num_positives"] == 0


def test_fhr_at_k_by_hand():
    ranking, negatives = [5, 10, 7], {10, 99}
    assert [fhr_at_k(ranking, negatives, k) for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert fhr_at_k(ranking, set(), 3) == 0.0
    # averaged over prompts: hits at K=2 for prompts 1 and 3 of 4 → FHR@2 = 0.5
    lists = [([10, 1], {10}), ([1, 2], {10}), ([3, 10], {10}), ([4, 5], set())]
    assert sum(fhr_at_k(r, n, 2) for r, n in lists) / len(lists) == 0.5


def test_item_space_files(tmp_path):
    torch.save({"item_ids": [3, 5], "embeddings": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}, tmp_path / "d.pt")
    torch.save(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 3.0]]), tmp_path / "t.pt")
    by_dict, by_row = ItemSpace.load(tmp_path / "d.pt"), ItemSpace.load(tmp_path / "t.pt")
    assert by_dict.max_similarity(3, [5]) == pytest.approx(1 / math.sqrt(2))
    assert sorted(by_row.row_of) == [1, 3] and by_row.max_similarity(1, [3]) == pytest.approx(0.0)
    assert by_row.max_similarity(1, []) == 0.0
    with pytest.raises(KeyError, match=r"items \[2\] have no vector"):
        by_row.max_similarity(1, [2])


@pytest.fixture()
def movielens_dir(tmp_path):
    """RecBole atomic files for the users of LOG; every item gets a genre so the genre fallback has vectors."""
    genres = {10: "Horror", 11: "Comedy", 12: "Horror Comedy", 14: "Western", 20: "Horror Western", 30: "Drama"}
    (tmp_path / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                           + "".join(f"{i}\tMovie {i}\t1990\t{g}\n" for i, g in genres.items()))
    (tmp_path / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\t"
                                           "zip_code:token\n1\t30\tF\twriter\t1\n2\t40\tM\tother\t2\n3\t50\tM\tother\t3\n")
    rows = [f"{u}\t{f.item_id}\t{f.rating}\t{f.timestamp}\n" for u, seq in LOG.items() for f in seq]
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                            + "".join(rows))
    return str(tmp_path)


def test_registered_reward_with_genre_vectors(movielens_dir):
    group = [rollout("u1", 0, user_id=1, timestamp=T0, candidate_item_id=10),
             rollout("u1", 1, user_id=1, timestamp=T0, candidate_item_id=11)]
    results = negative_feedback_reward(group, data_dir=movielens_dir)
    # genre vectors: 10 = Horror, 11 = Comedy (orthogonal) → 10 is the negative itself, 11 the positive itself
    assert results[0].components["penalty"] == pytest.approx(1.0) and results[0].score == pytest.approx(-1.0)
    assert results[1].score == pytest.approx(0.5)
    assert all(r.details["parsed"] for r in results)


def test_registered_reward_unparsable_and_errors(movielens_dir):
    bad = negative_feedback_reward([rollout("u1", 0, "no idea", user_id=1, timestamp=T0)], data_dir=movielens_dir,
                                   item_parser="item_id")
    assert bad[0].score == -1.0 and bad[0].details["parsed"] is False and bad[0].components == {"parsed": 0.0}
    with pytest.raises(KeyError, match="has no 'timestamp'"):
        negative_feedback_reward([rollout("u1", 0, user_id=1, candidate_item_id=10)], data_dir=movielens_dir)
    with pytest.raises(KeyError, match="user 7 is not in the feedback log"):
        negative_feedback_reward([rollout("u7", 0, user_id=7, timestamp=T0, candidate_item_id=10)],
                                 data_dir=movielens_dir)
    with pytest.raises(ValueError, match="days > 0"):
        negative_feedback_reward([], data_dir=movielens_dir, days=0)


def test_predict_direction_flips_the_score(movielens_dir):
    group = [rollout("u1", 0, user_id=1, timestamp=T0, candidate_item_id=10),
             rollout("u1", 1, user_id=1, timestamp=T0, candidate_item_id=11)]
    results = negative_feedback_reward(group, data_dir=movielens_dir, direction="predict")
    # predicting the future negative itself is best (+1); the future positive gets −γ = −0.5
    assert results[0].score == pytest.approx(1.0) and results[1].score == pytest.approx(-0.5)
    assert results[0].components["penalty"] == pytest.approx(1.0)
    bad = negative_feedback_reward([rollout("u1", 0, "?", user_id=1, timestamp=T0)], data_dir=movielens_dir,
                                   item_parser="item_id", direction="predict")
    assert bad[0].score == -1.0  # below every parsable answer in both directions
    with pytest.raises(ValueError, match="direction='up'"):
        negative_feedback_reward([], data_dir=movielens_dir, direction="up")
