"""Fused log-prob + entropy from hidden states: the autograd.Function, its chunked-torch path, and the public op.

GRPO needs, per token, log p(target) and the entropy of softmax(hidden @ weightᵀ / T) — and their gradients — but
never the [N, V] logits themselves, which (with what autograd keeps of them) dominate learner memory. This op keeps
at most `chunk_size` rows' worth (chunk_size × V) of logits alive at a time:

- forward: vocabulary chunks of [R, C] logits, C = chunk_size·V/R → online (running-max) log-sum-exp, entropy
  numerator and target logit per row; only lse_R and entropy_R (fp32, 8 bytes per row) are saved for backward;
- backward: the same [R, C] logits chunks are recomputed from hidden and weight and turned into dL/dlogits, then
  grad_weight[chunk] = Gᵀ @ hidden is written once (no [V, H] accumulator) and grad_hidden += G @ weight[chunk]
  accumulates in fp32 (an [R, H] buffer, small).

The Triton backend (`triton_kernels.py`) replaces the two logits steps with fused kernels; the chunk loop and GEMMs
are shared. Rows whose target is IGNORE_INDEX are removed before any logit is computed (one host sync for
`nonzero`, which is microseconds against the [R, V] work it saves on prompt and padding tokens), and get zero output
and zero gradient.

Shape legend: N tokens, R valid (non-ignored) rows, H hidden size, V vocabulary size, C vocabulary-chunk width.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Literal

import torch

from rl.kernels.reference import IGNORE_INDEX

Backend = Literal["auto", "chunked", "triton"]
GatherFn = Callable[[], AbstractContextManager]
"""Zero-argument factory of a context manager under which the weight holds its full (gathered) data."""

DEFAULT_CHUNK_SIZE_CPU = 256
"""Rows' worth of logits per chunk on CPU: 48 MiB fp32 buffers at V=49k (3k vocabulary columns × 4k rows); vocabulary
chunks of 2k-8k columns ran the GEMMs as fast as one unchunked GEMM at 4k × 576 × 49k."""
DEFAULT_CHUNK_SIZE_GPU = 1024
"""Rows' worth of logits per chunk on CUDA: a 256 MiB bf16 gradient buffer at V=128k (8 chunks at 8k tokens)."""


class FusedKernelArgumentError(ValueError):
    """Bad shapes, dtypes, targets or options passed to the fused log-prob/entropy op."""


# ----------------------------------------------------------------------------------------------- chunked torch path


