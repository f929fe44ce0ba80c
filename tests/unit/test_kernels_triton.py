"""Fused log-prob/entropy, Triton backend: the same tests as test_kernels.py, plus GPU checks at real shapes.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU at tiny shapes (N <= 64, H <= 64, V ~ 1k). Triton reads
that variable when `triton.language` and each kernel are decorated (at import) and again at every launch, so this
module sets it around triton's first import and around each of its tests, and restores it otherwise (other test
modules see the environment they expect). If something imported triton earlier in this process without it, the
suite re-runs itself in a fresh interpreter process instead. With CUDA, the same tests run the compiled kernels on
the GPU, and the `gpu` tests add real shapes (bf16, 8k tokens, 128k vocabulary).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = not HAS_CUDA
IN_PROCESS = HAS_CUDA or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"


def _import_kernels():
    """rl.kernels.triton_kernels with triton.language and the kernels decorated in the mode this host needs."""
    previous = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        module = importlib.import_module("rl.kernels.triton_kernels")
        if module.INTERPRET != INTERPRET:  # imported earlier under the other mode: decorate the kernels again
            module = importlib.reload(module)
        return module
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


from rl.kernels import IGNORE_INDEX, fused_logprob_entropy  # noqa: E402


def _load_shared_tests() -> dict:
    """The backend-parametrised tests of test_kernels.py (those taking `backend`), loaded from its file so that this
    works whatever pytest's import mode or package layout."""
    path = Path(__file__).with_name("test_kernels.py")
    spec = importlib.util.spec_from_file_location("_shared_kernel_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {
        name: fn
        for name, fn in vars(module).items()
        if name.startswith("test_") and "backend" in inspect.signature(fn).parameters
    }


_shared = _load_shared_tests()
_helpers = _shared["test_matches_float64_reference"].__globals__
make_inputs, run, assert_grad_close = _helpers["make_inputs"], _helpers["run"], _helpers["assert_grad_close"]
if IN_PROCESS:
    triton_kernels = _import_kernels()
    globals().update(_shared)
else:

    def test_triton_suite_in_a_fresh_interpreter_process():
        """triton was imported before this module without TRITON_INTERPRET: run this file again where it is set."""
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if INTERPRET:  # the interpreter checks it again at every launch
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def backend() -> str:
    return "triton"


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.mark.skipif(not IN_PROCESS, reason="runs in the fresh interpreter process")
def test_split_merge_matches_single_pass():
    """The forward's cross-split merge equals one pass over the whole vocabulary (the online update is exact)."""
    device = "cuda" if HAS_CUDA else "cpu"
    hidden, weight, targets, _ = make_inputs(device, n=20, v=700, num_ignored=0, logit_scale=6.0)
    one_split = fused_logprob_entropy(hidden, weight, targets, backend="chunked")
    split = triton_kernels.triton_forward_stats(hidden, weight, targets, 1.0)
    torch.testing.assert_close(split[0], one_split[0], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(split[1], one_split[1], rtol=1e-6, atol=2e-6)


# --------------------------------------------------------------------------------------------- GPU, real shapes

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpu_bf16_matches_float64_reference_at_real_shapes(temperature):
    # H and V of an 8B-class model; 1k tokens keeps the float64 reference's [N, V] logits at 1 GiB.
    inputs = make_inputs("cuda", n=1024, h=4096, v=131072, num_ignored=100, dtype=torch.bfloat16, seed=20)
    logprob, entropy, grad_hidden, grad_weight = run(*inputs, temperature, backend="triton")
    ref = _gpu_reference(*inputs, temperature)
    torch.testing.assert_close(logprob.double(), ref[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(entropy.double(), ref[1], rtol=0, atol=2e-3)
    assert_grad_close(grad_hidden, ref[2], rel=2e-2)  # dL/dlogits is rounded to bf16 before the GEMMs
    assert_grad_close(grad_weight, ref[3], rel=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_fp32_matches_float64_reference():
    inputs = make_inputs("cuda", n=512, h=1024, v=32000, num_ignored=50, seed=21)
    logprob, entropy, grad_hidden, grad_weight = run(*inputs, 0.9, backend="triton")
    ref = _gpu_reference(*inputs, 0.9)
    torch.testing.assert_close(logprob.double(), ref[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref[1], rtol=0, atol=1e-4)
    assert_grad_close(grad_hidden, ref[2])
    assert_grad_close(grad_weight, ref[3])


@pytest.mark.gpu
@gpu
def test_gpu_peak_extra_memory_stays_under_a_gib_at_8k_by_128k():
    n, h, v = 8192, 4096, 131072
    hidden, weight, targets, upstream = make_inputs("cuda", n=n, h=h, v=v, num_ignored=0, dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    # Warm-up at the same shapes: autotuning (and its 256 MB L2-flush buffer) must not count as the op's memory.
    logprob, entropy = fused_logprob_entropy(hidden, weight, targets, backend="triton")
    (logprob * upstream[0] + entropy * upstream[1]).sum().backward()
    hidden.grad = weight.grad = logprob = entropy = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logprob, entropy = fused_logprob_entropy(hidden, weight, targets, backend="triton")
    (logprob * upstream[0] + entropy * upstream[1]).sum().backward()
    torch.cuda.synchronize()
    grads = hidden.grad.nbytes + weight.grad.nbytes  # the outputs any implementation must hold
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 2**30, f"peak extra memory {extra / 2**30:.2f} GiB"
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
    assert (logprob <= 0).all() and (entropy >= 0).all() and (entropy <= math.log(v) + 1e-3).all()


@pytest.mark.gpu
@gpu
def test_gpu_ignored_rows_are_skipped_at_real_shapes():
    hidden, weight, targets, upstream = make_inputs("cuda", n=2048, h=2048, v=65536, num_ignored=1500, seed=22)
    hidden[targets == IGNORE_INDEX] = float("nan")
    logprob, entropy, grad_hidden, grad_weight = run(hidden, weight, targets, upstream, backend="triton")
    ignored = targets == IGNORE_INDEX
    assert (logprob[ignored] == 0).all() and (entropy[ignored] == 0).all() and (grad_hidden[ignored] == 0).all()
    assert torch.isfinite(grad_weight).all()


def _gpu_reference(hidden, weight, targets, upstream, temperature):
    """float64 reference on the GPU (a CPU float64 pass over 1k × 4k × 128k would take minutes)."""
    hidden64 = hidden.double().requires_grad_()
    weight64 = weight.double().requires_grad_()
    from rl.kernels.reference import naive_logprob_entropy

    logprob, entropy = naive_logprob_entropy(hidden64, weight64, targets, temperature)
    (logprob * upstream[0].double() + entropy * upstream[1].double()).sum().backward()
    return logprob.detach(), entropy.detach(), hidden64.grad, weight64.grad
