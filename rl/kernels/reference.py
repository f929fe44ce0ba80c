"""Naive reference for the fused log-prob/entropy op: full logits, float64, plain autograd.

This is the test oracle and the bench baseline, never a training path: it materialises the whole [N, V] logits
tensor (and autograd keeps several more of that size), which is exactly what `rl.kernels` exists to avoid.

Shape legend: N tokens (rows), H hidden size, V vocabulary size.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Target value of rows to skip (prompt tokens, padding): zero output and zero gradient, as in torch's CE loss."""


def naive_logprob_entropy(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    temperature: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each row's target and entropy of softmax(hidden @ weight.T / temperature), computed in `dtype`.

    Differentiable w.r.t. `hidden_NH` and `weight_VH` through ordinary autograd (the gradients come back in the
    inputs' dtype). Rows whose target is IGNORE_INDEX give 0 for both outputs and receive no gradient.
    Returns (logprob_N, entropy_N) in `dtype`.
    """
    valid_N = targets_N != IGNORE_INDEX
    logits_NV = (hidden_NH.to(dtype) @ weight_VH.to(dtype).T) / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    safe_targets_N = torch.where(valid_N, targets_N, torch.zeros_like(targets_N))
    logprob_N = logp_NV.gather(1, safe_targets_N[:, None]).squeeze(1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(dim=-1)
    # torch.where (not multiplication by the mask) so that a NaN/inf in an ignored row cannot leak into the output.
    zero = logprob_N.new_zeros(())
    return torch.where(valid_N, logprob_N, zero), torch.where(valid_N, entropy_N, zero)
