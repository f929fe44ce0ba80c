"""Advantage estimators and reward combiners: pure tensor functions returning `(value, metrics)`.

Shape legend: N = samples (one completion each, flattened over all groups), G = groups (one prompt or request
each; given per sample as `group_ids_N`, any integer ids, groups may differ in size), L = semantic-ID levels,
V = codebook size of one level, P = a user's positive items, K = constraint rewards per sample, B/T = sequences and
tokens of a padded batch. Metrics are `dict[str, Tensor]` of 0-dim, detached tensors keyed `area/name`.

Tables the config picks from by name:

- `ADVANTAGE_ESTIMATORS`: group-relative estimators, all `fn(rewards_N, group_ids_N, *, eps=1e-6) ->
  (advantages_N, metrics)`:
  - `"grpo"`: (r - mean_g) / (std_g + eps), std with Bessel's correction (DeepSeekMath GRPO, as TRL/verl compute it).
  - `"mean_centred"` (alias `"dr_grpo"`): r - mean_g, no std division (Dr.GRPO, Liu et al. 2025, Sec. 3.1).
  - `"rloo"`: r - mean of the other samples of the group (Ahmadian et al. 2024, Eq. 6) = G/(G-1) (r - mean_g).
  In every estimator a group whose rewards are all equal gets exactly zero advantage (also a group of one) and is
  counted in `adv/zero_std_groups`.
- `MULTI_REWARD_COMBINERS`: `"constrained"` (RecGPT-V2 gated product) and `"weighted_sum"` (the baseline), both
  `fn(accuracy_N, constraints_NK, **knobs) -> (rewards_N, metrics)`.

- `REWARD_PAIR_ESTIMATORS`: `"a2po"` (S-GRec), over a business and a semantic reward kept apart.
- `LEVEL_ESTIMATORS`: `"hepo"` (GPR), over per-level rewards of semantic-ID actions with a value head.

Separate functions: `a2po_advantages` (S-GRec), `hepo_process_rewards` / `hepo_advantages` (GPR),
`broadcast_to_tokens`, and `select_for_judge`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

Metrics = dict[str, torch.Tensor]
AdvantageEstimator = Callable[..., tuple[torch.Tensor, Metrics]]


# --------------------------------------------------------------------------------------------------------------------
# Group bookkeeping: groups are given as ids, mapped to 0..G-1 with torch.unique so unequal sizes just work.
# --------------------------------------------------------------------------------------------------------------------


class _Groups(NamedTuple):
    index_N: torch.Tensor  # int64, group of each sample in 0..G-1
    num_groups: int


def _groups(group_ids_N: torch.Tensor, *like: torch.Tensor) -> _Groups:
    if group_ids_N.dim() != 1:
        raise ValueError(f"group_ids_N must be 1-D (one id per sample), got shape {tuple(group_ids_N.shape)}.")
    for t in like:
        if t.shape != group_ids_N.shape:
            raise ValueError(
                f"Per-sample tensors must all have shape {tuple(group_ids_N.shape)} like group_ids_N, "
                f"got {tuple(t.shape)}."
            )
    unique_G, index_N = torch.unique(group_ids_N, return_inverse=True)
    return _Groups(index_N, int(unique_G.numel()))


def _group_sum(values_N: torch.Tensor, groups: _Groups) -> torch.Tensor:
    return values_N.new_zeros(groups.num_groups).index_add_(0, groups.index_N, values_N)


def _group_stats(
    values_N: torch.Tensor, groups: _Groups, weight_N: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count_G, mean_G, unbiased std_G, is_constant_G) over the samples with weight 1 (all when weight is None).

    A group with fewer than 2 weighted samples has std 0 and counts as constant.
    """
    weight_N = torch.ones_like(values_N) if weight_N is None else weight_N.to(values_N.dtype)
    values_N = torch.where(weight_N > 0, values_N, torch.zeros_like(values_N))  # NaN in unweighted rows stays out
    count_G = _group_sum(weight_N, groups)
    mean_G = _group_sum(values_N * weight_N, groups) / count_G.clamp(min=1.0)
    sq_dev_N = (values_N - mean_G[groups.index_N]) ** 2 * weight_N
    var_G = _group_sum(sq_dev_N, groups) / (count_G - 1.0).clamp(min=1.0)
    big = torch.finfo(values_N.dtype).max
    hi_G = values_N.new_full((groups.num_groups,), -big).scatter_reduce(
        0, groups.index_N, torch.where(weight_N > 0, values_N, torch.full_like(values_N, -big)), "amax"
    )
    lo_G = values_N.new_full((groups.num_groups,), big).scatter_reduce(
        0, groups.index_N, torch.where(weight_N > 0, values_N, torch.full_like(values_N, big)), "amin"
    )
    # Exact equality (max == min), not std < tol: "equal rewards" must give exactly 0, and a tiny real spread must not.
    is_constant_G = (hi_G <= lo_G) | (count_G < 2)
    return count_G, mean_G, var_G.sqrt(), is_constant_G