def torch_forward_stats(
    hidden_RH: torch.Tensor, weight_VH: torch.Tensor, targets_R: torch.Tensor, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob_R, entropy_R, lse_R) in fp32 from [R, C] logits chunks, C = chunk_size·V/R vocabulary entries.

    Chunking over the vocabulary (not rows) keeps each GEMM's small operand, hidden [R, H], the one that is re-packed
    per call; row chunks re-pack the whole [V, H] weight per chunk, measured 45% slower on CPU at 4k × 576 × 49k.
    Per row it keeps a running max m, S = Σe^(z-m), A = Σe^(z-m)(z-m) and the target logit, rescaled whenever m
    grows (the online softmax), so entropy = log S − A/S never subtracts two large numbers.
    """
    num_rows, vocab_size = hidden_RH.shape[0], weight_VH.shape[0]
    cols = vocab_chunk_cols(num_rows, vocab_size, chunk_size)
    f32 = dict(dtype=torch.float32, device=hidden_RH.device)
    max_R = torch.full((num_rows,), float("-inf"), **f32)
    sum_R, ent_num_R, target_logit_R = (torch.zeros(num_rows, **f32) for _ in range(3))
    # Two flat buffers reused by every chunk (no allocator traffic or page faults per chunk); viewed per chunk so
    # that even the last, narrower chunk is contiguous.
    logits_flat, exp_flat = (torch.empty(num_rows * cols, **f32) for _ in range(2))
    for v0 in range(0, vocab_size, cols):
        v1 = min(v0 + cols, vocab_size)
        z_RC = logits_flat[: num_rows * (v1 - v0)].view(num_rows, v1 - v0)
        e_RC = exp_flat[: num_rows * (v1 - v0)].view(num_rows, v1 - v0)
        _logits_into(z_RC, hidden_RH, weight_VH[v0:v1].T, 1.0 / temperature)
        local_R = targets_R - v0
        in_chunk_R = (local_R >= 0) & (local_R < v1 - v0)
        picked_R = z_RC.gather(1, local_R.clamp(0, v1 - v0 - 1)[:, None]).view(-1)
        target_logit_R += torch.where(in_chunk_R, picked_R, 0.0)
        new_max_R = torch.maximum(max_R, z_RC.amax(dim=1))
        z_RC.sub_(new_max_R[:, None])  # z - m <= 0: exp cannot overflow
        torch.exp(z_RC, out=e_RC)
        # Rescale the running sums to the new max; while S = 0 (first chunk, m = -inf) there is nothing to rescale,
        # and m is swapped for the new max so that -inf·0 is never formed.
        delta_R = torch.where(sum_R > 0, max_R, new_max_R) - new_max_R
        alpha_R = delta_R.exp()
        # Σ e^(z-m)·(z-m) as a batched dot product: no third [R, C] temporary.
        chunk_ent_num_R = torch.bmm(e_RC.unsqueeze(1), z_RC.unsqueeze(2)).view(-1)
        ent_num_R = alpha_R * (ent_num_R + delta_R * sum_R) + chunk_ent_num_R
        sum_R = alpha_R * sum_R + e_RC.sum(dim=1)
        max_R = new_max_R
    log_sum_R = sum_R.log()
    # entropy = lse − Σp·z = log S − A/S, both terms >= 0; log-prob = (z_t − m) − log S, both terms <= 0.
    return (target_logit_R - max_R) - log_sum_R, log_sum_R - ent_num_R / sum_R, max_R + log_sum_R


def _logits_into(out_CV: torch.Tensor, hidden_CH: torch.Tensor, weight_HV: torch.Tensor, inv_temp: float) -> None:
    """out = hidden @ weightᵀ / T (fp32), one GEMM straight into the reused buffer."""
    # beta=0 ignores the buffer's stale contents (even NaN); alpha folds 1/T into the GEMM.
    torch.addmm(out_CV, hidden_CH, weight_HV, beta=0.0, alpha=inv_temp, out=out_CV)


def _torch_grad_logits(
    hidden_RH: torch.Tensor,
    weight_CH: torch.Tensor,
    v_start: int,
    targets_R: torch.Tensor,
    lse_R: torch.Tensor,
    entropy_R: torch.Tensor,
    grad_logprob_R: torch.Tensor | None,
    grad_entropy_R: torch.Tensor | None,
    temperature: float,
    out_RC: torch.Tensor,
    scratch_RC: torch.Tensor,
) -> torch.Tensor:
    """dL/dlogits for vocabulary rows [v_start, v_start + C): (1/T)·[g(δ − p) − h·p(log p + H)], into the fp32
    [R, C] `out_RC` (which first holds log p); `scratch_RC` holds p. Inputs are fp32."""
    inv_temp = 1.0 / temperature
    # log p = z/T − lse, straight out of one GEMM: beta·(−lse) broadcast + alpha·(hidden @ weightᵀ).
    logp_RC = torch.addmm(lse_R.neg()[:, None], hidden_RH, weight_CH.T, alpha=inv_temp, out=out_RC)
    p_RC = torch.exp(logp_RC, out=scratch_RC)
    # Linear in (g, h): G/p = −g/T − (h/T)·H − (h/T)·log p, i.e. an affine function of log p per row.
    zeros_R = lse_R.new_zeros(())
    g_R = grad_logprob_R.float() * inv_temp if grad_logprob_R is not None else zeros_R.expand_as(lse_R)
    if grad_entropy_R is not None:
        h_R = grad_entropy_R.float() * inv_temp
        grad_RC = torch.addcmul((-g_R - h_R * entropy_R)[:, None], logp_RC, -h_R[:, None], out=logp_RC)
        grad_RC.mul_(p_RC)
    else:
        grad_RC = torch.mul(p_RC, -g_R[:, None], out=logp_RC)
    if grad_logprob_R is not None:  # + g·δ at each row's target, if the target falls in this chunk
        local_R = targets_R - v_start
        in_chunk_R = (local_R >= 0) & (local_R < out_RC.shape[1])
        # Rows whose target lies elsewhere add 0 at a clamped column: no nonzero(), so no host sync on GPU.
        local_R1 = local_R.clamp(0, out_RC.shape[1] - 1)[:, None]
        grad_RC.scatter_add_(1, local_R1, torch.where(in_chunk_R, g_R, 0.0)[:, None])
    return grad_RC


def vocab_chunk_cols(num_rows: int, vocab_size: int, chunk_size: int) -> int:
    """Vocabulary entries per chunk so that an [R, C] chunk holds at most `chunk_size` rows' worth (chunk_size × V) of
    logits; at least one column."""
    return max(1, min(vocab_size, chunk_size * vocab_size // max(num_rows, 1)))


def backward_by_vocab_chunks(
    hidden_RH: torch.Tensor,
    weight_VH: torch.Tensor,
    grad_logits: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
    cols: int,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden_RH fp32, grad_weight_VH) from dL/dlogits produced `cols` vocabulary entries at a time by
    `grad_logits(weight_CH, v_start, out_RC)`."""
    num_rows, vocab_size = hidden_RH.shape[0], weight_VH.shape[0]
    grad_flat = torch.empty(num_rows * cols, dtype=weight_VH.dtype, device=weight_VH.device)
    grad_hidden_RH = torch.zeros(hidden_RH.shape, dtype=torch.float32, device=hidden_RH.device) if need_hidden else None
    grad_weight_VH = torch.empty_like(weight_VH) if need_weight else None
    for v0 in range(0, vocab_size, cols):
        v1 = min(v0 + cols, vocab_size)
        weight_CH = weight_VH[v0:v1]
        # A flat buffer viewed per chunk keeps even the last, narrower chunk contiguous.
        grad_RC = grad_logits(weight_CH, v0, grad_flat[: num_rows * (v1 - v0)].view(num_rows, v1 - v0))
        if grad_weight_VH is not None:
            # Each vocabulary row's gradient is complete after its chunk: written once, no [V, H] fp32 accumulator.
            torch.mm(grad_RC.T, hidden_RH, out=grad_weight_VH[v0:v1])
        if grad_hidden_RH is not None:
            _add_mm_fp32(grad_hidden_RH, grad_RC, weight_CH)
    return grad_hidden_RH, grad_weight_VH


