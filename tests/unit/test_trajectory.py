"""rl.trajectory: reward shaping, broadcast advantages with 1/|tau| normalisation, adaptive reference update."""

from __future__ import annotations

import math

import pytest
import torch

from rl.losses import loss_denominator, policy_loss
from rl.trajectory import (
    TRAJECTORY_AGGREGATION,
    adaptive_reference_update,
    invalid_action_penalty,
    step_efficiency_rewards,
    trajectory_advantages,
)


def test_invalid_action_penalty_hand_computed():
    # 1 - .1 * 2 = .8; 0 - .1 * 0 = 0; .5 - .1 * 5 = 0
    rewards, metrics = invalid_action_penalty(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([2, 0, 5]), penalty=0.1)
    torch.testing.assert_close(rewards, torch.tensor([0.8, 0.0, 0.0]))
    torch.testing.assert_close(metrics["traj/invalid_actions_mean"], torch.tensor(7 / 3))
    with pytest.raises(ValueError, match=">= 0"):
        invalid_action_penalty(torch.zeros(1), torch.zeros(1), penalty=-1.0)


def test_step_efficiency_hand_computed():
    # Group 0: successes with 4, 6, 8 steps (T_min = 4), one failure with 3 steps; eta = .5
    #   factors .5^0 = 1, .5^(2/4) = 1/sqrt2, .5^(4/4) = .5; the failure keeps its reward (0.1).
    # Group 1: no success -> unchanged.
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.1, 0.2, 0.0])
    steps = torch.tensor([4, 6, 8, 3, 5, 9])
    success = torch.tensor([True, True, True, False, False, False])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    shaped, metrics = step_efficiency_rewards(rewards, steps, success, groups, eta=0.5)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 1 / math.sqrt(2), 0.5, 0.1, 0.2, 0.0]))
    torch.testing.assert_close(metrics["traj/efficiency_factor_mean"], torch.tensor((1 + 1 / math.sqrt(2) + 0.5) / 3))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        step_efficiency_rewards(rewards, steps, success, groups, eta=0.0)


def test_trajectory_advantage_broadcast_and_one_over_tau_normalisation():
    # Two trajectories of one task, rewards [1, 0] -> GRPO advantages +-1/sqrt2 (mean .5, unbiased std 1/sqrt2).
    # Action tokens: trajectory 0 has 2 (an observation token between them is masked), trajectory 1 has 4.
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    advantages, metrics = trajectory_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask, eps=0.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(advantages, torch.tensor([[s, 0.0, s, 0.0], [-s, -s, -s, -s]]))
    assert metrics["adv/zero_std_groups"] == 0.0
    # On-policy, the loss is 1/G sum_i 1/|tau_i| sum_t -A_i: (-(2 s)/2 + (4 s)/4) / 2 = 0, and the gradient on each
    # action token is -A_i / (|tau_i| G): trajectory 0 -> -s/4, trajectory 1 -> +s/8.
    logprobs = torch.full((2, 4), -1.0, requires_grad=True)
    denominator = loss_denominator(mask, aggregation=TRAJECTORY_AGGREGATION)
    loss, _ = policy_loss(
        logprobs, logprobs.detach(), advantages, mask, loss_denominator=denominator, aggregation=TRAJECTORY_AGGREGATION
    )
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.0))
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s / 4, 0.0, -s / 4, 0.0], [s / 8] * 4]))


def test_adaptive_reference_update():
    ref = {"w": torch.tensor([0.0, 2.0]), "position_ids": torch.tensor([0, 1])}
    policy = {"w": torch.tensor([1.0, 4.0]), "position_ids": torch.tensor([5, 6])}
    # Policy beats the reference by .3 >= delta .2: ref <- .9 ref + .1 policy = [.1, 2.2]; int buffers are kept.
    new, metrics = adaptive_reference_update(
        ref, policy, policy_score=torch.tensor(0.8), ref_score=torch.tensor(0.5), delta=0.2, decay=0.9
    )
    torch.testing.assert_close(new["w"], torch.tensor([0.1, 2.2]))
    assert torch.equal(new["position_ids"], ref["position_ids"]) and metrics["ref/updated"] == 1.0
    assert torch.equal(ref["w"], torch.tensor([0.0, 2.0]))  # inputs untouched
    # By only .1 < delta: unchanged.
    same, metrics = adaptive_reference_update(
        ref, policy, policy_score=torch.tensor(0.6), ref_score=torch.tensor(0.5), delta=0.2, decay=0.9
    )
    assert torch.equal(same["w"], ref["w"]) and metrics["ref/updated"] == 0.0
    with pytest.raises(ValueError, match="same parameters"):
        adaptive_reference_update(
            ref, {"w": policy["w"]}, policy_score=torch.tensor(1.0), ref_score=torch.tensor(0.0), delta=0, decay=0.5
        )