def _zero_std_metrics(is_constant_G: torch.Tensor, advantages_N: torch.Tensor) -> Metrics:
    num_constant = is_constant_G.sum().to(advantages_N.dtype)
    return {
        "adv/zero_std_groups": num_constant.detach(),
        "adv/zero_std_frac": (num_constant / max(is_constant_G.numel(), 1)).detach(),
        "adv/abs_mean": advantages_N.abs().mean().detach() if advantages_N.numel() else advantages_N.new_zeros(()),
    }


def _group_zscore(
    values_N: torch.Tensor, groups: _Groups, *, eps: float, weight_N: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values - mean_g) / (std_g + eps) over weighted samples; 0 for unweighted samples and constant groups."""
    _, mean_G, std_G, is_constant_G = _group_stats(values_N, groups, weight_N)
    z_N = (values_N - mean_G[groups.index_N]) / (std_G[groups.index_N] + eps)
    keep_N = ~is_constant_G[groups.index_N]
    if weight_N is not None:
        keep_N = keep_N & (weight_N > 0)
    return torch.where(keep_N, z_N, torch.zeros_like(z_N)), is_constant_G


# --------------------------------------------------------------------------------------------------------------------
# Group-relative estimators (the ADVANTAGE_ESTIMATORS table)
# --------------------------------------------------------------------------------------------------------------------


def grpo_advantages(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, *, eps: float = 1e-6
) -> tuple[torch.Tensor, Metrics]:
    """GRPO (Shao et al. 2024, DeepSeekMath Eq. 3 outcome supervision): A_i = (r_i - mean_g r) / (std_g r + eps).

    rewards_N: float, one scalar reward per sample. group_ids_N: int, group of each sample.
    Returns advantages_N (same dtype as rewards). std_g is the unbiased (n-1) std, as `torch.std` gives; a group whose
    rewards are all equal (or that has one sample) gets exactly 0.
    """
    groups = _groups(group_ids_N, rewards_N)
    advantages_N, is_constant_G = _group_zscore(rewards_N, groups, eps=eps)
    return advantages_N, _zero_std_metrics(is_constant_G, advantages_N)


def mean_centred_advantages(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, *, eps: float = 1e-6
) -> tuple[torch.Tensor, Metrics]:
    """Dr.GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training", Sec. 3.1): A_i = r_i - mean_g r.

    Dropping the std removes GRPO's question-difficulty bias. rewards_N, group_ids_N: (N,). `eps` is unused, kept
    so every estimator in `ADVANTAGE_ESTIMATORS` shares one signature. Returns advantages_N.
    """
    del eps
    groups = _groups(group_ids_N, rewards_N)
    _, mean_G, _, is_constant_G = _group_stats(rewards_N, groups)
    advantages_N = rewards_N - mean_G[groups.index_N]
    advantages_N = torch.where(is_constant_G[groups.index_N], torch.zeros_like(advantages_N), advantages_N)
    return advantages_N, _zero_std_metrics(is_constant_G, advantages_N)


def rloo_advantages(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, *, eps: float = 1e-6
) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 6): A_i = r_i - 1/(G-1) sum_{j != i} r_j.

    Algebraically A_i = G/(G-1) (r_i - mean_g r), G the size of sample i's group; groups of one get 0.
    rewards_N, group_ids_N: (N,). `eps` is unused (shared signature). Returns advantages_N.
    """
    del eps
    groups = _groups(group_ids_N, rewards_N)
    count_G, mean_G, _, is_constant_G = _group_stats(rewards_N, groups)
    count_N = count_G[groups.index_N]
    advantages_N = count_N / (count_N - 1.0).clamp(min=1.0) * (rewards_N - mean_G[groups.index_N])
    advantages_N = torch.where(is_constant_G[groups.index_N], torch.zeros_like(advantages_N), advantages_N)
    return advantages_N, _zero_std_metrics(is_constant_G, advantages_N)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": grpo_advantages,
    "mean_centred": mean_centred_advantages,
    "dr_grpo": mean_centred_advantages,
    "rloo": rloo_advantages,
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under `name`, or a ValueError naming the choices and the closest match."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def _lookup(table: Mapping[str, Callable], name: str, what: str) -> Callable:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown {what} {name!r}; choose one of {sorted(table)}.{hint}")


