"""Triton kernels for the fused log-prob/entropy op: logits live only in registers, never in memory.

Forward (`triton_forward_stats`): each program owns a tile of BLOCK_M rows and a contiguous split of the vocabulary.
It walks that split in BLOCK_N-wide tiles; for each tile it computes the logits with an H-loop of `tl.dot` (fp32
accumulation) and folds them into an online log-sum-exp (running max m, Σ e^(z-m)), an online entropy numerator
(Σ e^(z-m)·(z-m), kept relative to the running max so that huge logits never cancel catastrophically) and the target
logit. The few [num_splits, R] partials are merged in torch. Splitting the vocabulary keeps >= ~8 programs per SM at
GRPO shapes (R/BLOCK_M row tiles alone, e.g. 64 for 8k tokens, would leave half of an H100's 132 SMs idle).

Backward (`triton_grad_logits`): for one vocabulary chunk, each program recomputes one [BLOCK_M, BLOCK_N] logits
tile in registers and turns it into the logits' gradient (with p = softmax(z), z = logits/T, δ the target one-hot):

    dL/dlogits = (1/T) · [ g·(δ − p) − h·p·(log p + H) ]     g = dL/dlogprob, h = dL/dentropy  (per row)

written in the weight's dtype into a [R, chunk] buffer, from which two tensor-core GEMMs (`chunked.py`) accumulate
grad_hidden += G @ W_chunk and write grad_weight[chunk] = Gᵀ @ hidden. A single fused kernel would have to reduce an
[R, H] and a [V, H] output across thousands of tiles with fp32 atomics (~NVH/64 of them: hundreds of GB of atomic
traffic at 8k×4k×128k), which costs more than writing G once per chunk in bf16 (2 bytes per logit) and letting
cuBLAS do the two GEMMs at full speed. The logits themselves are never stored, in either direction.

All offsets that scale with R·H, V·H or R·chunk are int64 (a 128k×4k weight has 2^29 elements, and R·V exceeds 2^31
at 8k×128k). Under TRITON_INTERPRET=1 (the CPU test path) tiles are cast to fp32 before `tl.dot` (the interpreter
gets bf16 dots wrong) and autotuning is off (it does not work there); on GPU, fp32 inputs use IEEE dots so the
result matches the fp32 reference instead of silently dropping to TF32.

Shape legend: R valid (non-ignored) rows, H hidden size, V vocabulary size, C vocabulary-chunk width,
S vocabulary splits of the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The knob `triton.jit` consults (TRITON_INTERPRET), read once at import like it does: a kernel decorated without the
# interpreter cannot run on CPU.
INTERPRET = bool(triton.knobs.runtime.interpret)


# Configs for H100/H200 (bf16, H >= 1k), all wgmma tiles. Offline check (triton.compile for sm_90a + ptxas -v, no GPU):
# these compile without register spills at unit strides (the gradient kernel's 128×256 spills 92 bytes, kept as a
# candidate); 128×128 with 4 warps, 256×128 and the forward's 128×256 spill 0.4-0.8 KB under the softmax epilogue and
# are left out. Not yet timed on hardware: autotuning picks per shape.
def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


_FORWARD_CONFIGS = [_config(128, 128, 64, 8, 4), _config(128, 128, 64, 8, 3), _config(64, 256, 64, 8, 4),
                    _config(64, 128, 64, 4, 4)]  # fmt: skip
_GRAD_CONFIGS = [_config(128, 128, 64, 8, 4), _config(128, 256, 64, 8, 3), _config(128, 128, 128, 8, 3),
                 _config(64, 256, 64, 8, 4), _config(64, 128, 64, 4, 4)]  # fmt: skip
# Interpreter: small tiles (numpy cost grows with the tile) that still leave partial tiles at the test shapes.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def _autotune(configs: list[triton.Config], key: list[str]):
    """`triton.autotune` on GPU; a no-op under the interpreter (block sizes are passed explicitly there)."""
    if INTERPRET:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


_even_k = triton.heuristics({"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0})


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id → (row tile, column tile) in groups of GROUP_M row tiles, so that the programs resident at the same
    time share hidden tiles and weight tiles in L2 (the standard grouped GEMM ordering)."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_in_group = pid % group_size
    return first_m + pid_in_group % group_m, pid_in_group // group_m


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, offs_m, offs_n, row_mask, col_mask, H,
    stride_hr, stride_hh, stride_wv, stride_wh, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, BLOCK_N] fp32 tile of hidden[offs_m] @ weight[offs_n]ᵀ / T, reduced over H in BLOCK_K steps."""
    offs_k = tl.arange(0, BLOCK_K)
    # offs_m/offs_n are int64, so these products cannot overflow for any R·H or V·H.
    a_ptrs = hidden_ptr + offs_m[:, None] * stride_hr + offs_k[None, :] * stride_hh
    b_ptrs = weight_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wh  # [BLOCK_K, BLOCK_N] of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < H - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if CAST_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_hh
        b_ptrs += BLOCK_K * stride_wh
    return acc * inv_temp


