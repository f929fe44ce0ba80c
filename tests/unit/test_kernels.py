"""Fused log-prob/entropy, chunked-torch backend: equals the float64 naive reference, and keeps its invariants.

Every test that takes the `backend`/`device` fixtures is re-run on the Triton kernels by test_kernels_triton.py
(under TRITON_INTERPRET=1 on CPU), so shapes here stay tiny. Shape legend: N tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from rl.kernels import IGNORE_INDEX, FusedKernelArgumentError, fused_logprob_entropy
from rl.kernels.reference import naive_logprob_entropy

N, H, V = 48, 32, 1000  # V is not a multiple of any block size: partial vocabulary tiles and chunks everywhere


@pytest.fixture
def backend() -> str:
    return "chunked"


@pytest.fixture
def device() -> str:
    return "cpu"


def make_inputs(device, *, n=N, h=H, v=V, seed=0, logit_scale=3.0, num_ignored=5, dtype=torch.float32):
    """hidden ~ N(0, 1), weight scaled so that logits have std ≈ logit_scale; `num_ignored` rows set to IGNORE_INDEX."""
    gen = torch.Generator().manual_seed(seed)
    hidden_NH = torch.randn(n, h, generator=gen)
    weight_VH = torch.randn(v, h, generator=gen) * (logit_scale / math.sqrt(h))
    targets_N = torch.randint(0, v, (n,), generator=gen)
    targets_N[torch.randperm(n, generator=gen)[:num_ignored]] = IGNORE_INDEX
    upstream_2N = torch.randn(2, n, generator=gen)  # dL/dlogprob, dL/dentropy: both gradient paths are exercised
    to = dict(device=device, dtype=dtype)
    return hidden_NH.to(**to), weight_VH.to(**to), targets_N.to(device), upstream_2N.to(device)


def run(hidden_NH, weight_VH, targets_N, upstream_2N, temperature=1.0, *, use=(True, True), **kwargs):
    """Outputs and (grad_hidden, grad_weight) of L = Σ g·logprob + Σ h·entropy (an unused output is left out of L)."""
    hidden_NH = hidden_NH.detach().clone().requires_grad_()
    weight_VH = weight_VH.detach().clone().requires_grad_()
    logprob_N, entropy_N = fused_logprob_entropy(hidden_NH, weight_VH, targets_N, temperature, **kwargs)
    terms = [out * up for out, up, used in zip((logprob_N, entropy_N), upstream_2N, use, strict=True) if used]
    sum(t.sum() for t in terms).backward()
    return logprob_N.detach(), entropy_N.detach(), hidden_NH.grad, weight_VH.grad


def run_reference(hidden_NH, weight_VH, targets_N, upstream_2N, temperature=1.0, *, use=(True, True)):
    """The same through naive_logprob_entropy in float64 (on CPU), results back in float64."""
    return run_naive(
        hidden_NH.cpu().double(), weight_VH.cpu().double(), targets_N.cpu(), upstream_2N.cpu(), temperature, use
    )


def run_naive(hidden_NH, weight_VH, targets_N, upstream_2N, temperature, use):
    hidden_NH, weight_VH = hidden_NH.detach().clone().requires_grad_(), weight_VH.detach().clone().requires_grad_()
    logprob_N, entropy_N = naive_logprob_entropy(hidden_NH, weight_VH, targets_N, temperature)
    terms = [
        out * up.to(out.dtype) for out, up, used in zip((logprob_N, entropy_N), upstream_2N, use, strict=True) if used
    ]
    sum(t.sum() for t in terms).backward()
    return logprob_N.detach(), entropy_N.detach(), hidden_NH.grad, weight_VH.grad


def assert_grad_close(actual, expected, rel=1e-3):
    """Gradient agreement relative to the gradient's scale (elementwise relative error is meaningless near 0)."""
    expected = expected.to(actual.device, torch.float64)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_matches_float64_reference(backend, device, temperature):
    inputs = make_inputs(device)
    logprob, entropy, grad_hidden, grad_weight = run(*inputs, temperature, backend=backend)
    ref_logprob, ref_entropy, ref_grad_hidden, ref_grad_weight = run_reference(*inputs, temperature)
    assert logprob.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logprob.double().cpu(), ref_logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=0, atol=1e-5)
    assert_grad_close(grad_hidden, ref_grad_hidden)
    assert_grad_close(grad_weight, ref_grad_weight)


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["logprob_only", "entropy_only"])
def test_gradient_when_one_output_is_unused(backend, device, use):
    inputs = make_inputs(device, seed=1)
    *_, grad_hidden, grad_weight = run(*inputs, 0.9, use=use, backend=backend)
    *_, ref_grad_hidden, ref_grad_weight = run_reference(*inputs, 0.9, use=use)
    assert_grad_close(grad_hidden, ref_grad_hidden)
    assert_grad_close(grad_weight, ref_grad_weight)


