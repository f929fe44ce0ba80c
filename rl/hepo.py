"""HEPO (GPR) in the step loop: per-level rewards, the critic's values, GAE, and the per-level `TrainBatch`.

With `algorithm.advantage: hepo` each rollout is one generated semantic ID, and its L code tokens are L actions. The
trainer (rl/trainer.py) asks the recipe's level coder (`LevelCoder`, e.g. rollouts/sid_levels.py) for the codes,
the trie's legal codes at each level and the codes of the user's positive items (`rl.types.SIDLevels`), then
`hepo_batch`:

1. r_l = alpha_l * max(0, P_l(z_l) - mean_{t legal} P_l(t)) for l < L, with P_l the share of the user's positive
   items whose level-l code is t (`rl.advantages.code_popularity`), and r_L = the business reward
   (`algorithm.business_reward`'s score) — `rl.advantages.hepo_process_rewards`;
2. V(s_l) from the learner's value head on the batch (`values_fn`, i.e. `LearnerGroup.values`);
3. GAE(gamma, lambda) for l < L and the z-score of r_L over the request's K candidates (its rollout group) at L —
   `rl.advantages.hepo_advantages`;
4. a TrainBatch whose loss mask covers only the L code tokens, with each level's advantage on its token,
   `level_positions_BL` and the value targets `returns_BL` (the learner's `rl.value_head.hepo_micro_loss`).

Tokens after the last level (EOS) are forced by the trie and carry no loss. This module is pure (no ray, vllm or
deepspeed). Shape legend: N = B candidates, T tokens, L levels, V codes per level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import torch

from rl.advantages import code_popularity, hepo_advantages, hepo_process_rewards
from rl.types import ScoredRollout, SIDLevels, TrainBatch

Metrics = dict[str, torch.Tensor]


class LevelCoder(Protocol):
    """Reads the generated semantic IDs of scored rollouts as per-level codes (see rollouts/sid_levels.py)."""

    def __call__(self, scored: Sequence[ScoredRollout]) -> SIDLevels: ...


def per_level(values: Sequence[float], num_levels: int, key: str) -> list[float]:
    """One value per level: `values` itself when it has `num_levels` entries, or its single entry for every level."""
    if len(values) == 1:
        return [float(values[0])] * num_levels
    if len(values) != num_levels:
        raise ValueError(f"{key} has {len(values)} entries, but these semantic IDs need {num_levels} (or a single "
                         "value for all). With L = the index's SID length (data.sid_levels, plus one when colliding "
                         "items got an extra level): hepo_level_weights takes L values, hepo_alpha L - 1.")
    return [float(v) for v in values]


def level_positions(scored: Sequence[ScoredRollout], num_levels: int) -> torch.Tensor:
    """int64 (N, L): position in prompt + completion of each level's code token (the first L completion tokens)."""
    rows = []
    for item in scored:
        r = item.rollout
        if len(r.completion_token_ids) < num_levels:
            raise ValueError(f"Rollout {r.rollout_id} has {len(r.completion_token_ids)} completion tokens, fewer "
                             f"than the {num_levels} semantic-ID levels HEPO scores; set rollout.sid_index (so "
                             "every completion is one whole SID) and rollout.max_new_tokens >= L + 1.")
        start = len(r.prompt_token_ids)
        rows.append(list(range(start, start + num_levels)))
    return torch.tensor(rows, dtype=torch.int64)


def with_levels(batch: TrainBatch, positions_NL: torch.Tensor, advantages_NL: torch.Tensor | None = None,
                returns_NL: torch.Tensor | None = None) -> TrainBatch:
    """`batch` with loss only on the level tokens, their advantages in place, and the per-level fields set."""
    loss_mask_BT = torch.zeros_like(batch.loss_mask_BT).scatter_(1, positions_NL, 1.0)
    advantages_BT = torch.zeros_like(batch.advantages_BT)
    if advantages_NL is not None:
        advantages_BT.scatter_(1, positions_NL, advantages_NL.to(advantages_BT.dtype))
    returns_NL = torch.zeros(positions_NL.shape, dtype=torch.float32) if returns_NL is None else returns_NL
    return replace(batch, loss_mask_BT=loss_mask_BT, old_logprobs_BT=batch.old_logprobs_BT * loss_mask_BT,
                   advantages_BT=advantages_BT, level_positions_BL=positions_NL,
                   returns_BL=returns_NL.to(torch.float32))


def hepo_batch(base: TrainBatch, scored: Sequence[ScoredRollout], levels: SIDLevels,
               values_fn: Callable[[TrainBatch], torch.Tensor], *, business_reward: str, alpha: Sequence[float],
               gamma: float, lam: float, eps: float) -> tuple[TrainBatch, Metrics]:
    """Steps 1-4 of the module docstring. `base`: `build_train_batch(scored, ...)` (any advantages; replaced).
    `values_fn(batch) -> values_NL` evaluates the critic (no gradient). Returns the batch to train on and the
    `hepo/*`, `adv/*` metrics."""
    if levels.codes_NL.shape[0] != len(scored):
        raise ValueError(f"The level coder returned {levels.codes_NL.shape[0]} rows for {len(scored)} rollouts.")
    num_levels = levels.num_levels
    missing = [s.rollout.rollout_id for s in scored if business_reward not in s.results]
    if missing:
        raise ValueError(f"algorithm.business_reward='{business_reward}' is not among the rewards of rollout "
                         f"{missing[0]} (it has: {', '.join(scored[0].results)}).")
    business_N = torch.tensor([s.results[business_reward].score for s in scored], dtype=torch.float32)
    popularity_NLV = torch.stack([code_popularity(codes_PL, codebook_size=levels.num_codes)
                                  for codes_PL in levels.positive_codes])
    rewards_NL, metrics = hepo_process_rewards(
        levels.codes_NL, popularity_NLV, levels.legal_NLV, business_N,
        alpha=per_level(alpha, num_levels - 1, "algorithm.hepo_alpha"))
    positions_NL = level_positions(scored, num_levels)
    values_NL = values_fn(with_levels(base, positions_NL)).to(torch.float32)
    targets, adv_metrics = hepo_advantages(rewards_NL, values_NL, base.group_ids_B, gamma=gamma, lam=lam, eps=eps)
    metrics |= adv_metrics
    metrics["hepo/return_mean"] = targets.returns_NL.mean().detach()
    for level in range(num_levels):
        metrics[f"hepo/reward_level{level}"] = rewards_NL[:, level].mean().detach()
        metrics[f"hepo/adv_abs_level{level}"] = targets.advantages_NL[:, level].abs().mean().detach()
    return with_levels(base, positions_NL, targets.advantages_NL, targets.returns_NL), metrics