def broadcast_to_tokens(advantages_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """One advantage per sequence copied onto each of its loss tokens: advantages_BT = advantages_B[:, None] * mask.

    advantages_B: float (B,). mask_BT: (B, T), 1 on tokens that enter the loss. Returns float (B, T), 0 on padding.
    """
    if advantages_B.dim() != 1 or mask_BT.dim() != 2 or mask_BT.shape[0] != advantages_B.shape[0]:
        raise ValueError(
            f"broadcast_to_tokens needs advantages_B (B,) and mask_BT (B, T); got {tuple(advantages_B.shape)} and "
            f"{tuple(mask_BT.shape)}."
        )
    return advantages_B[:, None] * mask_BT.to(advantages_B.dtype)


# --------------------------------------------------------------------------------------------------------------------
# A2PO (S-GRec): sign-gated, magnitude-bounded fusion of business and semantic advantages
# --------------------------------------------------------------------------------------------------------------------


def a2po_advantages(
    business_N: torch.Tensor,
    semantic_N: torch.Tensor,
    has_semantic_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, Metrics]:
    """A2PO advantages (S-GRec): A = A_biz + lambda * A_sem.

    A_biz is the GRPO z-score of the business reward within each group; A_sem the z-score of the semantic (judge)
    reward within each group over only the samples the judge scored. The fusion weight is
        lambda = 1[sign A_biz = sign A_sem] * min(|A_biz|, |A_sem|) / (max(|A_biz|, |A_sem|) + eps),
    so lambda * A_sem has A_biz's sign and |lambda * A_sem| <= |A_biz|: A never flips A_biz's sign and
    |A| <= 2 |A_biz|. Samples without a judge score (or whose group has fewer than two) get A = A_biz.

    business_N: float (N,). semantic_N: float (N,), ignored (may be NaN) where has_semantic_N is False.
    has_semantic_N: bool (N,). group_ids_N: int (N,). Returns advantages_N and metrics `a2po/frac_injected`
    (share of all samples with lambda > 0), `a2po/lambda_mean` (mean lambda over judged samples),
    `a2po/frac_judged`, plus the business estimator's `adv/*`.
    """
    groups = _groups(group_ids_N, business_N, semantic_N, has_semantic_N)
    judged_N = has_semantic_N.to(torch.bool)
    a_biz_N, is_constant_G = _group_zscore(business_N, groups, eps=eps)
    semantic_N = torch.where(judged_N, semantic_N, torch.zeros_like(semantic_N))
    a_sem_N, _ = _group_zscore(semantic_N, groups, eps=eps, weight_N=judged_N)
    abs_biz_N, abs_sem_N = a_biz_N.abs(), a_sem_N.abs()
    same_sign_N = (torch.sign(a_biz_N) == torch.sign(a_sem_N)) & judged_N
    ratio_N = torch.minimum(abs_biz_N, abs_sem_N) / (torch.maximum(abs_biz_N, abs_sem_N) + eps)
    lambda_N = torch.where(same_sign_N, ratio_N, torch.zeros_like(ratio_N))
    advantages_N = a_biz_N + lambda_N * a_sem_N
    num_judged = judged_N.sum().to(business_N.dtype)
    num_samples = max(business_N.numel(), 1)
    metrics = _zero_std_metrics(is_constant_G, advantages_N)
    metrics |= {
        "a2po/frac_injected": ((lambda_N > 0).sum().to(business_N.dtype) / num_samples).detach(),
        "a2po/lambda_mean": (lambda_N.sum() / num_judged.clamp(min=1.0)).detach(),
        "a2po/frac_judged": (num_judged / num_samples).detach(),
    }
    return advantages_N, metrics


REWARD_PAIR_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {"a2po": a2po_advantages}
"""Estimators over a business and a semantic reward kept apart (not their combined scalar), all
`fn(business_N, semantic_N, has_semantic_N, group_ids_N, *, eps) -> (advantages_N, metrics)`. The trainer reads the
two rewards named by `algorithm.business_reward` / `algorithm.semantic_reward` from each scored rollout."""


def select_for_judge(num_samples: int, *, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples get a semantic-judge call: exactly round(fraction * N) of them, uniformly without replacement.

    Returns bool (N,). fraction must lie in [0, 1]; pass a seeded `generator` for reproducible picks.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} is the share of samples sent to the judge; it must lie in [0, 1].")
    num_judged = round(fraction * num_samples)
    chosen = torch.randperm(num_samples, generator=generator)[:num_judged]
    return torch.zeros(num_samples, dtype=torch.bool).index_fill_(0, chosen, True)


# --------------------------------------------------------------------------------------------------------------------
# HEPO (GPR): process rewards over semantic-ID levels, GAE for l < L, z-score at the last level
# --------------------------------------------------------------------------------------------------------------------


def code_popularity(positive_codes_PL: torch.Tensor, *, codebook_size: int) -> torch.Tensor:
    """P_l(t): share of the user's positive items whose level-l semantic-ID code is t.

    positive_codes_PL: int64 (P, L), the codes of the user's positive items. Returns float32 (L, V) whose rows sum
    to 1 (all zeros when P = 0).
    """
    num_positives, num_levels = positive_codes_PL.shape
    counts_LV = torch.zeros(num_levels, codebook_size)
    counts_LV.scatter_add_(1, positive_codes_PL.T.long(), torch.ones(num_levels, num_positives))
    return counts_LV / max(num_positives, 1)


def hepo_process_rewards(
    codes_NL: torch.Tensor,
    popularity_NLV: torch.Tensor,
    legal_mask_NLV: torch.Tensor,
    business_N: torch.Tensor,
    *,
    alpha: Sequence[float],
) -> tuple[torch.Tensor, Metrics]:
    """HEPO (GPR) per-level rewards: r_l = alpha_l * max(0, P_l(z_l) - mean_{t legal} P_l(t)) for l < L; r_L = business.

    codes_NL: int64 (N, L), the generated code z_l at each level. popularity_NLV: float (N, L, V), P_l(t) for the
    user of sample n (see `code_popularity`). legal_mask_NLV: bool (N, L, V), codes the decoder may emit at that
    level (prefix-constrained). business_N: float (N,). alpha: L-1 floats, one per non-final level.
    Returns rewards_NL; metrics `hepo/process_reward_mean` (over the L-1 process levels).
    """
    num_levels = codes_NL.shape[1]
    if len(alpha) != num_levels - 1:
        raise ValueError(
            f"alpha has {len(alpha)} entries; HEPO needs one per non-final level, L - 1 = {num_levels - 1}."
        )
    legal_NLV = legal_mask_NLV.to(popularity_NLV.dtype)
    legal_mean_NL = (popularity_NLV * legal_NLV).sum(-1) / legal_NLV.sum(-1).clamp(min=1.0)
    chosen_NL = popularity_NLV.gather(-1, codes_NL.long().unsqueeze(-1)).squeeze(-1)
    alpha_L = torch.tensor([*alpha, 0.0], dtype=popularity_NLV.dtype, device=popularity_NLV.device)
    # Delta_l clipped at 0: a code less popular than the legal average earns nothing rather than a penalty.
    process_NL = alpha_L * (chosen_NL - legal_mean_NL).clamp(min=0.0)
    rewards_NL = torch.cat([process_NL[:, :-1], business_N.to(process_NL.dtype)[:, None]], dim=1)
    process_mean = process_NL[:, :-1].mean() if num_levels > 1 else process_NL.new_zeros(())
    return rewards_NL, {"hepo/process_reward_mean": process_mean.detach()}


class HepoTargets(NamedTuple):
    """advantages_NL: GAE for l < L, group z-score of the business reward at l = L. returns_NL: GAE value targets."""

    advantages_NL: torch.Tensor
    returns_NL: torch.Tensor


def hepo_advantages(
    rewards_NL: torch.Tensor,
    values_NL: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    eps: float = 1e-6,
) -> tuple[HepoTargets, Metrics]:
    """HEPO advantages over the L semantic-ID levels of each candidate (one decision per level, episode ends at L).

    GAE (Schulman et al. 2016, Eq. 16): delta_l = r_l + gamma V_{l+1} - V_l (V_{L+1} = 0), A_l = sum_k (gamma
    lam)^k delta_{l+k}; returns_l = A_l + V_l are the value-head targets for every level. The final level's advantage
    is replaced by the z-score of the business reward r_L over the request's candidates (its group), as in GRPO.

    rewards_NL: float (N, L) from `hepo_process_rewards`. values_NL: float (N, L), the value head's V(s_l) (detached
    by the caller). group_ids_N: int (N,), the request of each candidate. Returns HepoTargets and `adv/*` metrics of
    the last level.
    """
    if rewards_NL.shape != values_NL.shape or rewards_NL.dim() != 2:
        raise ValueError(f"rewards_NL and values_NL must both be (N, L); got {rewards_NL.shape} and {values_NL.shape}.")
    num_levels = rewards_NL.shape[1]
    gae_NL = torch.zeros_like(rewards_NL)
    running_N = torch.zeros_like(rewards_NL[:, 0])
    for level in reversed(range(num_levels)):
        next_value_N = values_NL[:, level + 1] if level + 1 < num_levels else torch.zeros_like(running_N)
        delta_N = rewards_NL[:, level] + gamma * next_value_N - values_NL[:, level]
        running_N = delta_N + gamma * lam * running_N
        gae_NL[:, level] = running_N
    returns_NL = gae_NL + values_NL
    last_N, metrics = grpo_advantages(rewards_NL[:, -1], group_ids_N, eps=eps)
    advantages_NL = torch.cat([gae_NL[:, :-1], last_N[:, None]], dim=1)
    metrics["hepo/value_mean"] = values_NL.mean().detach()
    return HepoTargets(advantages_NL, returns_NL), metrics


LEVEL_ESTIMATORS: dict[str, Callable[..., tuple[HepoTargets, Metrics]]] = {"hepo": hepo_advantages}
"""Estimators over per-level rewards of semantic-ID actions with a value head (the learner adds one for these):
`fn(rewards_NL, values_NL, group_ids_N, *, gamma, lam, eps) -> (HepoTargets, metrics)`; rl/hepo.py runs them."""


# --------------------------------------------------------------------------------------------------------------------
# Constrained multi-reward (RecGPT-V2) and its weighted-sum baseline
# --------------------------------------------------------------------------------------------------------------------


def _check_constraints(accuracy_N: torch.Tensor, constraints_NK: torch.Tensor, num_knobs: int, knob: str) -> None:
    if constraints_NK.dim() != 2 or constraints_NK.shape[0] != accuracy_N.shape[0]:
        raise ValueError(f"constraints_NK must be (N, K) with N = {accuracy_N.shape[0]}; got {constraints_NK.shape}.")
    if constraints_NK.shape[1] != num_knobs:
        raise ValueError(
            f"{knob} has {num_knobs} entries but constraints_NK has K = {constraints_NK.shape[1]} columns."
        )


def constrained_reward(
    accuracy_N: torch.Tensor, constraints_NK: torch.Tensor, *, thresholds: Sequence[float]
) -> tuple[torch.Tensor, Metrics]:
    """RecGPT-V2 constrained reward: R = R_acc * prod_k 1[R_k >= tau_k] (a gate, not a trade-off).

    accuracy_N: float (N,). constraints_NK: float (N, K), the K constraint rewards. thresholds: K floats tau_k.
    Returns rewards_N; metrics `constraint/pass_frac` (all gates open) and `constraint/k{k}_pass_frac`.
    """
    _check_constraints(accuracy_N, constraints_NK, len(thresholds), "thresholds")
    tau_K = torch.tensor(list(thresholds), dtype=constraints_NK.dtype, device=constraints_NK.device)
    pass_NK = constraints_NK >= tau_K
    pass_N = pass_NK.all(dim=1)
    rewards_N = torch.where(pass_N, accuracy_N, torch.zeros_like(accuracy_N))
    metrics = {"constraint/pass_frac": pass_N.to(accuracy_N.dtype).mean().detach()}
    for k in range(pass_NK.shape[1]):
        metrics[f"constraint/k{k}_pass_frac"] = pass_NK[:, k].to(accuracy_N.dtype).mean().detach()
    return rewards_N, metrics


def weighted_sum_reward(
    accuracy_N: torch.Tensor, constraints_NK: torch.Tensor, *, weights: Sequence[float], accuracy_weight: float = 1.0
) -> tuple[torch.Tensor, Metrics]:
    """Baseline for `constrained_reward`: R = w_acc * R_acc + sum_k w_k R_k.

    accuracy_N: float (N,). constraints_NK: float (N, K). weights: K floats w_k. Returns rewards_N; metric
    `constraint/weighted_share` = mean |sum_k w_k R_k| / mean |R| (how much of the reward the constraints carry).
    """
    _check_constraints(accuracy_N, constraints_NK, len(weights), "weights")
    w_K = torch.tensor(list(weights), dtype=constraints_NK.dtype, device=constraints_NK.device)
    extra_N = constraints_NK @ w_K
    rewards_N = accuracy_weight * accuracy_N + extra_N
    share = extra_N.abs().mean() / rewards_N.abs().mean().clamp(min=1e-12)
    return rewards_N, {"constraint/weighted_share": share.detach()}


MULTI_REWARD_COMBINERS: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "constrained": constrained_reward,
    "weighted_sum": weighted_sum_reward,
}
