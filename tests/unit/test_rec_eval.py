"""rec_reasoning evaluation metrics, hand-computed."""

import math

from recipes.rec_reasoning.main import auc, ndcg_at_k


def test_auc_counts_pairs_and_half_ties():
    # positives {0.9, 0.4}, negatives {0.5, 0.1}: pairs won 0.9>0.5, 0.9>0.1, 0.4>0.1 = 3 of 4 → 0.75
    assert auc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == 0.75
    # a tie counts half: positive 0.5 vs negatives {0.5, 0.2} → (0.5 + 1) / 2
    assert auc([0.5, 0.5, 0.2], [1, 0, 0]) == 0.75
    assert math.isnan(auc([1.0, 2.0], [1, 1]))


def test_ndcg_hand_computed():
    # the positive ranked 2nd of 3: DCG = 1/log2(3), IDCG = 1/log2(2) = 1 → 0.6309
    assert abs(ndcg_at_k([3.0, 5.0, 1.0], [1, 0, 0], 10) - 1 / math.log2(3)) < 1e-12
    # two positives at ranks 1 and 3: (1 + 1/log2(4)) / (1 + 1/log2(3)) = 1.5 / 1.6309
    assert abs(ndcg_at_k([9.0, 7.0, 5.0], [1, 0, 1], 10) - 1.5 / (1 + 1 / math.log2(3))) < 1e-12
    # outside the cut-off: rank 3 with k=2 → 0
    assert ndcg_at_k([1.0, 3.0, 2.0], [1, 0, 0], 2) == 0.0


def test_ndcg_ties_are_not_broken_in_favour_of_the_positive():
    # A constant predictor must score like a random ranking, not 1.0 because the positive happens to come first.
    values = [ndcg_at_k([0.0] * 6, [1, 0, 0, 0, 0, 0], 10, seed=s) for s in range(400)]
    expected = sum(1 / math.log2(r + 2) for r in range(6)) / 6  # mean over the 6 equally likely positions
    assert abs(sum(values) / len(values) - expected) < 0.03
