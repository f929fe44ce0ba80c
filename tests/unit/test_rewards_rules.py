"""Rule rewards with hand-computed values: format, ranking (ndcg / yes_no / rating) and length."""

from __future__ import annotations

import math

import pytest

from rewards.rules import format_reward, length_band, length_reward, ndcg_at_k, parse_ranking, ranking_reward
from rl.rollout_io import make_rollout


def _one(fn, text, metadata=None, **kwargs):
    [result] = fn([make_rollout(text, metadata=metadata or {})], **kwargs)
    return result


@pytest.mark.parametrize(("text", "score", "answer"), [
    ("The user loves sci-fi.\nRating: 5", 1.0, "5"),
    ("Reasoning...\nrating:3  \n", 1.0, "3"),
    ("Reasoning...\n**Rating:** 4", 1.0, "4"),
    ("Rating: 2\nOn reflection, maybe higher.\nRating: 4", 1.0, "4"),  # the last answer counts
    ("Rating: 4\n\nI hope this helps!", 0.0, None),  # the answer is not the last line
    ("Reasoning...\nRating: 6", 0.0, None),  # outside 1..5
    ("Reasoning...\nRating: 4.5", 0.0, None),
    ("Reasoning...\nRating: five", 0.0, None),
    ("I would say 4 out of 5.", 0.0, None),
])
def test_format_default_grammar_is_a_final_rating_line(text, score, answer):
    result = _one(format_reward, text)
    assert result.score == score
    assert result.details["parsed"] is (answer is not None)
    assert result.details.get("answer") == answer


def test_format_takes_a_custom_grammar():
    pattern = r"(?im)^answer:\s*(yes|no)\s*\Z"
    assert _one(format_reward, "Looks good.\nAnswer: yes", pattern=pattern).score == 1.0
    assert _one(format_reward, "Looks good.\nRating: 4", pattern=pattern).score == 0.0
    with pytest.raises(ValueError, match="kwargs.pattern=.*not a valid regular expression"):
        _one(format_reward, "x", pattern="(unclosed")


@pytest.mark.parametrize(("text", "true", "score", "exact"), [
    ("...\nRating: 5", 5, 1.0, 1.0),  # 1 − |5 − 5| / 4 = 1
    ("...\nRating: 3", 5, 0.5, 0.0),  # 1 − |3 − 5| / 4 = 0.5
    ("...\nRating: 4", 1, 0.25, 0.0),  # 1 − |4 − 1| / 4 = 0.25
    ("...\nRating: 1", 5, 0.0, 0.0),  # 1 − |1 − 5| / 4 = 0
])
def test_ranking_rating_mode_is_one_minus_scaled_absolute_error(text, true, score, exact):
    result = _one(ranking_reward, text, {"rating": true, "liked": true >= 4}, mode="rating")
    assert result.score == score
    assert result.components == {"parsed": 1.0, "exact": exact}
    assert result.details["predicted"] == int(text[-1]) and result.details["parsed"] is True


def test_ranking_rating_mode_records_an_unparsable_answer_as_such():
    result = _one(ranking_reward, "I think about 4 out of 5.", {"rating": 4}, mode="rating")
    assert result.score == 0.0 and result.details == {"parsed": False, "rating": 4}
    assert result.components["parsed"] == 0.0


def test_ranking_rating_mode_rejects_missing_or_invalid_ground_truth():
    with pytest.raises(KeyError, match="no 'rating'.*it has: liked"):
        _one(ranking_reward, "Rating: 4", {"liked": True}, mode="rating")
    with pytest.raises(ValueError, match="'rating'=0 is outside 1..5"):
        _one(ranking_reward, "Rating: 4", {"rating": 0}, mode="rating")
    with pytest.raises(TypeError, match="'rating' is bool"):
        _one(ranking_reward, "Rating: 4", {"rating": True}, mode="rating")


@pytest.mark.parametrize(("text", "liked", "score", "parsed"), [
    ("They like comedies.\nAnswer: yes", True, 1.0, True),
    ("They like comedies.\nAnswer: Yes, definitely", True, 1.0, True),
    ("They dislike horror.\nAnswer: no", True, 0.0, True),
    ("They dislike horror.\nAnswer: no", False, 1.0, True),
    ("Hard to say.", False, 0.0, False),
])
def test_ranking_yes_no_mode_compares_the_answer_with_liked(text, liked, score, parsed):
    result = _one(ranking_reward, text, {"liked": liked}, mode="yes_no")
    assert result.score == score and result.details["parsed"] is parsed


