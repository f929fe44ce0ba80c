"""Policy-gradient losses: pure tensor functions of log-probs returning `(loss, metrics)`.

Shape legend: B = sequences in this (micro-)batch, T = completion tokens per padded sequence, N = rows of a HEPO
batch (one candidate each), L = semantic-ID levels. `mask_BT` is 1 on tokens that enter the loss and 0 on padding
(prompt, pad, tool output); values at masked positions never reach the loss or its gradient, even NaN or inf.
Metrics are `dict[str, Tensor]` of 0-dim detached tensors keyed `area/name`.

Gradient accumulation equals one big batch because the caller passes the denominator. On the full batch, before
splitting into micro-batches, call `loss_denominator(mask_BT, aggregation=...)`; pass that same value to every
micro-batch's `policy_loss` and sum (not average) the micro-batch losses. The `loss/*` metrics use the same
denominator so they too sum to the full-batch value; the `clip/*`, `ratio/*`, `tis/*` metrics are means over this
call's tokens. With data parallelism take the denominator over the global batch and sum gradients across ranks
(DeepSpeed averages them: multiply the loss by the world size, or divide the denominator by it).

Tables the config picks from by name:

- `AGGREGATIONS`: how per-token losses become one scalar, each `fn(values_BT, mask_BT, *, denominator) -> scalar`:
  - `"token_mean"`: sum over all tokens / number of tokens (DAPO Eq. 12; TRL `dapo`/`bnpo`).
  - `"seq_mean_token_mean"`: mean over each sequence's tokens, summed over sequences / number of sequences
    (GRPO as in DeepSeekMath Eq. 3; TRL `grpo`; trajectory-level GRPO's 1/|tau| normalisation).
  - `"constant"` (alias `"dr_grpo"`): sum over all tokens / (number of sequences * max completion length)
    (Dr.GRPO, Liu et al. 2025, Eq. 2; TRL `dr_grpo`).
- `KL_ESTIMATORS`: per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman 2020,
  "Approximating KL divergence"): `"k1"` = log r', `"k2"` = (log r')^2 / 2, `"k3"` = exp(-log r') + log r' - 1 with
  log r' = log pi_theta - log pi_ref. No KL: `kl_coef=0`/None, `kl_estimator="none"` or `ref_logprobs_BT=None`.
- `ENTROPY_SCHEDULES`: entropy-bonus coefficient as a function of the step: `"constant"`, `"linear"`, `"cosine"`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence

import torch

Metrics = dict[str, torch.Tensor]


def _lookup(table: Mapping[str, Callable], name: str, what: str) -> Callable:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown {what} {name!r}; choose one of {sorted(table)}.{hint}")


# --------------------------------------------------------------------------------------------------------------------
# Aggregation and the full-batch denominator
# --------------------------------------------------------------------------------------------------------------------


def token_sum_over(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, *, denominator: torch.Tensor | float
) -> torch.Tensor:
    """sum_{b,t} m_bt x_bt / denominator: "token_mean" and "constant" (they differ only in the denominator)."""
    return (values_BT * mask_BT).sum() / denominator


def seq_mean_token_mean(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, *, denominator: torch.Tensor | float
) -> torch.Tensor:
    """sum_b [sum_t m_bt x_bt / sum_t m_bt] / denominator; sequences without loss tokens contribute 0."""
    per_seq_B = (values_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)
    return per_seq_B.sum() / denominator


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": token_sum_over,
    "seq_mean_token_mean": seq_mean_token_mean,
    "constant": token_sum_over,
    "dr_grpo": token_sum_over,
}


def loss_denominator(
    mask_BT: torch.Tensor, *, aggregation: str, max_completion_length: int | None = None
) -> torch.Tensor:
    """The full-batch normaliser for `aggregation`; call it on the whole batch before micro-batching.

    mask_BT: (B, T) loss mask of the full batch. Returns a 0-dim float tensor (at least 1):
    - "token_mean": number of loss tokens;
    - "seq_mean_token_mean": number of sequences with at least one loss token;
    - "constant"/"dr_grpo": that number of sequences * max_completion_length (required).
    Padding rows (no loss tokens) never count, so padding a micro-batch changes nothing.
    """
    _lookup(AGGREGATIONS, aggregation, "loss aggregation")
    mask_BT = mask_BT.to(torch.float32)
    num_sequences = (mask_BT.sum(-1) > 0).sum().to(torch.float32)
    if aggregation == "token_mean":
        return mask_BT.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_mean":
        return num_sequences.clamp(min=1.0)
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(
            f"aggregation={aggregation!r} (Dr.GRPO) divides by num_sequences * max_completion_length, so "
            f"max_completion_length must be a positive int; got {max_completion_length!r}. Pass the sampler's "
            "max_tokens."
        )
    return (num_sequences * max_completion_length).clamp(min=1.0)


# --------------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020); all are >= 0 in expectation, k3 pointwise, k2 pointwise
# --------------------------------------------------------------------------------------------------------------------


def kl_k1(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref: unbiased, high variance, can be negative. Shapes (B, T) -> (B, T)."""
    return logprobs_BT - ref_logprobs_BT