_MM_OUT_DTYPE_OK: dict[torch.device, bool] = {}


def _add_mm_fp32(acc_RH: torch.Tensor, a_RC: torch.Tensor, b_CH: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the partial product to a 16-bit dtype where the backend allows it."""
    if a_RC.dtype == torch.float32:
        acc_RH.addmm_(a_RC, b_CH)
        return
    ok = _MM_OUT_DTYPE_OK.get(a_RC.device)
    if ok is None or ok:
        try:  # cuBLAS bf16 GEMM with fp32 output (torch >= 2.8 on CUDA); CPU has no kernel for it
            acc_RH.add_(torch.mm(a_RC, b_CH, out_dtype=torch.float32))
            _MM_OUT_DTYPE_OK[a_RC.device] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[a_RC.device] = False
    acc_RH.add_(a_RC @ b_CH)


# --------------------------------------------------------------------------------------------- autograd.Function


def _load_triton():  # imported lazily: triton is optional, and TRITON_INTERPRET must be set before its import
    return importlib.import_module("rl.kernels.triton_kernels")


class _FusedLogprobEntropy(torch.autograd.Function):
    """Autograd wrapper: compacts valid rows, runs the backend, scatters back; recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk_size, use_triton, gather):
        ctx.set_materialize_grads(False)  # an unused output (e.g. entropy only logged) costs no backward work
        rows_R = (targets_N != IGNORE_INDEX).nonzero().view(-1)
        hidden_RH, targets_R = _select_rows(hidden_NH, rows_R), _select_rows(targets_N, rows_R)
        logprob_N = torch.zeros(hidden_NH.shape[0], dtype=torch.float32, device=hidden_NH.device)
        entropy_N = torch.zeros_like(logprob_N)
        lse_R = entropy_R = logprob_N.new_empty(0)
        # The caller holds the gather around `apply` (autograd records the weight's shape there, so it must be the
        # full one); `gather` is entered again only in backward.
        _check_weight(hidden_NH, weight_VH, targets_R)
        if rows_R.numel() > 0:
            if use_triton:
                stats_fn = _load_triton().triton_forward_stats
                logprob_R, entropy_R, lse_R = stats_fn(hidden_RH.contiguous(), weight_VH, targets_R, temperature)
            else:
                logprob_R, entropy_R, lse_R = torch_forward_stats(
                    _fp32(hidden_RH), _fp32(weight_VH), targets_R, temperature, chunk_size
                )
            logprob_N.index_copy_(0, rows_R, logprob_R)
            entropy_N.index_copy_(0, rows_R, entropy_R)
        ctx.save_for_backward(hidden_NH, weight_VH, rows_R, targets_R, lse_R, entropy_R)
        ctx.temperature, ctx.chunk_size, ctx.use_triton, ctx.gather = temperature, chunk_size, use_triton, gather
        return logprob_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprob_N, grad_entropy_N):
        hidden_NH, weight_VH, rows_R, targets_R, lse_R, entropy_R = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        all_rows = rows_R.numel() == hidden_NH.shape[0]
        grad_hidden_NH = None if not need_hidden or all_rows else torch.zeros_like(hidden_NH)
        gathered = contextlib.ExitStack()
        if ctx.gather is not None:
            gathered.enter_context(ctx.gather())
        try:
            if rows_R.numel() == 0 or (grad_logprob_N is None and grad_entropy_N is None):
                grad_hidden_NH = torch.zeros_like(hidden_NH) if need_hidden else None
                grad_weight_VH = torch.zeros_like(weight_VH) if need_weight else None
            else:
                grad_hidden_RH, grad_weight_VH = _recompute_grads(
                    ctx, _select_rows(hidden_NH, rows_R), weight_VH, rows_R, targets_R, lse_R, entropy_R,
                    grad_logprob_N, grad_entropy_N, need_hidden, need_weight,
                )  # fmt: skip
                if need_hidden and all_rows:  # nothing to scatter: the fp32 accumulator (cast) is the gradient
                    grad_hidden_NH = grad_hidden_RH.to(hidden_NH.dtype)
                elif need_hidden:
                    grad_hidden_NH.index_copy_(0, rows_R, grad_hidden_RH.to(hidden_NH.dtype))
        except BaseException:
            gathered.close()
            raise
        # Release the gathered weight only when the whole backward is done: autograd accumulates grad_weight into
        # `.grad` (where ZeRO-3's hook reduce-scatters it) after this returns, and AccumulateGrad needs the parameter
        # at its full shape then. DeepSpeed defers its own backward epilogue the same way.
        if ctx.gather is not None:
            torch.autograd.Variable._execution_engine.queue_callback(gathered.close)
        return grad_hidden_NH, grad_weight_VH, None, None, None, None, None


