"""rl.advantages: hand-computed values and invariants (equal rewards -> 0, A2PO bounds, HEPO reduction)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    MULTI_REWARD_COMBINERS,
    a2po_advantages,
    broadcast_to_tokens,
    code_popularity,
    constrained_reward,
    get_advantage_estimator,
    grpo_advantages,
    hepo_advantages,
    hepo_process_rewards,
    mean_centred_advantages,
    rloo_advantages,
    select_for_judge,
    weighted_sum_reward,
)

SQRT3 = math.sqrt(3.0)

# Three groups with arbitrary ids, unequal sizes, interleaved order:
#   id 7:  [1, 0, 0, 1]  mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3)
#   id 3:  [2, 2]        all equal
#   id 42: [0, 3, 6]     mean 3, unbiased var = (9 + 0 + 9) / 2 = 9, std = 3
REWARDS = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 2.0, 3.0, 1.0, 6.0])
GROUPS = torch.tensor([7, 3, 42, 7, 7, 3, 42, 7, 42])


def test_grpo_hand_computed():
    # id 7: +-0.5 / (1/sqrt 3) = +-sqrt(3)/2; id 42: (r - 3) / 3 = -1, 0, 1; id 3: 0.
    h = SQRT3 / 2
    advantages, metrics = grpo_advantages(REWARDS, GROUPS, eps=0.0)
    torch.testing.assert_close(advantages, torch.tensor([h, 0.0, -1.0, -h, -h, 0.0, 0.0, h, 1.0]))
    assert metrics["adv/zero_std_groups"] == 1.0
    torch.testing.assert_close(metrics["adv/zero_std_frac"], torch.tensor(1 / 3))


def test_grpo_eps_enters_denominator():
    # id 42 with eps = 1: (6 - 3) / (3 + 1) = 0.75.
    advantages, _ = grpo_advantages(REWARDS, GROUPS, eps=1.0)
    torch.testing.assert_close(advantages[8], torch.tensor(0.75))


def test_mean_centred_hand_computed():
    # r - mean: id 7 -> +-0.5, id 42 -> -3, 0, 3.
    advantages, metrics = mean_centred_advantages(REWARDS, GROUPS)
    torch.testing.assert_close(advantages, torch.tensor([0.5, 0.0, -3.0, -0.5, -0.5, 0.0, 0.0, 0.5, 3.0]))
    assert metrics["adv/zero_std_groups"] == 1.0
    assert ADVANTAGE_ESTIMATORS["dr_grpo"] is mean_centred_advantages


def test_rloo_hand_computed():
    # id 7, r=1: 1 - (0 + 0 + 1)/3 = 2/3; r=0: 0 - (1 + 0 + 1)/3 = -2/3.
    # id 42, r=0: 0 - (3 + 6)/2 = -4.5; r=3: 3 - (0 + 6)/2 = 0; r=6: 6 - (0 + 3)/2 = 4.5.
    t = 2 / 3
    advantages, _ = rloo_advantages(REWARDS, GROUPS)
    torch.testing.assert_close(advantages, torch.tensor([t, 0.0, -4.5, -t, -t, 0.0, 0.0, t, 4.5]))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_equal_rewards_give_exactly_zero_and_are_counted(name):
    # 0.1 is not exactly representable: mean(0.1, 0.1, 0.1) - 0.1 may be ~1e-9, yet the advantage must be exactly 0.
    # Groups: id 0 = [0.1]*3 (equal), id 1 = [5] (one sample), id 2 = [1, 2] (varies).
    rewards = torch.tensor([0.1, 0.1, 0.1, 5.0, 1.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    advantages, metrics = ADVANTAGE_ESTIMATORS[name](rewards, groups, eps=1e-6)
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert (advantages[4:] != 0).all()
    assert metrics["adv/zero_std_groups"] == 2.0


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.integers(-3, 3), min_size=1, max_size=12),
    group_of=st.lists(st.integers(0, 3), min_size=12, max_size=12),
    name=st.sampled_from(sorted(ADVANTAGE_ESTIMATORS)),
)
def test_estimators_properties(rewards, group_of, name):
    rewards_N = torch.tensor(rewards, dtype=torch.float32)
    groups_N = torch.tensor(group_of[: len(rewards)])
    advantages, metrics = ADVANTAGE_ESTIMATORS[name](rewards_N, groups_N, eps=1e-6)
    num_constant = 0
    for g in groups_N.unique():
        in_group = groups_N == g
        if rewards_N[in_group].unique().numel() == 1:
            num_constant += 1
            assert torch.equal(advantages[in_group], torch.zeros(int(in_group.sum())))
        # Every estimator is centred within the group.
        assert abs(float(advantages[in_group].sum())) < 1e-4
    assert metrics["adv/zero_std_groups"] == num_constant
    # Permuting the samples permutes the advantages.
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(0))
    permuted, _ = ADVANTAGE_ESTIMATORS[name](rewards_N[perm], groups_N[perm], eps=1e-6)
    torch.testing.assert_close(permuted, advantages[perm])


def test_estimator_lookup_suggests_a_name():
    assert get_advantage_estimator("rloo") is rloo_advantages
    with pytest.raises(ValueError, match="Did you mean 'grpo'"):
        get_advantage_estimator("grpoo")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------------------------------------------------
# A2PO
# --------------------------------------------------------------------------------------------------------------------


def test_a2po_hand_computed():
    # Group 0: business [1, 0, 0, 1] -> A_biz = [h, -h, -h, h], h = sqrt(3)/2 (as in the GRPO test).
    #   semantic [3, 1, 2, NaN], judged [T, T, T, F]: over the judged, mean 2, unbiased std 1 -> A_sem = [1, -1, 0, -].
    #   s0: same sign, lambda = min(h, 1) / max(h, 1) = h -> A = h + h * 1 = 2h = sqrt(3)
    #   s1: same sign, lambda = h -> A = -h + h * (-1) = -sqrt(3)
    #   s2: sign(A_sem) = 0 != -1 -> lambda = 0 -> A = -h;  s3: not judged -> A = h
    # Group 1: business [0, 1, 2] -> mean 1, std 1 -> A_biz = [-1, 0, 1].
    #   semantic [0, 5, 1], all judged: mean 2, var (4 + 9 + 1)/2 = 7 -> A_sem = [-2, 3, -1]/sqrt(7).
    #   s4: same sign, lambda = (2/sqrt7) / 1 -> A = -1 + (2/sqrt7)(-2/sqrt7) = -1 - 4/7 = -11/7
    #   s5: A_biz = 0, sign 0 != + -> A = 0;  s6: opposite signs -> A = 1
    h = SQRT3 / 2
    business = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 2.0])
    semantic = torch.tensor([3.0, 1.0, 2.0, float("nan"), 0.0, 5.0, 1.0])
    judged = torch.tensor([True, True, True, False, True, True, True])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    advantages, metrics = a2po_advantages(business, semantic, judged, groups, eps=0.0)
    expected = torch.tensor([SQRT3, -SQRT3, -h, h, -11 / 7, 0.0, 1.0])
    torch.testing.assert_close(advantages, expected)
    # injected: s0, s1, s4 -> 3/7; lambda over the 6 judged: (h + h + 0 + 2/sqrt7 + 0 + 0) / 6.
    torch.testing.assert_close(metrics["a2po/frac_injected"], torch.tensor(3 / 7))
    torch.testing.assert_close(metrics["a2po/lambda_mean"], torch.tensor((2 * h + 2 / math.sqrt(7)) / 6))
    torch.testing.assert_close(metrics["a2po/frac_judged"], torch.tensor(6 / 7))


def test_a2po_without_semantic_scores_is_grpo():
    business = torch.tensor([1.0, 0.0, 4.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    advantages, metrics = a2po_advantages(business, torch.zeros(5), torch.zeros(5, dtype=torch.bool), groups)
    torch.testing.assert_close(advantages, grpo_advantages(business, groups)[0])
    assert metrics["a2po/frac_injected"] == 0.0 and metrics["a2po/lambda_mean"] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    business=st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=2, max_size=10),
    semantic=st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=10, max_size=10),
    judged=st.lists(st.booleans(), min_size=10, max_size=10),
    group_of=st.lists(st.integers(0, 2), min_size=10, max_size=10),
)
def test_a2po_never_flips_sign_nor_exceeds_twice_business(business, semantic, judged, group_of):
    n = len(business)
    business_N = torch.tensor(business)
    groups_N = torch.tensor(group_of[:n])
    a_biz, _ = grpo_advantages(business_N, groups_N)
    advantages, _ = a2po_advantages(business_N, torch.tensor(semantic[:n]), torch.tensor(judged[:n]), groups_N)
    assert torch.equal(torch.sign(advantages), torch.sign(a_biz))
    assert (advantages.abs() <= 2 * a_biz.abs() + 1e-6).all()


def test_select_for_judge():
    mask = select_for_judge(8, fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and int(mask.sum()) == 2  # round(0.25 * 8) = 2
    again = select_for_judge(8, fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert int(select_for_judge(5, fraction=1.0).sum()) == 5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        select_for_judge(4, fraction=1.5)


# --------------------------------------------------------------------------------------------------------------------
# HEPO
# --------------------------------------------------------------------------------------------------------------------


def test_code_popularity_hand_computed():
    # Positives' codes (level 0, level 1): (0, 1), (0, 2), (1, 2); V = 3.
    # Level 0 counts [2, 1, 0] / 3; level 1 counts [0, 1, 2] / 3.
    popularity = code_popularity(torch.tensor([[0, 1], [0, 2], [1, 2]]), codebook_size=3)
    torch.testing.assert_close(popularity, torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]) / 3)
    assert torch.equal(code_popularity(torch.zeros(0, 2, dtype=torch.long), codebook_size=3), torch.zeros(2, 3))


def test_hepo_process_rewards_hand_computed():
    # L = 3, V = 4, one sample.
    # level 0: P = [.5, .25, .25, 0], all legal -> mean .25; code 0 -> Delta = .25; alpha_0 = 2 -> r_0 = .5
    # level 1: P = [0, .5, .5, 0], legal {0, 1} -> mean .25; code 0 -> Delta = -.25 -> clipped to 0 -> r_1 = 0
    # level 2: business value 3.
    popularity = torch.tensor([[[0.5, 0.25, 0.25, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    legal = torch.tensor([[[True] * 4, [True, True, False, False], [True] * 4]])
    rewards, metrics = hepo_process_rewards(
        torch.tensor([[0, 0, 1]]), popularity, legal, torch.tensor([3.0]), alpha=(2.0, 1.0)
    )
    torch.testing.assert_close(rewards, torch.tensor([[0.5, 0.0, 3.0]]))
    torch.testing.assert_close(metrics["hepo/process_reward_mean"], torch.tensor(0.25))  # (0.5 + 0) / 2
    with pytest.raises(ValueError, match="one per non-final level"):
        hepo_process_rewards(torch.tensor([[0, 0, 1]]), popularity, legal, torch.tensor([3.0]), alpha=(1.0,))


def test_hepo_advantages_hand_computed():
    # gamma = 0.9, lam = 0.5 (gamma * lam = 0.45); one request with two candidates; V_{L+1} = 0.
    # row 0: r = [.5, 0, 3], V = [1, 2, 2.5]
    #   delta_2 = 3 - 2.5 = .5; delta_1 = 0 + .9 * 2.5 - 2 = .25; delta_0 = .5 + .9 * 2 - 1 = 1.3
    #   A_2 = .5; A_1 = .25 + .45 * .5 = .475; A_0 = 1.3 + .45 * .475 = 1.51375; returns = A + V
    # row 1: r = [0, 0, 1], V = 0 -> delta = [0, 0, 1]; A_2 = 1, A_1 = .45, A_0 = .2025
    # last level replaced by the z-score of business [3, 1]: mean 2, unbiased std sqrt 2 -> +-1/sqrt 2
    rewards = torch.tensor([[0.5, 0.0, 3.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 2.5], [0.0, 0.0, 0.0]])
    targets, metrics = hepo_advantages(rewards, values, torch.tensor([5, 5]), gamma=0.9, lam=0.5, eps=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(targets.advantages_NL, torch.tensor([[1.51375, 0.475, s], [0.2025, 0.45, -s]]))
    torch.testing.assert_close(targets.returns_NL, torch.tensor([[2.51375, 2.475, 3.0], [0.2025, 0.45, 1.0]]))
    assert metrics["adv/zero_std_groups"] == 0.0


def test_hepo_one_level_alpha_zero_is_zscored_last_level():
    # With L = 1 there are no process levels (alpha empty): reward = business, advantage = GRPO z-score.
    business = torch.tensor([1.0, 4.0, 2.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    popularity = torch.rand(5, 1, 4, generator=torch.Generator().manual_seed(0))
    rewards, _ = hepo_process_rewards(
        torch.zeros(5, 1, dtype=torch.long), popularity, torch.ones(5, 1, 4, dtype=torch.bool), business, alpha=()
    )
    targets, _ = hepo_advantages(rewards, torch.randn(5, 1), groups)
    torch.testing.assert_close(targets.advantages_NL[:, 0], grpo_advantages(business, groups)[0])


# --------------------------------------------------------------------------------------------------------------------
# Constrained multi-reward
# --------------------------------------------------------------------------------------------------------------------

ACCURACY = torch.tensor([1.0, 0.5, 0.8])
CONSTRAINTS = torch.tensor([[0.9, 0.2], [0.95, 0.6], [0.4, 0.9]])


def test_constrained_reward_hand_computed():
    # tau = [.5, .5]: row 0 fails k1 (.2), row 1 passes both, row 2 fails k0 (.4) -> R = [0, .5, 0].
    rewards, metrics = constrained_reward(ACCURACY, CONSTRAINTS, thresholds=[0.5, 0.5])
    torch.testing.assert_close(rewards, torch.tensor([0.0, 0.5, 0.0]))
    torch.testing.assert_close(metrics["constraint/pass_frac"], torch.tensor(1 / 3))
    torch.testing.assert_close(metrics["constraint/k0_pass_frac"], torch.tensor(2 / 3))
    torch.testing.assert_close(metrics["constraint/k1_pass_frac"], torch.tensor(2 / 3))
    # A reward exactly at the threshold passes (>=).
    at_threshold, _ = constrained_reward(torch.tensor([1.0]), torch.tensor([[0.5, 0.5]]), thresholds=[0.5, 0.5])
    assert at_threshold == 1.0


def test_weighted_sum_reward_hand_computed():
    # w = [.5, .25]: 1 + .45 + .05 = 1.5; .5 + .475 + .15 = 1.125; .8 + .2 + .225 = 1.225.
    rewards, _ = weighted_sum_reward(ACCURACY, CONSTRAINTS, weights=[0.5, 0.25])
    torch.testing.assert_close(rewards, torch.tensor([1.5, 1.125, 1.225]))
    assert MULTI_REWARD_COMBINERS["weighted_sum"] is weighted_sum_reward
    with pytest.raises(ValueError, match="K = 2"):
        constrained_reward(ACCURACY, CONSTRAINTS, thresholds=[0.5])
