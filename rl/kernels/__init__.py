"""Fused log-prob + entropy straight from hidden states (no [N, V] logits): chunked torch and Triton backends.

    from rl.kernels import fused_logprob_entropy, IGNORE_INDEX
    logprob_N, entropy_N = fused_logprob_entropy(hidden_NH, lm_head.weight, targets_N, temperature=0.7)

Importing this package imports neither triton (loaded on first Triton call) nor deepspeed (the learner passes a
gatherer to `fused_logprob_entropy_zero3`).
"""

from rl.kernels.chunked import (
    DEFAULT_CHUNK_SIZE_CPU,
    DEFAULT_CHUNK_SIZE_GPU,
    FusedKernelArgumentError,
    fused_logprob_entropy,
    fused_logprob_entropy_zero3,
)
from rl.kernels.reference import IGNORE_INDEX, naive_logprob_entropy
from rl.kernels.restricted import AllowedTokensError, restricted_logprob_entropy

__all__ = [
    "AllowedTokensError",
    "DEFAULT_CHUNK_SIZE_CPU",
    "DEFAULT_CHUNK_SIZE_GPU",
    "IGNORE_INDEX",
    "FusedKernelArgumentError",
    "fused_logprob_entropy",
    "fused_logprob_entropy_zero3",
    "naive_logprob_entropy",
    "restricted_logprob_entropy",
]