def _recompute_grads(
    ctx, hidden_RH, weight_VH, rows_R, targets_R, lse_R, entropy_R, grad_logprob_N, grad_entropy_N, need_hidden,
    need_weight,
):  # fmt: skip
    """(grad_hidden_RH fp32, grad_weight_VH) by vocabulary chunks, logits recomputed by the forward's backend."""
    grad_logprob_R = _select_rows(grad_logprob_N, rows_R) if grad_logprob_N is not None else None
    grad_entropy_R = _select_rows(grad_entropy_N, rows_R) if grad_entropy_N is not None else None
    stats = (targets_R, lse_R, entropy_R, grad_logprob_R, grad_entropy_R, ctx.temperature)
    cols = vocab_chunk_cols(hidden_RH.shape[0], weight_VH.shape[0], ctx.chunk_size)
    if ctx.use_triton:
        hidden_RH = hidden_RH.contiguous()
        triton_grad_logits = _load_triton().triton_grad_logits

        def triton_chunk(weight_CH, v_start, out_RC):
            return triton_grad_logits(hidden_RH, weight_CH, v_start, *stats, out_RC)

        return backward_by_vocab_chunks(hidden_RH, weight_VH, triton_chunk, cols, need_hidden, need_weight)

    # The chunked path computes in fp32 throughout (16-bit inputs are upcast once per call): it is the CPU path
    # and the GPU fallback, where accuracy matters more than the upcast's copy.
    hidden32_RH, weight32_VH = _fp32(hidden_RH), _fp32(weight_VH)
    scratch_flat = torch.empty(hidden_RH.shape[0] * cols, dtype=torch.float32, device=hidden_RH.device)

    def torch_chunk(weight_CH, v_start, out_RC):
        scratch_RC = scratch_flat[: out_RC.numel()].view(out_RC.shape)
        return _torch_grad_logits(hidden32_RH, weight_CH, v_start, *stats, out_RC, scratch_RC)

    grad_hidden_RH, grad_weight_VH = backward_by_vocab_chunks(
        hidden32_RH, weight32_VH, torch_chunk, cols, need_hidden, need_weight
    )
    if grad_weight_VH is not None:
        grad_weight_VH = grad_weight_VH.to(weight_VH.dtype)
    return grad_hidden_RH, grad_weight_VH


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _select_rows(tensor_N: torch.Tensor, rows_R: torch.Tensor) -> torch.Tensor:
    """tensor[rows], without a copy when no row is ignored (the common case for packed completions)."""
    return tensor_N if rows_R.numel() == tensor_N.shape[0] else tensor_N.index_select(0, rows_R)