@_autotune(_FORWARD_CONFIGS, key=["H", "V"])
@_even_k
@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_ent_ptr, part_tgt_ptr,
    R, V, H, num_splits,
    stride_hr, stride_hh, stride_wv, stride_wh, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Partials of one (row tile, vocabulary split): running max, Σe^(z-m), Σe^(z-m)(z-m), target logit."""
    pid_m, pid_s = _swizzle(tl.program_id(0), tl.cdiv(R, BLOCK_M), num_splits, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = offs_m < R
    tgt = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1)

    num_tiles = tl.cdiv(V, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # V < 2^31: the int32 sum is safe
        col_mask = offs_n < V
        z = _logits_tile(
            hidden_ptr, weight_ptr, offs_m, offs_n, row_mask, col_mask, H,
            stride_hr, stride_hh, stride_wv, stride_wh, inv_temp,
            BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, CAST_FP32, IEEE,
        )  # fmt: skip
        # Padded columns (zero weight rows) hold a finite 0: kept finite so no inf·0 is ever formed, masked below.
        t_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
        # Every tile below num_tiles has a valid column, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
        d = z - m_new[:, None]  # <= 0 on valid columns
        e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        # Σe^(z-m_new)(z-m_new) = α·[Σe^(z-m_i)(z-m_i) + (m_i-m_new)·Σe^(z-m_i)]; while s_i = 0 (m_i = -inf) the
        # shift term is 0, and m_i is swapped for m_new so that -inf·0 is never formed.
        shift = (tl.where(s_i > 0, m_i, m_new) - m_new) * s_i
        a_i = alpha * (a_i + shift) + tl.sum(e * d, axis=1)
        s_i = alpha * s_i + tl.sum(e, axis=1)
        m_i = m_new

    out = pid_s.to(tl.int64) * R + offs_m
    tl.store(part_max_ptr + out, m_i, mask=row_mask)
    tl.store(part_sum_ptr + out, s_i, mask=row_mask)
    tl.store(part_ent_ptr + out, a_i, mask=row_mask)
    tl.store(part_tgt_ptr + out, t_i, mask=row_mask)


@_autotune(_GRAD_CONFIGS, key=["H", "C"])
@_even_k
@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr, grad_ptr,
    R, C, H, v_start,
    stride_hr, stride_hh, stride_wv, stride_wh, stride_gr, inv_temp,
    HAS_GRAD_LOGPROB: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of dL/dlogits for vocabulary columns v_start + [0, C); weight_ptr points at
    row v_start of the weight."""
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = offs_m < R
    col_mask = offs_n < C
    z = _logits_tile(
        hidden_ptr, weight_ptr, offs_m, offs_n, row_mask, col_mask, H,
        stride_hr, stride_hh, stride_wv, stride_wh, inv_temp,
        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, CAST_FP32, IEEE,
    )  # fmt: skip
    lse = tl.load(lse_ptr + offs_m, mask=row_mask, other=0.0)
    logp = z - lse[:, None]  # finite: z is finite and lse >= max z
    p = tl.exp(logp)
    grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_GRAD_ENTROPY:
        ent = tl.load(entropy_ptr + offs_m, mask=row_mask, other=0.0)
        h = tl.load(grad_entropy_ptr + offs_m, mask=row_mask, other=0.0) * inv_temp
        grad -= h[:, None] * p * (logp + ent[:, None])
    if HAS_GRAD_LOGPROB:
        tgt = tl.load(targets_ptr + offs_m, mask=row_mask, other=-1) - v_start
        g = tl.load(grad_logprob_ptr + offs_m, mask=row_mask, other=0.0) * inv_temp
        grad += g[:, None] * (tl.where(offs_n[None, :] == tgt[:, None], 1.0, 0.0) - p)
    g_ptrs = grad_ptr + offs_m[:, None] * stride_gr + offs_n[None, :]
    tl.store(g_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _launch_meta(hidden_RH: torch.Tensor) -> dict:
    """Constexprs that are not tuned: block sizes under the interpreter, dot precision on GPU."""
    meta = {"CAST_FP32": INTERPRET, "IEEE": (not INTERPRET) and hidden_RH.dtype == torch.float32}
    if INTERPRET:
        meta.update(_INTERPRET_META)
    return meta


def _num_splits(num_rows: int, device: torch.device) -> int:
    """Vocabulary splits of the forward so that row tiles × splits ≈ 8 programs per SM (fewer waves' tail)."""
    if INTERPRET:
        return 2  # exercise the cross-split merge at tiny shapes
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(num_rows, 128)
    return max(1, min(64, triton.cdiv(8 * num_sms, row_tiles)))


def triton_forward_stats(
    hidden_RH: torch.Tensor, weight_VH: torch.Tensor, targets_R: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob_R, entropy_R, lse_R) in fp32 for rows that are all valid (ignored rows already removed)."""
    num_rows, hidden_size = hidden_RH.shape
    vocab_size = weight_VH.shape[0]
    num_splits = _num_splits(num_rows, hidden_RH.device)
    parts_4SR = torch.empty((4, num_splits, num_rows), dtype=torch.float32, device=hidden_RH.device)
    max_SR, sum_SR, ent_SR, tgt_SR = parts_4SR.unbind(0)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * num_splits,)

    _forward_kernel[grid](
        hidden_RH, weight_VH, targets_R, max_SR, sum_SR, ent_SR, tgt_SR,
        num_rows, vocab_size, hidden_size, num_splits,
        hidden_RH.stride(0), hidden_RH.stride(1), weight_VH.stride(0), weight_VH.stride(1), 1.0 / temperature,
        **_launch_meta(hidden_RH),
    )  # fmt: skip
    return merge_split_stats(max_SR, sum_SR, ent_SR, tgt_SR)


def merge_split_stats(
    max_SR: torch.Tensor, sum_SR: torch.Tensor, ent_SR: torch.Tensor, tgt_SR: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-split online-softmax partials into (logprob_R, entropy_R, lse_R).

    Split s holds m_s, s_s = Σe^(z-m_s), a_s = Σe^(z-m_s)(z-m_s) and the target logit if the target fell in it (else 0).
    With M = max_s m_s: S = Σ_s e^(m_s-M)·s_s, A = Σ_s e^(m_s-M)·(a_s + (m_s-M)·s_s), and then
    lse = M + log S, entropy = log S − A/S (>= 0: A <= 0 and S >= 1), logprob = (z_t − M) − log S (<= 0).
    """
    max_R = max_SR.amax(dim=0)
    nonempty_SR = sum_SR > 0  # an empty split (more splits than tiles) has m = -inf and s = 0
    delta_SR = torch.where(nonempty_SR, max_SR - max_R, torch.zeros_like(max_SR))
    weight_SR = torch.where(nonempty_SR, delta_SR.exp(), torch.zeros_like(max_SR))
    sum_R = (weight_SR * sum_SR).sum(dim=0)
    ent_num_R = (weight_SR * (ent_SR + delta_SR * sum_SR)).sum(dim=0)
    log_sum_R = sum_R.log()
    entropy_R = log_sum_R - ent_num_R / sum_R
    logprob_R = (tgt_SR.sum(dim=0) - max_R) - log_sum_R
    return logprob_R, entropy_R, max_R + log_sum_R


def triton_grad_logits(
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
) -> torch.Tensor:
    """Write dL/dlogits for vocabulary rows [v_start, v_start + C) (`weight_CH` = weight[v_start:v_start+C]) into
    `out_RC` (any dtype, unit stride along C) and return it."""
    num_rows, hidden_size = hidden_RH.shape
    chunk = weight_CH.shape[0]
    assert out_RC.shape == (num_rows, chunk) and out_RC.stride(1) == 1, "G buffer must be [R, C] with unit col stride"
    has_grad_logprob, has_grad_entropy = grad_logprob_R is not None, grad_entropy_R is not None
    # A missing gradient is passed as a dummy pointer that is never read: its HAS_* constexpr removes the load.
    grad_logprob_R = grad_logprob_R.float().contiguous() if has_grad_logprob else lse_R
    grad_entropy_R = grad_entropy_R.float().contiguous() if has_grad_entropy else lse_R

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(chunk, meta["BLOCK_N"]),)

    _grad_logits_kernel[grid](
        hidden_RH, weight_CH, targets_R, lse_R, entropy_R, grad_logprob_R, grad_entropy_R, out_RC,
        num_rows, chunk, hidden_size, v_start,
        hidden_RH.stride(0), hidden_RH.stride(1), weight_CH.stride(0), weight_CH.stride(1), out_RC.stride(0),
        1.0 / temperature,
        HAS_GRAD_LOGPROB=has_grad_logprob, HAS_GRAD_ENTROPY=has_grad_entropy,
        **_launch_meta(hidden_RH),
    )  # fmt: skip
    return out_RC
