"""Log-prob and entropy over a per-row set of allowed tokens: the learner's side of constrained decoding.

A sampler that masks logits to a trie (semantic IDs: rollouts/sid_processor.py) draws token x at a position from
softmax over the allowed set A only, p(x) = exp(z_x/T) / Σ_{a∈A} exp(z_a/T). The learner must score that same
distribution: over the full vocabulary the ratio and the KL would compare different policies, and a forced token
(|A| = 1, e.g. the end token after a finished ID) would get a gradient pushing mass onto tokens the sampler can never
emit. Here such a token has log-prob exactly 0 and no gradient.

Allowed sets are small (the codes of one semantic-ID level, a few end ids), so only the union U of the rows' sets is
projected: logits [M, U] = hidden [M, H] · weight[U]ᵀ, never [M, V]. The gathered weight rows are a copy, so this
also works on a ZeRO-3 weight inside its gather context (the backward needs only the copy and the row indices).

Shape legend: M constrained rows, H hidden size, V vocabulary, A allowed-set width (-1 padded), U union of sets.
"""

from __future__ import annotations

import torch


class AllowedTokensError(ValueError):
    """A target token is not in its row's allowed set, or a row's set is empty."""


def restricted_logprob_entropy(
    hidden_MH: torch.Tensor, weight_VH: torch.Tensor, targets_M: torch.Tensor, allowed_MA: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob_M, entropy_M) in fp32 of softmax(hidden·weightᵀ/T) renormalised over each row's allowed ids.

    `allowed_MA`: token ids, -1 padding; each row needs at least one id, and its target among them."""
    if allowed_MA.ndim != 2 or allowed_MA.shape[0] != hidden_MH.shape[0] or targets_M.shape != hidden_MH.shape[:1]:
        raise AllowedTokensError(f"Shapes do not line up: hidden {tuple(hidden_MH.shape)}, targets "
                                 f"{tuple(targets_M.shape)}, allowed {tuple(allowed_MA.shape)} (want [M, H], [M], "
                                 "[M, A]).")
    valid_MA = allowed_MA >= 0
    if not bool(valid_MA.any(dim=1).all()):
        raise AllowedTokensError("A constrained row has an empty allowed set; leave unconstrained positions out.")
    union_U = torch.unique(allowed_MA[valid_MA])  # sorted
    column_MA = torch.searchsorted(union_U, allowed_MA.clamp(min=0))
    member_MU = torch.zeros(allowed_MA.shape[0], union_U.numel(), dtype=torch.bool, device=allowed_MA.device)
    rows_MA = torch.arange(allowed_MA.shape[0], device=allowed_MA.device)[:, None].expand_as(allowed_MA)
    member_MU[rows_MA[valid_MA], column_MA[valid_MA]] = True  # padding must not write: it shares column 0
    target_col_M = torch.searchsorted(union_U, targets_M).clamp(max=union_U.numel() - 1)
    hit_M = member_MU.gather(1, target_col_M[:, None]).squeeze(1) & (union_U[target_col_M] == targets_M)
    if not bool(hit_M.all()):
        row = int((~hit_M).nonzero()[0, 0])
        raise AllowedTokensError(f"Constrained row {row}: target token {int(targets_M[row])} is not in its allowed "
                                 "set; the sampler's recorded constraint and the trained tokens disagree.")
    weight_UH = weight_VH[union_U.to(weight_VH.device)]
    logits_MU = (hidden_MH.float() @ weight_UH.float().T) / temperature
    logits_MU = logits_MU.masked_fill(~member_MU, float("-inf"))
    logp_MU = torch.log_softmax(logits_MU, dim=-1)
    logprob_M = logp_MU.gather(1, target_col_M[:, None]).squeeze(1)
    # Σ p·log p over members only (non-members have p = 0 and log p = -inf: 0·-inf would be NaN).
    entropy_M = -(logp_MU.exp() * logp_MU.masked_fill(~member_MU, 0.0)).sum(dim=1)
    return logprob_M, entropy_M