def test_logprob_nonpositive_and_entropy_within_zero_and_log_v(backend, device):
    hidden, weight, targets, _ = make_inputs(device, seed=2, logit_scale=8.0, num_ignored=0)
    logprob, entropy = fused_logprob_entropy(hidden, weight, targets, backend=backend)
    assert (logprob <= 0).all() and (entropy >= 0).all() and (entropy <= math.log(V) + 1e-5).all()
    # The extremes: identical logits give exactly log V; one dominant logit gives ~0 entropy and ~0 log-prob.
    _, uniform_entropy = fused_logprob_entropy(hidden, torch.zeros_like(weight), targets, backend=backend)
    torch.testing.assert_close(uniform_entropy.cpu(), torch.full((N,), math.log(V)), rtol=0, atol=1e-5)
    peaked_weight = torch.zeros_like(weight)
    peaked_weight[7] = hidden.sum(dim=0) * 1e3 / hidden.sum(dim=0).norm()
    peaked_hidden = hidden.sum(dim=0).expand(N, H).contiguous()
    targets_7 = torch.full_like(targets, 7)
    peaked_logprob, peaked_entropy = fused_logprob_entropy(peaked_hidden, peaked_weight, targets_7, backend=backend)
    assert (peaked_logprob <= 0).all() and (peaked_logprob > -1e-6).all()
    assert (peaked_entropy >= 0).all() and (peaked_entropy < 1e-6).all()


def test_chunk_size_never_changes_results(backend, device):
    inputs = make_inputs(device, seed=3)
    # 2 rows' worth = 46 of 1000 vocabulary entries per chunk (narrower than a Triton tile, never aligned), 209, all.
    results = [run(*inputs, 0.8, backend=backend, chunk_size=size) for size in (2, 9, 10**6)]
    for logprob, entropy, grad_hidden, grad_weight in results[1:]:
        torch.testing.assert_close(logprob, results[0][0], rtol=1e-6, atol=1e-6)  # a few ulps
        torch.testing.assert_close(entropy, results[0][1], rtol=1e-6, atol=1e-6)
        # Gradients sum over a different number of chunks: fp32 reassociation only, far below the 1e-3 budget.
        assert_grad_close(grad_hidden, results[0][2], rel=1e-5)
        assert_grad_close(grad_weight, results[0][3], rel=1e-5)