# ------------------------------------------------------------------------------------------------------ public op


def fused_logprob_entropy(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
    backend: Backend = "auto",
    gather: GatherFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and entropy of softmax(hidden_NH @ weight_VHᵀ / temperature), without the logits.

    Args:
        hidden_NH: final hidden states (the lm_head's input), any float dtype.
        weight_VH: lm_head weight, same dtype and device as `hidden_NH`.
        targets_N: int64 token ids in [0, V), or IGNORE_INDEX (-100) for rows to skip: those are never computed and
            get 0 log-prob, 0 entropy and zero gradient.
        temperature: the sampler's temperature (> 0); entropy is that of the tempered distribution.
        chunk_size: rows' worth of logits materialised at once: a chunk holds at most chunk_size × V logits (cut
            along the vocabulary, so C = chunk_size·V/R columns of all R valid rows). None picks a per-device default
            (DEFAULT_CHUNK_SIZE_CPU / _GPU). It never changes the result, only memory and speed.
        backend: "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "chunked" (torch, anywhere), or
            "auto": triton for CUDA tensors, chunked otherwise.
        gather: optional factory of a context manager that makes `weight_VH` hold its full data; entered around the
            forward and again around the backward (ZeRO-3, see `fused_logprob_entropy_zero3`).

    Returns:
        (logprob_N, entropy_N), fp32, differentiable w.r.t. `hidden_NH` and `weight_VH`.
    """
    _check_args(hidden_NH, targets_N, temperature, chunk_size, backend)
    use_triton = backend == "triton" or (backend == "auto" and hidden_NH.is_cuda)
    if use_triton and not hidden_NH.is_cuda and not _load_triton().INTERPRET:
        raise FusedKernelArgumentError(
            "backend='triton' got CPU tensors, but Triton kernels run on CPU only under the interpreter. "
            "Use backend='chunked' (or 'auto') on CPU, or set TRITON_INTERPRET=1 before rl.kernels.triton_kernels "
            "is imported (tests only: it is slow)."
        )
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE_GPU if hidden_NH.is_cuda else DEFAULT_CHUNK_SIZE_CPU
    args = (float(temperature), chunk_size, use_triton, gather)
    with gather() if gather is not None else contextlib.nullcontext():
        return _FusedLogprobEntropy.apply(hidden_NH, weight_VH, targets_N.long(), *args)


def fused_logprob_entropy_zero3(
    hidden_NH: torch.Tensor,
    weight_VH: torch.nn.Parameter,
    targets_N: torch.Tensor,
    temperature: float = 1.0,
    *,
    gather_params: Callable[[list[torch.nn.Parameter]], AbstractContextManager],
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_logprob_entropy` for a ZeRO-3-partitioned lm_head weight: gathered for the forward, and gathered again
    for the backward (which recomputes the logits from it), released in between — so the full [V, H] weight is
    resident only while the op runs, not for the whole step.

    Only `rl/learner.py` imports deepspeed, so it passes the gatherer in:

        gather_params=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    (modifier_rank=None: read-only, nothing is broadcast on exit). The full-shape grad_weight goes to autograd as for
    any ZeRO-3 parameter used in a forward, and ZeRO-3's gradient hooks reduce-scatter it.
    """
    weight_param = weight_VH
    return fused_logprob_entropy(
        hidden_NH,
        weight_VH,
        targets_N,
        temperature,
        chunk_size=chunk_size,
        backend=backend,
        gather=lambda: gather_params([weight_param]),
    )


def _check_args(
    hidden_NH: torch.Tensor, targets_N: torch.Tensor, temperature: float, chunk_size: int | None, backend: str
) -> None:
    if backend not in ("auto", "chunked", "triton"):
        raise FusedKernelArgumentError(f"backend={backend!r}; expected one of 'auto', 'chunked', 'triton'.")
    if hidden_NH.dim() != 2 or targets_N.dim() != 1 or hidden_NH.shape[0] != targets_N.shape[0]:
        raise FusedKernelArgumentError(
            f"expected hidden [N, H] and targets [N]; got {tuple(hidden_NH.shape)} and {tuple(targets_N.shape)}. "
            "Flatten batch and time first: hidden.flatten(0, 1), targets.flatten()."
        )
    if not hidden_NH.dtype.is_floating_point:
        raise FusedKernelArgumentError(f"hidden must be a float tensor, got {hidden_NH.dtype}.")
    if targets_N.dtype not in (torch.int64, torch.int32):
        raise FusedKernelArgumentError(f"targets must be integer token ids (int64 or int32), got {targets_N.dtype}.")
    if not temperature > 0:
        raise FusedKernelArgumentError(f"temperature={temperature}; it must be > 0 (the sampler's temperature).")
    if chunk_size is not None and chunk_size < 1:
        raise FusedKernelArgumentError(f"chunk_size={chunk_size}; it must be a positive number of rows.")


def _check_weight(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_R: torch.Tensor) -> None:
    """Checks that need the weight's full shape, so they run inside the gather (a ZeRO-3 shard has no real shape)."""
    if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden_NH.shape[1]:
        raise FusedKernelArgumentError(
            f"weight has shape {tuple(weight_VH.shape)} but hidden is {tuple(hidden_NH.shape)}; need weight [V, H] "
            "with the hidden size H. Under ZeRO-3, pass a gatherer (fused_logprob_entropy_zero3)."
        )
    if weight_VH.dtype != hidden_NH.dtype or weight_VH.device != hidden_NH.device:
        raise FusedKernelArgumentError(
            f"hidden is {hidden_NH.dtype} on {hidden_NH.device} but weight is {weight_VH.dtype} on {weight_VH.device}; "
            "cast the hidden states to the lm_head's dtype and device."
        )
    vocab_size = weight_VH.shape[0]
    # One host sync; an out-of-range id would otherwise read past the weight (Triton) or fail deep inside a gather.
    bad_R = (targets_R < 0) | (targets_R >= vocab_size)
    if bool(bad_R.any()):
        bad = int(targets_R[bad_R][0])
        raise FusedKernelArgumentError(
            f"target id {bad} is outside the vocabulary [0, {vocab_size}) and is not IGNORE_INDEX ({IGNORE_INDEX}); "
            f"check that the tokenizer and lm_head sizes agree, or mask the row with {IGNORE_INDEX}."
        )
