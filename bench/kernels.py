"""Fused log-prob + entropy vs naive full logits vs Liger-Kernel's chunked GRPO loss: peak extra memory and time.

    .venv/bin/python -m bench.kernels             # CPU: N=4096, H=576, V=49152 fp32 (SmolLM2-135M's lm_head)
                                                  # GPU: N=8192, H=4096, V=131072 bf16, plus TFLOP/s
    .venv/bin/python -m bench.kernels --quick     # small shapes, seconds

Each method runs forward + backward of L = Σ g·logprob + Σ h·entropy (Liger: its GRPO loss, which needs log-probs
only) from leaf hidden/weight tensors. Prints one JSON object and writes bench/out/kernels_<device>.{json,png}.

Methods:
- naive: logits = hidden @ weightᵀ, log_softmax, gather, entropy = −Σ p·log p, plain autograd (what a model's
  lm_head + loss does);
- ours: `rl.kernels.fused_logprob_entropy` (chunked torch on CPU, Triton kernels on GPU; on GPU the chunked backend is
  reported too as ours_chunked);
- liger: `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(compiled=False)`, its pure-PyTorch chunked path
  (`pip install liger-kernel`, the project's `bench` extra); skipped with a note when it is not installed.

Peak extra memory = the most bytes allocated at any moment during forward + backward beyond what existed before
(inputs), gradients included. On CPU it is computed exactly from the torch profiler's allocation events (tracemalloc
does not see torch's allocator); process RSS, sampled every millisecond, is reported next to it as a cross-check. On
GPU it is torch.cuda.max_memory_allocated() minus the allocation before the call. Times are wall-clock medians over
--repeats rounds after one warm-up round, the methods interleaved within each round; on a shared CPU host wall
time is noisy, so min/max and the process CPU time (steadier under load from other processes) are reported too.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rl.kernels import fused_logprob_entropy

logger = logging.getLogger(__name__)

OUT_DIR = Path(__file__).resolve().parent / "out"
SHAPES = {  # (N, H, V, dtype)
    ("cpu", False): (4096, 576, 49152, torch.float32),
    ("cpu", True): (1024, 256, 8192, torch.float32),
    ("cuda", False): (8192, 4096, 131072, torch.bfloat16),
    ("cuda", True): (4096, 2048, 32768, torch.bfloat16),
}
Step = Callable[[], None]


def naive_step(hidden_NH, weight_VH, targets_N, upstream_2N, temperature) -> Step:
    def step() -> None:
        logits_NV = (hidden_NH @ weight_VH.T).float() / temperature
        logp_NV = torch.log_softmax(logits_NV, dim=-1)
        logprob_N = logp_NV.gather(1, targets_N[:, None]).squeeze(1)
        entropy_N = -(logp_NV.exp() * logp_NV).sum(dim=-1)
        (logprob_N * upstream_2N[0] + entropy_N * upstream_2N[1]).sum().backward()

    return step


def ours_step(hidden_NH, weight_VH, targets_N, upstream_2N, temperature, backend="auto", chunk_size=None) -> Step:
    def step() -> None:
        logprob_N, entropy_N = fused_logprob_entropy(
            hidden_NH, weight_VH, targets_N, temperature, backend=backend, chunk_size=chunk_size
        )
        (logprob_N * upstream_2N[0] + entropy_N * upstream_2N[1]).sum().backward()

    return step


def liger_step(hidden_NH, weight_VH, targets_N, upstream_2N, temperature, seq_len=512) -> Step | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    num_seqs = hidden_NH.shape[0] // seq_len
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, temperature=temperature)
    mask_BT = torch.ones(num_seqs, seq_len, dtype=torch.long, device=hidden_NH.device)
    advantages_B = upstream_2N[0][:num_seqs].float()

    def step() -> None:
        hidden_BTH = hidden_NH.view(num_seqs, seq_len, -1)  # a view: gradients still land on hidden_NH
        loss, _ = loss_fn(hidden_BTH, weight_VH, targets_N.view(num_seqs, seq_len), mask_BT, advantages_B)
        loss.backward()

    return step


def cpu_peak_extra(step: Step) -> dict:
    """Exact peak of torch CPU allocations during `step` (profiler allocation events), and sampled RSS growth."""
    import psutil
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    process, rss_peak, done = psutil.Process(), [0], threading.Event()
    rss_before = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            rss_peak[0] = max(rss_peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    done.set()
    sampler.join()
    allocations: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return {"peak_extra_bytes": peak, "rss_growth_bytes": max(0, rss_peak[0] - rss_before)}


def cuda_peak_extra(step: Step) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before}


def timed(step: Step, repeats: int, sync: Callable[[], None]) -> dict:
    return summarize([time_once(step, sync) for _ in range(repeats)])


def time_once(step: Step, sync: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is steadier than wall time on a shared host."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def summarize(samples: list[tuple[float, float]]) -> dict:
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {
        "time_s": statistics.median(walls),
        "time_min_s": min(walls),
        "time_max_s": max(walls),
        "cpu_time_s": statistics.median(cpus),
    }


def measure_all(steps: dict[str, Step], leaves: list[torch.Tensor], args: argparse.Namespace, is_cuda: bool) -> dict:
    """Warm up every method, time them in interleaved rounds (so that load from other processes hits all methods
    alike), then measure each one's peak extra memory in a separate call."""
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    def clear_grads() -> None:
        for leaf in leaves:
            leaf.grad = None

    samples: dict[str, list] = {name: [] for name in steps}
    for round_index in range(args.repeats + 1):  # round 0 is the warm-up: autotuning, lazy imports, pools
        for name, step in steps.items():
            clear_grads()
            sample = time_once(step, sync)
            if round_index > 0:
                samples[name].append(sample)
    results = {}
    for name, step in steps.items():
        clear_grads()
        result = summarize(samples[name])
        result.update(cuda_peak_extra(step) if is_cuda else cpu_peak_extra(step))
        grad_bytes = sum(leaf.grad.nbytes for leaf in leaves if leaf.grad is not None)
        result["peak_extra_excl_grads_bytes"] = result["peak_extra_bytes"] - grad_bytes
        logger.info("%s: %s", name, result)
        results[name] = result
    clear_grads()
    return results