def test_row_order_never_changes_results(backend, device):
    hidden, weight, targets, upstream = make_inputs(device, seed=4)
    perm_N = torch.randperm(N, generator=torch.Generator().manual_seed(0)).to(device)
    logprob, entropy, grad_hidden, grad_weight = run(hidden, weight, targets, upstream, backend=backend)
    p_logprob, p_entropy, p_grad_hidden, p_grad_weight = run(
        hidden[perm_N], weight, targets[perm_N], upstream[:, perm_N], backend=backend
    )
    torch.testing.assert_close(p_logprob, logprob[perm_N], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p_entropy, entropy[perm_N], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p_grad_hidden, grad_hidden[perm_N], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_grad_weight, grad_weight, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_zero_output_and_gradient_and_are_never_computed(backend, device):
    hidden, weight, targets, upstream = make_inputs(device, seed=5, num_ignored=11)
    ignored_N = targets == IGNORE_INDEX
    # Poison the ignored rows: computing them and masking afterwards would turn this NaN into a NaN grad_weight.
    hidden = hidden.clone()
    hidden[ignored_N] = float("nan")
    logprob, entropy, grad_hidden, grad_weight = run(hidden, weight, targets, upstream, backend=backend)
    assert (logprob[ignored_N] == 0).all() and (entropy[ignored_N] == 0).all()
    assert (grad_hidden[ignored_N] == 0).all()
    assert torch.isfinite(grad_weight).all()
    # ... and the valid rows get exactly what they get without the ignored rows around.
    valid_N = ~ignored_N
    sub = run(hidden[valid_N], weight, targets[valid_N], upstream[:, valid_N], backend=backend)
    torch.testing.assert_close(logprob[valid_N], sub[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy[valid_N], sub[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_hidden[valid_N], sub[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, sub[3], rtol=1e-5, atol=1e-6)


def test_all_rows_ignored(backend, device):
    hidden, weight, targets, upstream = make_inputs(device, seed=6, n=8)
    targets = torch.full_like(targets, IGNORE_INDEX)
    logprob, entropy, grad_hidden, grad_weight = run(hidden, weight, targets, upstream, backend=backend)
    assert not logprob.any() and not entropy.any() and not grad_hidden.any() and not grad_weight.any()


def test_no_nan_at_huge_logits(backend, device):
    hidden, weight, targets, upstream = make_inputs(device, seed=7)
    hidden = hidden * 1e4  # logits ~ 3e4: exp overflows unless every exponent is taken relative to the row max
    logprob, entropy, grad_hidden, grad_weight = run(hidden, weight, targets, upstream, backend=backend)
    for tensor in (logprob, entropy, grad_hidden, grad_weight):
        assert torch.isfinite(tensor).all()
    assert (logprob <= 0).all() and (entropy >= 0).all()
    ref_logprob, ref_entropy, ref_grad_hidden, ref_grad_weight = run_reference(hidden, weight, targets, upstream)
    # fp32 logits of size 3e4 carry ~3e4·2^-24·sqrt(H) ≈ 1e-2 of rounding: compare on that scale.
    torch.testing.assert_close(logprob.double().cpu(), ref_logprob, rtol=1e-5, atol=5e-2)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=0, atol=5e-2)
    assert_grad_close(grad_weight, ref_grad_weight, rel=1e-2)
    assert_grad_close(grad_hidden, ref_grad_hidden, rel=1e-2)


def test_bfloat16_inputs(backend, device):
    """bf16 hidden/weight: logits accumulate in fp32, so values stay fp32-accurate; gradients are bf16-rounded."""
    inputs = make_inputs(device, seed=8, dtype=torch.bfloat16)
    logprob, entropy, grad_hidden, grad_weight = run(*inputs, 0.7, backend=backend)
    ref_logprob, ref_entropy, ref_grad_hidden, ref_grad_weight = run_reference(*inputs, 0.7)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(logprob.double().cpu(), ref_logprob, rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=0, atol=1e-4)
    assert_grad_close(grad_hidden, ref_grad_hidden, rel=2e-2)
    assert_grad_close(grad_weight, ref_grad_weight, rel=2e-2)


# ------------------------------------------------------------------------------------- chunked-backend-only checks


def test_bad_arguments_raise_clear_errors():
    hidden, weight, targets, _ = make_inputs("cpu", seed=10)
    bad_targets = targets.clone()
    bad_targets[3] = V
    with pytest.raises(FusedKernelArgumentError, match="outside the vocabulary"):
        fused_logprob_entropy(hidden, weight, bad_targets)
    with pytest.raises(FusedKernelArgumentError, match="hidden size"):
        fused_logprob_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(FusedKernelArgumentError, match="dtype|bfloat16"):
        fused_logprob_entropy(hidden, weight.bfloat16(), targets)
    with pytest.raises(FusedKernelArgumentError, match="temperature"):
        fused_logprob_entropy(hidden, weight, targets, 0.0)
    with pytest.raises(FusedKernelArgumentError, match="backend"):
        fused_logprob_entropy(hidden, weight, targets, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    import rl.kernels.triton_kernels as triton_kernels

    monkeypatch.setattr(triton_kernels, "INTERPRET", False)
    hidden, weight, targets, _ = make_inputs("cpu", seed=11)
    with pytest.raises(FusedKernelArgumentError, match="TRITON_INTERPRET=1"):
        fused_logprob_entropy(hidden, weight, targets, backend="triton")


def test_import_pulls_in_neither_triton_nor_deepspeed():
    code = "import sys, rl.kernels; bad = {'triton', 'deepspeed'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_ZERO3_SCRIPT = """
import copy, json, os, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from rl.kernels import fused_logprob_entropy, fused_logprob_entropy_zero3

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.lm_head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 100, bias=False)

    def forward(self, x):
        return torch.tanh(self.body(x))

torch.manual_seed(0)
model = Tiny()
reference = copy.deepcopy(model)
config = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
weight = engine.module.lm_head.weight
x, targets = torch.randn(8, 16), torch.randint(0, 100, (8,))
targets[0] = -100
gather = lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
logprob, entropy = fused_logprob_entropy_zero3(engine(x), weight, targets, 0.9, gather_params=gather)
shape_between = list(weight.shape)
engine.backward(-logprob.sum() - 0.1 * entropy.sum())
ref_logprob, ref_entropy = fused_logprob_entropy(reference(x), reference.lm_head.weight, targets, 0.9)
(-ref_logprob.sum() - 0.1 * ref_entropy.sum()).backward()
full_grad = deepspeed.utils.safe_get_full_grad
print(json.dumps({
    "shape_between": shape_between, "shape_after": list(weight.shape),
    "lm_head": (full_grad(weight) - reference.lm_head.weight.grad).abs().max().item(),
    "body": (full_grad(engine.module.body.weight) - reference.body.weight.grad).abs().max().item(),
}))
"""


# The default run covers the ZeRO-3 gather with real DeepSpeed in tests/integration/test_learner.py (stage 3: the fused
# kernel on a gathered tied lm_head, micro-batches equal to the full-batch update); this one also checks the release.
@pytest.mark.slow
def test_zero3_helper_with_real_deepspeed_matches_unpartitioned_gradients():
    """One rank, gloo, ZeRO-3 with every parameter partitioned: the lm_head weight is an empty shard between forward
    and backward, and both gradients equal those of the same model without DeepSpeed."""
    pytest.importorskip("deepspeed")
    import json
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    result = subprocess.run(
        [sys.executable, "-c", _ZERO3_SCRIPT], env={**os.environ, "PORT": port}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape_between"] == [0] and report["shape_after"] == [0]
    assert report["lm_head"] < 1e-6 and report["body"] < 1e-6, report
