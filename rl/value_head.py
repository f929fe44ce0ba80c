"""The value head (critic) that HEPO adds to the policy, and HEPO's per-micro-batch loss on the learner.

DESIGN.md: "HEPO adds a value head (critic)". It is one linear layer H -> 1 on the policy's final hidden states,
attached as the submodule `value_head` of the policy model, so DeepSpeed optimises, checkpoints and restores it with
the policy (a resumed run continues with the same critic and its Adam moments: resume stays exact). Weight exports
for the rollout workers and `recforge eval` leave its tensors out (`is_value_head_tensor`). The trunk is shared (as
in PPO for LMs, e.g. TRL's value-head models); the head is zero-initialised, so V = 0 at the start (the first GAE is
the plain discounted reward sum) and the value loss sends no gradient into the trunk until the head has moved
(d loss / d hidden = w = 0).

HEPO's actions are the L semantic-ID levels. The state before level l's choice is the prefix that ends one token
before that level's code token, so V(s_l) = head(hidden[position_l - 1]) and the level's log-prob is the code
token's log-prob at position_l (`TrainBatch.level_positions_BL`).

Shape legend: B sequences, T tokens, H hidden size, L levels.
"""

from __future__ import annotations

import torch
from torch import nn

from rl.config import AlgorithmConfig
from rl.hepo import per_level
from rl.losses import hepo_loss
from rl.types import TrainBatch

VALUE_HEAD = "value_head"
"""Attribute (and state-dict prefix) of the value head on the policy model."""


class ValueHead(nn.Module):
    """V(s) = w·h + b on a final hidden state h; zero-initialised."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_xH: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> values (...,) in float32."""
        return self.linear(hidden_xH.to(self.linear.weight.dtype)).squeeze(-1).float()


def attach_value_head(model: nn.Module) -> ValueHead:
    """Add a zero-initialised `ValueHead` to `model` as `model.value_head` (before DeepSpeed wraps the model)."""
    head = ValueHead(int(model.config.hidden_size))
    setattr(model, VALUE_HEAD, head)
    return head


def is_value_head_tensor(name: str) -> bool:
    """Whether a state-dict name belongs to the value head (left out of weights sent to vLLM)."""
    return name.startswith(VALUE_HEAD + ".")


def gather_levels(values_BT: torch.Tensor, positions_BL: torch.Tensor) -> torch.Tensor:
    """values_BT[b, positions_BL[b, l]] -> (B, L)."""
    return values_BT.gather(1, positions_BL.to(values_BT.device))


def level_values(head: nn.Module, hidden_BTH: torch.Tensor, positions_BL: torch.Tensor) -> torch.Tensor:
    """V(s_l) = head(hidden one position before each level's token) -> float32 (B, L)."""
    index_BL = (positions_BL.to(hidden_BTH.device) - 1).clamp(min=0)
    hidden_BLH = hidden_BTH.gather(1, index_BL[..., None].expand(-1, -1, hidden_BTH.shape[-1]))
    return head(hidden_BLH)


def hepo_micro_loss(logprobs_BT: torch.Tensor, hidden_BTH: torch.Tensor, head: nn.Module, micro: TrainBatch, *,
                    algo: AlgorithmConfig, denominator: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`rl.losses.hepo_loss` on one micro-batch: per-level clipped loss weighted c_l plus the value loss.

    `denominator` is the number of candidates in the global batch (so micro-batches and ranks sum to the full-batch
    loss). Rows without loss tokens (padding micro-batches) are left out; they still run the head so every rank
    runs the same passes. old log-probs are the current ones detached (one update per batch: ratio 1, as in the
    token-level path).
    """
    if micro.level_positions_BL is None or micro.returns_BL is None:
        raise ValueError("algorithm.advantage='hepo' trains on per-level batches, but this TrainBatch has no "
                         "level_positions_BL/returns_BL; build it with rl.hepo.level_batch.")
    positions_BL = micro.level_positions_BL
    keep_B = (micro.loss_mask_BT.sum(-1) > 0).to(logprobs_BT.device)
    values_BL = level_values(head, hidden_BTH, positions_BL)[keep_B]
    logprobs_BL = gather_levels(logprobs_BT, positions_BL)[keep_B]
    advantages_BL = gather_levels(micro.advantages_BT.to(logprobs_BT.device), positions_BL)[keep_B]
    returns_BL = micro.returns_BL.to(logprobs_BT.device)[keep_B]
    num_levels = positions_BL.shape[1]
    loss, metrics = hepo_loss(
        logprobs_BL, logprobs_BL.detach(), advantages_BL, values_BL, returns_BL,
        level_weights=per_level(algo.hepo_level_weights, num_levels, "algorithm.hepo_level_weights"),
        loss_denominator=denominator, clip_low=algo.clip_low, clip_high=algo.clip_high, value_coef=algo.value_coef,
    )
    metrics = dict(metrics)
    with torch.no_grad():
        metrics["critic/value_sum"] = values_BL.sum()
        metrics["critic/abs_error_sum"] = (values_BL - returns_BL).abs().sum()
        metrics["critic/num_values_sum"] = torch.tensor(float(values_BL.numel()))
    return loss, metrics