def kl_k2(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi_theta - log pi_ref)^2 / 2: biased, low variance, >= 0. Shapes (B, T) -> (B, T)."""
    return 0.5 * (logprobs_BT - ref_logprobs_BT) ** 2


def kl_k3(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor) -> torch.Tensor:
    """k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1: unbiased, >= 0 (GRPO's choice, DeepSeekMath Eq. 4)."""
    log_ref_over_pi_BT = ref_logprobs_BT - logprobs_BT
    return torch.exp(log_ref_over_pi_BT) - log_ref_over_pi_BT - 1.0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


# --------------------------------------------------------------------------------------------------------------------
# Entropy-bonus schedules: coefficient at a step, pure Python floats
# --------------------------------------------------------------------------------------------------------------------


def _progress(step: int, num_steps: int) -> float:
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: an entropy schedule needs num_steps >= 1 to decay over.")
    return min(max(step, 0), num_steps) / num_steps


def constant_schedule(step: int, *, start: float, end: float = 0.0, num_steps: int = 1) -> float:
    """Always `start`."""
    del step, end, num_steps
    return start


def linear_schedule(step: int, *, start: float, end: float = 0.0, num_steps: int = 1) -> float:
    """start + (end - start) * min(step, num_steps) / num_steps; `end` after num_steps."""
    return start + (end - start) * _progress(step, num_steps)


def cosine_schedule(step: int, *, start: float, end: float = 0.0, num_steps: int = 1) -> float:
    """end + (start - end) * (1 + cos(pi * min(step, num_steps) / num_steps)) / 2 (Loshchilov & Hutter 2017)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, num_steps)))


ENTROPY_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant_schedule,
    "linear": linear_schedule,
    "cosine": cosine_schedule,
}


def entropy_coef_at(step: int, *, schedule: str, start: float, end: float = 0.0, num_steps: int = 1) -> float:
    """The entropy-bonus coefficient at `step` under the named schedule (see `ENTROPY_SCHEDULES`)."""
    return _lookup(ENTROPY_SCHEDULES, schedule, "entropy schedule")(step, start=start, end=end, num_steps=num_steps)


# --------------------------------------------------------------------------------------------------------------------
# Clipped surrogate (PPO Eq. 7) with clip-higher (DAPO Eq. 10) and dual-clip (Ye et al. 2020, Eq. 5)
# --------------------------------------------------------------------------------------------------------------------


def clipped_surrogate(
    ratio_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A); dual-clip caps it at -c A for A < 0.

    ratio_BT: pi_theta / pi_old per token. advantages_BT: same shape (or broadcastable). dual_clip: c > 1 or None.
    Returns loss_BT and bool (B, T) masks `low` (r < 1 - clip_low, A < 0), `high` (r > 1 + clip_high, A > 0) and
    `dual` (the dual-clip bound is the active one), the regions where the gradient is cut.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low} and clip_high={clip_high} are PPO clip ranges; they must be >= 0.")
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    dual_BT = torch.zeros_like(loss_BT, dtype=torch.bool)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip={dual_clip}: the dual-clip bound c must be > 1 (the paper uses 3), or None.")
        # For A < 0 a huge ratio would make -rA unbounded; cap the loss at -cA (its gradient is then 0).
        cap_BT = -advantages_BT * dual_clip
        dual_BT = (advantages_BT < 0) & (cap_BT < loss_BT)
        loss_BT = torch.where(dual_BT, cap_BT, loss_BT)
    regions = {
        "low": (ratio_BT < 1.0 - clip_low) & (advantages_BT < 0),
        "high": (ratio_BT > 1.0 + clip_high) & (advantages_BT > 0),
        "dual": dual_BT,
    }
    return loss_BT, regions


def _masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return ((values_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)).detach()


def _zero_where_masked(mask_bool_BT: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    # torch.where (not multiplication) so NaN/inf at padding can neither reach the value nor, through exp, the gradient.
    return [None if t is None else torch.where(mask_bool_BT, t, torch.zeros_like(t)) for t in tensors]


def _tis_weights(
    old_logprobs_BT: torch.Tensor, sampler_logprobs_BT: torch.Tensor, tis_cap: float | None
) -> torch.Tensor:
    """Truncated importance sampling min(pi_old / pi_sampler, C) (Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training", Eq. 3): corrects the sampler/learner numeric mismatch."""
    if tis_cap is None or tis_cap <= 0:
        raise ValueError(
            f"sampler_logprobs_BT was given but tis_cap={tis_cap!r}; truncated importance sampling needs a positive "
            "cap C on pi_learner/pi_sampler (2.0 is common). Pass sampler_logprobs_BT=None to turn the correction off."
        )
    return torch.exp(old_logprobs_BT - sampler_logprobs_BT).clamp(max=tis_cap).detach()


# --------------------------------------------------------------------------------------------------------------------
# The GRPO-family policy loss
# --------------------------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    loss_denominator: torch.Tensor | float,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs_BT: torch.Tensor | None = None,
    kl_coef: float | None = 0.0,
    kl_estimator: str = "k3",
    kl_ratio_weighted: bool = False,
    entropy_BT: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    sampler_logprobs_BT: torch.Tensor | None = None,
    tis_cap: float | None = None,
    aggregation: str = "token_mean",
) -> tuple[torch.Tensor, Metrics]:
    """GRPO/DAPO/Dr.GRPO clipped policy loss with optional KL, entropy bonus and truncated IS; returns (loss, metrics).

    Per token: l = tis * -min(r A, clip(r, 1-clip_low, 1+clip_high) A) [dual-clipped] + kl_coef * KL - entropy_coef * H,
    with r = exp(logprobs - old_logprobs); then aggregated by `AGGREGATIONS[aggregation]` over `mask_BT` and divided
    by `loss_denominator` (from `loss_denominator(full_batch_mask, aggregation=...)`).

    logprobs_BT: float (B, T), the learner's log-probs, with grad. old_logprobs_BT: (B, T), log-probs of the policy
    that produced the samples (recomputed by the learner at rollout time, or the sampler's when not recomputed).
    advantages_BT: (B, T), or (B,) broadcast over tokens. mask_BT: (B, T), 1 on loss tokens.
    ref_logprobs_BT: (B, T) reference log-probs; KL is off when None, kl_coef is 0/None or kl_estimator is "none".
    kl_estimator: a key of `KL_ESTIMATORS` or "none". kl_ratio_weighted: multiply the KL by r (DeepSeek-V3.2's
    unbiased KL gradient; TRL's `use_bias_correction_kl`). dual_clip: c > 1 caps the loss of A < 0 tokens at -c A
    (Ye et al. 2020). entropy_BT: (B, T) per-token entropy with grad, needed when entropy_coef != 0.
    sampler_logprobs_BT: (B, T) the inference engine's log-probs; when given, the policy term is weighted by
    min(exp(old - sampler), tis_cap) (needs tis_cap). Metrics: `loss/total`, `loss/policy`, `loss/kl`, `loss/entropy`
    (same aggregation and denominator, so they sum over micro-batches), `clip/frac_low`, `clip/frac_high`,
    `clip/frac_dual`, `ratio/mean`, `tis/weight_mean`, `tis/frac_capped` (means over this call's tokens).
    """
    aggregate = _lookup(AGGREGATIONS, aggregation, "loss aggregation")
    if advantages_BT.dim() == 1:
        advantages_BT = advantages_BT[:, None]
    advantages_BT = advantages_BT.expand_as(logprobs_BT)
    use_kl = ref_logprobs_BT is not None and bool(kl_coef) and kl_estimator != "none"
    kl_fn = _lookup(KL_ESTIMATORS, kl_estimator, "KL estimator") if use_kl else None
    if entropy_coef and entropy_BT is None:
        raise ValueError(f"entropy_coef={entropy_coef} but entropy_BT is None; pass the per-token entropy.")
    valid_BT = mask_BT > 0
    mask_BT = torch.where(valid_BT, mask_BT, torch.zeros_like(mask_BT)).to(logprobs_BT.dtype)
    logprobs_BT, old_BT, adv_BT, ref_BT, ent_BT, sampler_BT = _zero_where_masked(
        valid_BT, logprobs_BT, old_logprobs_BT, advantages_BT, ref_logprobs_BT, entropy_BT, sampler_logprobs_BT
    )
    ratio_BT = torch.exp(logprobs_BT - old_BT)
    pg_BT, regions = clipped_surrogate(ratio_BT, adv_BT, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    metrics: Metrics = {}
    if sampler_BT is not None:
        tis_BT = _tis_weights(old_BT, sampler_BT, tis_cap)
        pg_BT = pg_BT * tis_BT
        metrics["tis/weight_mean"] = _masked_mean(tis_BT, mask_BT)
        metrics["tis/frac_capped"] = _masked_mean((tis_BT >= tis_cap).to(mask_BT.dtype), mask_BT)
    total_BT = pg_BT
    agg = lambda x_BT: aggregate(x_BT, mask_BT, denominator=loss_denominator)
    if use_kl:
        kl_BT = kl_fn(logprobs_BT, ref_BT)
        kl_BT = kl_BT * ratio_BT if kl_ratio_weighted else kl_BT
        total_BT = total_BT + kl_coef * kl_BT
        metrics["loss/kl"] = agg(kl_BT).detach()
    if ent_BT is not None:
        total_BT = total_BT - entropy_coef * ent_BT
        metrics["loss/entropy"] = agg(ent_BT).detach()
    loss = agg(total_BT)
    metrics |= {
        "loss/total": loss.detach(),
        "loss/policy": agg(pg_BT).detach(),
        "ratio/mean": _masked_mean(ratio_BT, mask_BT),
    }
    for name, region_BT in regions.items():
        metrics[f"clip/frac_{name}"] = _masked_mean(region_BT.to(mask_BT.dtype), mask_BT)
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# HEPO (GPR): per-level clipped loss weighted by c_l, plus the value loss
# --------------------------------------------------------------------------------------------------------------------


def hepo_loss(
    logprobs_NL: torch.Tensor,
    old_logprobs_NL: torch.Tensor,
    advantages_NL: torch.Tensor,
    values_NL: torch.Tensor,
    returns_NL: torch.Tensor,
    *,
    level_weights: Sequence[float],
    loss_denominator: torch.Tensor | float,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    value_coef: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """HEPO loss: sum_l c_l * clipped surrogate at level l + value_coef * (V_l - R_l)^2 / 2 summed over levels.

    Each level's action is one semantic-ID code token. logprobs_NL: float (N, L), the code tokens' log-probs under
    the current policy, with grad. old_logprobs_NL: (N, L) under the sampling policy. advantages_NL, returns_NL:
    (N, L) from `rl.advantages.hepo_advantages`. values_NL: (N, L), the value head's outputs with grad.
    level_weights: L floats c_l. loss_denominator: number of candidates N in the full batch (so micro-batches sum).
    Returns loss and metrics `loss/total`, `loss/policy`, `loss/value`, `loss/policy_level{l}`, `clip/frac_low`,
    `clip/frac_high`.
    """
    num_levels = logprobs_NL.shape[1]
    if len(level_weights) != num_levels:
        raise ValueError(f"level_weights has {len(level_weights)} entries; HEPO needs one per level, L = {num_levels}.")
    ratio_NL = torch.exp(logprobs_NL - old_logprobs_NL)
    pg_NL, regions = clipped_surrogate(ratio_NL, advantages_NL, clip_low=clip_low, clip_high=clip_high)
    c_L = torch.tensor(list(level_weights), dtype=pg_NL.dtype, device=pg_NL.device)
    per_level_L = pg_NL.sum(0) / loss_denominator
    policy = (c_L * per_level_L).sum()
    # Value regression to the GAE returns (PPO Eq. 9's L^VF with the conventional 1/2).
    value = 0.5 * ((values_NL - returns_NL.detach()) ** 2).sum() / loss_denominator
    loss = policy + value_coef * value
    metrics: Metrics = {"loss/total": loss.detach(), "loss/policy": policy.detach(), "loss/value": value.detach()}
    for level in range(num_levels):
        metrics[f"loss/policy_level{level}"] = per_level_L[level].detach()
    metrics["clip/frac_low"] = regions["low"].to(pg_NL.dtype).mean().detach()
    metrics["clip/frac_high"] = regions["high"].to(pg_NL.dtype).mean().detach()
    return loss, metrics