def forward_time(make_forward: Callable[[], None], args: argparse.Namespace, is_cuda: bool) -> float:
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    with torch.no_grad():
        make_forward()
        return timed(make_forward, args.repeats, sync)["time_s"]


def run(args: argparse.Namespace) -> dict:
    is_cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if is_cuda else "cpu"
    n, h, v, dtype = SHAPES[(device, args.quick)]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden_NH = torch.randn(n, h, generator=gen, device=device).to(dtype).requires_grad_()
    weight_VH = (torch.randn(v, h, generator=gen, device=device) * (3.0 / h**0.5)).to(dtype).requires_grad_()
    targets_N = torch.randint(0, v, (n,), generator=gen, device=device)
    upstream_2N = torch.randn(2, n, generator=gen, device=device)
    inputs = (hidden_NH, weight_VH, targets_N, upstream_2N, args.temperature)
    leaves = [hidden_NH, weight_VH]

    steps = {"naive": naive_step(*inputs), "ours": ours_step(*inputs, chunk_size=args.chunk_size)}
    if is_cuda:
        steps["ours_chunked"] = ours_step(*inputs, backend="chunked", chunk_size=args.chunk_size)
    notes = []
    if "liger" in args.methods:
        liger = liger_step(*inputs)
        if liger is None:
            notes.append("liger-kernel not installed (pip install liger-kernel): skipped")
        else:
            steps["liger"] = liger
            notes.append("liger computes log-probs only (its GRPO loss has no entropy term)")
    steps = {name: step for name, step in steps.items() if name.split("_")[0] in args.methods}
    methods = measure_all(steps, leaves, args, is_cuda)

    report = {
        "device": torch.cuda.get_device_name() if is_cuda else f"cpu ({torch.get_num_threads()} threads)",
        "shape": {"N": n, "H": h, "V": v, "dtype": str(dtype).removeprefix("torch."), "temperature": args.temperature},
        "torch": torch.__version__,
        "methods": methods,
        "notes": notes,
    }
    if {"naive", "ours"} <= methods.keys():
        report["ours_vs_naive"] = _ratios(methods["naive"], methods["ours"])
    if is_cuda and "ours" in methods:
        report["tflops"] = _tflops(inputs, args, n, h, v, methods)
    return report


def _ratios(naive: dict, ours: dict) -> dict:
    return {
        "memory_ratio": ours["peak_extra_bytes"] / naive["peak_extra_bytes"],
        "memory_ratio_excl_grads": ours["peak_extra_excl_grads_bytes"] / naive["peak_extra_excl_grads_bytes"],
        "time_ratio": ours["time_s"] / naive["time_s"],
        "time_min_ratio": ours["time_min_s"] / naive["time_min_s"],
        "cpu_time_ratio": ours["cpu_time_s"] / naive["cpu_time_s"],
    }


def _tflops(inputs, args, n, h, v, methods) -> dict:
    """Achieved TFLOP/s: forward 2NHV; forward+backward as 6NHV (model FLOPs) and 8NHV (with the recompute)."""
    hidden_NH, weight_VH, targets_N, _, temperature = inputs

    def forward() -> None:
        fused_logprob_entropy(hidden_NH, weight_VH, targets_N, temperature)

    fwd_s = forward_time(forward, args, True)
    total_s = methods["ours"]["time_s"]
    flop = n * h * v
    return {
        "forward_s": fwd_s,
        "forward": 2 * flop / fwd_s / 1e12,
        "fwd_bwd_6NHV": 6 * flop / total_s / 1e12,
        "fwd_bwd_8NHV": 8 * flop / total_s / 1e12,
    } | ({"naive_fwd_bwd_6NHV": 6 * flop / methods["naive"]["time_s"] / 1e12} if "naive" in methods else {})


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    panels = [
        ("peak extra memory (MiB)", [report["methods"][k]["peak_extra_bytes"] / 2**20 for k in names]),
        ("fwd+bwd wall time, median (s)", [report["methods"][k]["time_s"] for k in names]),
        ("fwd+bwd process CPU time (s)", [report["methods"][k]["cpu_time_s"] for k in names]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    colors = {"naive": "#999999", "ours": "#1f77b4", "ours_chunked": "#aec7e8", "liger": "#ff7f0e"}
    for ax, (label, values) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=[colors.get(k, "#2ca02c") for k in names])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_ylabel(label)
    shape = report["shape"]
    dims = f"N={shape['N']} H={shape['H']} V={shape['V']} {shape['dtype']}"
    fig.suptitle(f"log-prob + entropy, forward + backward, {dims}, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--cpu", action="store_true", help="benchmark on CPU even if a GPU is present")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows' worth of logits per chunk for ours (default: per device)"
    )
    parser.add_argument(
        "--methods", type=lambda text: text.split(","), default=["naive", "ours", "liger"], help="comma-separated"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{'cpu' if report['device'].startswith('cpu') else 'cuda'}{'_quick' if args.quick else ''}"
    stem += "" if args.methods == ["naive", "ours", "liger"] else "_" + "_".join(args.methods)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / f"{stem}.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