def test_ranking_ndcg_at_3_by_hand():
    # Candidates 12, 5, 7, 3, 40; positives {5, 3}. The completion ranks 12 > 5 > 7 > 3 > 40.
    # DCG@3  = 0/log2(2) + 1/log2(3) + 0/log2(4)             = 0.630930
    # IDCG@3 = 1/log2(2) + 1/log2(3)   (two positives first) = 1.630930
    # NDCG@3 = 0.630930 / 1.630930 = 0.386853;  HR@3 = 1 (5 is in the top 3)
    meta = {"candidates": [12, 5, 7, 3, 40], "positives": [5, 3]}
    text = "Item 3 is close to their taste, but 12 is closer.\nRanking: 12, 5, 7, 3, 40"
    result = _one(ranking_reward, text, meta, mode="ndcg", k=3)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert result.score == pytest.approx(0.386853, abs=1e-6) and result.score == pytest.approx(expected)
    assert result.components == {"ndcg@3": pytest.approx(expected), "hr@3": 1.0}
    assert result.details["ranking"] == ["12", "5", "7"]  # mentions before "Ranking:" do not count


def test_ranking_ndcg_perfect_partial_and_missing_rankings():
    meta = {"candidates": ["Heat (1995)", "Fargo (1996)", "Scream (1996)"], "positives": ["Fargo (1996)"]}
    assert _one(ranking_reward, "1. fargo (1996)\n2. Heat (1995)", meta, mode="ndcg", k=2).score == 1.0
    # Fargo at rank 2: DCG@2 = 1/log2(3) = 0.630930, IDCG@2 = 1 → NDCG@2 = 0.630930, HR@2 = 1
    result = _one(ranking_reward, "1. Heat (1995)\n2. Fargo (1996)\n3. Scream (1996)", meta, mode="ndcg", k=2)
    assert result.score == pytest.approx(0.630930, abs=1e-6) and result.components["hr@2"] == 1.0
    # Fargo at rank 3 with k=2: outside the cut, NDCG@2 = HR@2 = 0
    result = _one(ranking_reward, "Heat (1995), Scream (1996), Fargo (1996)", meta, mode="ndcg", k=2)
    assert result.score == 0.0 and result.components == {"ndcg@2": 0.0, "hr@2": 0.0}
    result = _one(ranking_reward, "No idea which one.", meta, mode="ndcg", k=2)
    assert result.score == 0.0 and result.details["parsed"] is False


def test_parse_ranking_matches_ids_as_whole_words():
    assert parse_ranking("Ranking: 112, 12, 1", ["1", "12", "112"]) == ["112", "12", "1"]
    assert parse_ranking("Ranking: 112", ["12"]) == []


def test_ndcg_with_more_positives_than_k_uses_k_ideal_positions():
    # 3 positives, k=2, ranking hits at rank 1 only: DCG = 1, IDCG@2 = 1 + 1/log2(3) = 1.630930 → 0.613147
    assert ndcg_at_k(["a", "x", "b"], {"a", "b", "c"}, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_ranking_rejects_unknown_modes_and_bad_k():
    with pytest.raises(ValueError, match="kwargs.mode='ndgc'.*Did you mean 'ndcg'"):
        _one(ranking_reward, "x", mode="ndgc")
    with pytest.raises(ValueError, match="kwargs.k=0"):
        _one(ranking_reward, "x", mode="ndcg", k=0)


@pytest.mark.parametrize(("num_words", "score"), [
    (10, 1.0), (15, 1.0), (20, 1.0),  # inside [10, 20]
    (5, 0.5), (9, 0.5), (21, 0.5), (25, 0.5),  # within the 5-word margins
    (4, 0.0), (26, 0.0), (0, 0.0),  # beyond
])
def test_length_band_by_word_count(num_words, score):
    assert length_band(num_words, 10, 20, 5) == score
    result = _one(length_reward, " ".join(["w"] * num_words), lo=10, hi=20, margin=5)
    assert result.score == score and result.details == {"words": num_words}


def test_length_rejects_an_inverted_band():
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        _one(length_reward, "x", lo=30, hi=10)
