"""Trajectory-level GRPO for multi-turn agents (GUI): one reward per trajectory, shaped, broadcast to action tokens.

Shape legend: B = trajectories (one padded row each: every turn's observation and action tokens in order), T =
tokens per row, N = B when talking about per-trajectory scalars. `action_mask_BT` is 1 on the agent's action
tokens only (observations and padding are 0).

The pieces, in the order a recipe applies them:
1. `invalid_action_penalty`: R - penalty * (number of unparsable actions).
2. `step_efficiency_rewards`: R * eta^((T - T_min) / T_min) for successes, T_min = fewest steps among the group's
   successes, so among successful trajectories shorter ones score higher.
3. `trajectory_advantages`: a group-relative estimator from `rl.advantages.ADVANTAGE_ESTIMATORS` on the per-trajectory
   rewards, broadcast to every action token.
4. The loss: `rl.losses.policy_loss` with `aggregation=TRAJECTORY_AGGREGATION` ("seq_mean_token_mean"), which is the
   1/|tau| normalisation: each trajectory's per-token losses are averaged over its |tau| action tokens, then
   averaged over trajectories. The entropy bonus decays with `rl.losses.entropy_coef_at(step, schedule="linear", ...)`.
5. `adaptive_reference_update`: after evaluation, move the reference towards the policy (EMA) when the policy beats
   it by at least delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rl.advantages import broadcast_to_tokens, get_advantage_estimator

Metrics = dict[str, torch.Tensor]

TRAJECTORY_AGGREGATION = "seq_mean_token_mean"
"""Aggregation key for `rl.losses.policy_loss` that implements the 1/|tau| per-trajectory normalisation."""


def invalid_action_penalty(
    rewards_N: torch.Tensor, num_invalid_N: torch.Tensor, *, penalty: float
) -> tuple[torch.Tensor, Metrics]:
    """R - penalty * num_invalid: each unparsable action costs `penalty` (>= 0).

    rewards_N: float (N,). num_invalid_N: int or float (N,), unparsable actions in each trajectory. Returns rewards_N
    and `traj/invalid_actions_mean`.
    """
    if penalty < 0:
        raise ValueError(f"penalty={penalty} is subtracted per unparsable action; it must be >= 0.")
    num_invalid_N = num_invalid_N.to(rewards_N.dtype)
    return rewards_N - penalty * num_invalid_N, {"traj/invalid_actions_mean": num_invalid_N.mean().detach()}


def step_efficiency_rewards(
    rewards_N: torch.Tensor,
    num_steps_N: torch.Tensor,
    success_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    eta: float,
) -> tuple[torch.Tensor, Metrics]:
    """Step-efficiency decay for successes: R * eta^((T - T_min) / T_min), T_min = min steps over the group's successes.

    rewards_N: float (N,). num_steps_N: int (N,), steps taken (>= 1). success_N: bool (N,). group_ids_N: int (N,),
    trajectories of the same task. eta in (0, 1]. Failures and groups with no success keep their reward.
    Returns rewards_N and `traj/efficiency_factor_mean` (over successes).
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta={eta} is the per-extra-step decay; it must lie in (0, 1] (1 turns it off).")
    unique_G, index_N = torch.unique(group_ids_N, return_inverse=True)
    success_N = success_N.to(torch.bool)
    steps_N = num_steps_N.to(rewards_N.dtype)
    big = torch.finfo(rewards_N.dtype).max
    masked_steps_N = torch.where(success_N, steps_N, torch.full_like(steps_N, big))
    t_min_G = torch.full((unique_G.numel(),), big, dtype=steps_N.dtype)
    t_min_G = t_min_G.scatter_reduce(0, index_N, masked_steps_N, "amin")
    t_min_N = t_min_G[index_N].clamp(min=1.0)
    factor_N = torch.where(success_N, eta ** ((steps_N - t_min_N) / t_min_N), torch.ones_like(steps_N))
    num_success = success_N.sum().to(rewards_N.dtype)
    factor_mean = torch.where(success_N, factor_N, torch.zeros_like(factor_N)).sum() / num_success.clamp(min=1.0)
    return rewards_N * factor_N, {"traj/efficiency_factor_mean": factor_mean.detach()}


def trajectory_advantages(
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    action_mask_BT: torch.Tensor,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, Metrics]:
    """Group-relative advantage of each trajectory's reward, copied onto every one of its action tokens.

    rewards_B: float (B,), one (shaped) reward per trajectory. group_ids_B: int (B,), trajectories of the same task
    instance. action_mask_BT: (B, T). estimator: a key of `rl.advantages.ADVANTAGE_ESTIMATORS`.
    Returns advantages_BT (0 off action tokens) and the estimator's metrics.
    """
    advantages_B, metrics = get_advantage_estimator(estimator)(rewards_B, group_ids_B, eps=eps)
    return broadcast_to_tokens(advantages_B, action_mask_BT), metrics


def adaptive_reference_update(
    ref_state: Mapping[str, torch.Tensor],
    policy_state: Mapping[str, torch.Tensor],
    *,
    policy_score: torch.Tensor,
    ref_score: torch.Tensor,
    delta: float,
    decay: float,
) -> tuple[dict[str, torch.Tensor], Metrics]:
    """Adaptive reference: ref <- decay * ref + (1 - decay) * policy when policy_score >= ref_score + delta.

    ref_state, policy_state: parameter name -> tensor (same names, shapes). policy_score, ref_score: 0-dim float
    (e.g. success rate of each on the same evaluation tasks). decay in [0, 1] (0 copies the policy). The condition
    stays a tensor (no host sync); the update is `torch.lerp` with weight (1 - decay) * 1[condition]. Returns the new
    reference state (new float tensors; inputs untouched) and `ref/updated` (1.0 or 0.0).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay} is the EMA weight kept on the old reference; it must lie in [0, 1].")
    if set(ref_state) != set(policy_state):
        missing = sorted(set(ref_state) ^ set(policy_state))[:5]
        raise ValueError(f"ref_state and policy_state must name the same parameters; they differ on {missing}.")
    updated = (policy_score >= ref_score + delta).to(torch.float32)
    weight = (1.0 - decay) * updated
    # Integer buffers (e.g. position ids) are not parameters: they are kept as they are.
    new_state = {
        name: torch.lerp(ref, policy_state[name].to(ref.dtype), weight.to(ref.device, ref.dtype))
        if ref.is_floating_point()
        else ref
        for name, ref in ref_state.items()
    }
    return new_state, {"ref/updated": updated.detach()}
