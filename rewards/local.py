"""Scoring without Ray, and the pieces the Ray service shares with it.

`RewardRunner` calls one reward on one micro-batch (sync or async, with a timeout) and checks what comes back; the
service runs it inside Ray actors, `LocalRewardScorer` in this process (used by `recforge reward test` and unit
tests). Both then hand per-rollout results and errors to `assemble_report`, which applies each reward's failure
policy, combines the rewards and computes the metrics, so a plugin behaves identically on a laptop and on a cluster.

What counts as a failure (never scored as zero): the reward raises, times out, returns something that is not a list,
returns the wrong number of results, or a result that is not a RewardResult/number or is not finite. Under the
policy "fail" the first one raises `RewardError` naming the reward, the rollout id and the cause; under "skip_group"
every group (rollouts sharing a sample id) with a failed rollout is dropped and counted.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.api import (
    RewardError,
    RewardInfo,
    TransientRewardError,
    check_kwargs,
    is_async_reward,
    load_target,
    resolve_reward,
)
from rl.config import ConfigError, RewardConfig, RewardSpec
from rl.types import RewardResult, Rollout, ScoredRollout

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ScoreReport:
    """What `score` returns: scored rollouts (input order, dropped groups left out) and metrics for the step."""

    scored: list[ScoredRollout]
    dropped_group_ids: list[str]
    """Sample ids of the groups dropped under failure_policy "skip_group", in input order."""
    metrics: dict[str, float]
    """`reward/<name>` (mean score over kept rollouts), `reward/<name>/<component>`, `reward/total` (mean combined
    reward), `reward/dropped_groups`, `reward/cache_hits` (service), `timing/reward` (seconds for the whole call),
    `timing/reward/<name>` (seconds spent in that reward's calls, summed). Means are absent when nothing was kept."""
    errors: list[str] = field(default_factory=list)
    """One message per failed rollout in a dropped group (reward, rollout id, cause)."""


@dataclass(frozen=True, kw_only=True)
class BatchOutcome:
    """One reward call on one micro-batch: a result or an error per rollout (exactly one of them is None)."""

    results: list[RewardResult | None]
    errors: list[str | None]
    elapsed_s: float
    transient: bool = False
    """The whole call failed in a way worth retrying (TransientRewardError, ConnectionError, actor died)."""
    timed_out: bool = False


def failed_outcome(num: int, cause: str, elapsed_s: float, *, transient: bool = False,
                   timed_out: bool = False) -> BatchOutcome:
    return BatchOutcome(results=[None] * num, errors=[cause] * num, elapsed_s=elapsed_s, transient=transient,
                        timed_out=timed_out)


def _check_one(item: Any) -> tuple[RewardResult | None, str | None]:
    if isinstance(item, numbers.Real) and not isinstance(item, bool):
        item = RewardResult(score=float(item))
    if not isinstance(item, RewardResult):
        return None, f"returned a {type(item).__name__} ({item!r:.80}) instead of a RewardResult or a number"
    if not isinstance(item.score, numbers.Real) or isinstance(item.score, bool):
        return None, f"returned a score of type {type(item.score).__name__} ({item.score!r:.80}), expected a float"
    if not math.isfinite(item.score):
        return None, f"returned a non-finite score ({item.score})"
    for key, value in item.components.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return None, f"returned component '{key}' of type {type(value).__name__}, expected a float"
        if not math.isfinite(value):
            return None, f"returned a non-finite component '{key}' ({value})"
    return item, None


def check_results(value: Any, num_rollouts: int) -> tuple[list[RewardResult | None], list[str | None]]:
    """Per-rollout results and errors for what a reward returned on a batch of `num_rollouts`."""
    if not isinstance(value, (list, tuple)):
        cause = f"returned a {type(value).__name__} instead of a list of RewardResult (one per rollout)"
        return [None] * num_rollouts, [cause] * num_rollouts
    if len(value) != num_rollouts:
        cause = (f"returned {len(value)} results for a batch of {num_rollouts} rollouts; a reward must return "
                 "exactly one result per rollout, in input order")
        return [None] * num_rollouts, [cause] * num_rollouts
    checked = [_check_one(item) for item in value]
    return [r for r, _ in checked], [e for _, e in checked]


def describe_exception(err: BaseException) -> str:
    """`raised KeyError: 'rating' (at plugin.py:12 in score)`: the cause plus where in the plugin it happened."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"raised {type(err).__name__}: {err}{where}"


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any, err: BaseException | None) -> None:
    def settle() -> None:
        if not fut.done():  # a timed-out call was cancelled: drop its late result
            fut.set_exception(err) if err is not None else fut.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed (the caller gave up long ago)
        pass


class RewardRunner:
    """Calls one reward on micro-batches with a timeout and checks the results. A plain class: the service makes it a
    Ray actor (`ray.remote(RewardRunner)`), the local scorer calls it directly.

    Sync rewards run in a daemon thread so a timeout can return while the call is still running (the thread cannot be
    killed; the service replaces an actor whose sync call timed out, and a CLI process can still exit).
    """

    def __init__(self, name: str, fn: Callable[..., Any] | str, kwargs: Mapping[str, Any], *,
                 timeout_s: float) -> None:
        self.name = name
        self._fn = load_target(fn) if isinstance(fn, str) else fn
        self._kwargs = dict(kwargs)
        self._timeout_s = timeout_s
        self._is_async = is_async_reward(self._fn)

    async def ready(self) -> bool:
        return True

    async def _call(self, rollouts: list[Rollout]) -> Any:
        if self._is_async:
            return await self._fn(rollouts, **self._kwargs)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def work() -> None:
            try:
                _deliver(loop, fut, self._fn(rollouts, **self._kwargs), None)
            except BaseException as err:  # noqa: B036 - any failure of the plugin goes back to the caller
                _deliver(loop, fut, None, err)

        threading.Thread(target=work, name=f"reward-{self.name}", daemon=True).start()
        value = await fut
        return await value if inspect.isawaitable(value) else value

    async def score(self, rollouts: Sequence[Rollout]) -> BatchOutcome:
        """Score one micro-batch; never raises for a plugin's failure (it comes back in the outcome)."""
        batch, start = list(rollouts), time.perf_counter()
        try:
            value = await asyncio.wait_for(self._call(batch), timeout=self._timeout_s)
        except asyncio.TimeoutError:
            cause = f"timed out after {self._timeout_s:g} s (RewardSpec.timeout_s)"
            return failed_outcome(len(batch), cause, time.perf_counter() - start, timed_out=True)
        except (TransientRewardError, ConnectionError) as err:
            return failed_outcome(len(batch), f"transient error: {describe_exception(err)}",
                                  time.perf_counter() - start, transient=True)
        except Exception as err:
            return failed_outcome(len(batch), describe_exception(err), time.perf_counter() - start)
        results, errors = check_results(value, len(batch))
        return BatchOutcome(results=results, errors=errors, elapsed_s=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------------
# Preparing a config, batching, combining.


@dataclass(frozen=True, kw_only=True)
class PreparedReward:
    """A `RewardSpec` with its reward resolved and its kwargs checked."""

    key: str
    """Name in metrics, results and the cache: `spec.alias or spec.name`."""
    spec: RewardSpec
    info: RewardInfo
    deterministic: bool


def prepare_rewards(cfg: RewardConfig) -> list[PreparedReward]:
    """Resolve every reward, check kwargs, unique names and the combiner's needs; fail before any rollout is scored."""
    if not cfg.rewards:
        raise ConfigError("reward.rewards is empty: a run needs at least one reward. Add e.g. `- name: format`.")
    if cfg.combiner not in COMBINERS:
        raise ConfigError(f"reward.combiner={cfg.combiner!r} is not one of {', '.join(COMBINERS)}.")
    prepared, seen = [], {}
    for i, spec in enumerate(cfg.rewards):
        key = spec.alias or spec.name
        if key in seen:
            raise ConfigError(f"reward.rewards[{i}] and reward.rewards[{seen[key]}] are both named '{key}'. Give one "
                              "an `alias` (its name in metrics and results), e.g. alias: ranking_ndcg.")
        seen[key] = i
        if spec.threshold is not None and cfg.combiner != "constrained":
            raise ConfigError(f"reward.rewards[{i}].threshold={spec.threshold} is set, but reward.combiner="
                              f"'{cfg.combiner}' does not use thresholds. Use combiner: constrained, or remove it.")
        info = resolve_reward(spec.name)
        check_kwargs(info, spec.kwargs, label=key)
        deterministic = info.deterministic if spec.deterministic is None else spec.deterministic
        prepared.append(PreparedReward(key=key, spec=spec, info=info, deterministic=deterministic))
    if cfg.combiner == "constrained" and all(p.spec.threshold is not None for p in prepared):
        raise ConfigError("reward.combiner='constrained' needs at least one reward without a threshold (the accuracy "
                          "term R_acc); every reward in reward.rewards has one.")
    return prepared


def make_batches(rollouts: Sequence[Rollout], batch_size: int) -> list[list[int]]:
    """Indices of micro-batches of at most `batch_size`, packing whole groups together where they fit, so a failed
    call under "skip_group" costs as few groups as possible; a group larger than `batch_size` is split."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.sample.sample_id, []).append(i)
    batches: list[list[int]] = []
    current: list[int] = []
    for members in groups.values():
        if len(current) + len(members) > batch_size and current:
            batches.append(current)
            current = []
        while len(members) > batch_size:
            batches.append(members[:batch_size])
            members = members[batch_size:]
        current = current + members
    if current:
        batches.append(current)
    return batches


def weighted_sum(scores: Mapping[str, float], specs: Mapping[str, RewardSpec]) -> float:
    """R = Σ_k w_k · R_k."""
    return sum(specs[k].weight * s for k, s in scores.items())


def constrained(scores: Mapping[str, float], specs: Mapping[str, RewardSpec]) -> float:
    """RecGPT-V2 constrained reward: R = R_acc · Π_k 1[R_k ≥ τ_k].

    R_acc is the weighted sum of the rewards without a threshold; every reward with a threshold τ_k is a gate.
    """
    acc = sum(specs[k].weight * s for k, s in scores.items() if specs[k].threshold is None)
    gates_pass = all(s >= specs[k].threshold for k, s in scores.items() if specs[k].threshold is not None)
    return acc if gates_pass else 0.0


COMBINERS: Mapping[str, Callable[[Mapping[str, float], Mapping[str, RewardSpec]], float]] = {
    "weighted_sum": weighted_sum,
    "constrained": constrained,
}


def check_unique_ids(rollouts: Sequence[Rollout]) -> None:
    seen: set[str] = set()
    for r in rollouts:
        if r.rollout_id in seen:
            raise ValueError(f"Rollout id '{r.rollout_id}' appears twice in one score() call; a step must never "
                             "duplicate a rollout (check the rollout pool's re-issue logic).")
        seen.add(r.rollout_id)


# ---------------------------------------------------------------------------------------------------------------------
# From per-rollout outcomes to a report: failure policy, combiner, metrics.


@dataclass(kw_only=True)
class RewardRun:
    """Per-reward, per-rollout results and errors of one scoring pass, before any failure policy is applied."""

    results: dict[str, list[RewardResult | None]]
    errors: dict[str, list[str | None]]
    call_seconds: dict[str, list[float]]
    """Wall time of each reward call (cache hits make none)."""
    cache_hits: int = 0

    @classmethod
    def empty(cls, keys: Sequence[str], num_rollouts: int) -> RewardRun:
        return cls(results={k: [None] * num_rollouts for k in keys}, errors={k: [None] * num_rollouts for k in keys},
                   call_seconds={k: [] for k in keys})

    def record(self, key: str, indices: Sequence[int], outcome: BatchOutcome, *, attempts: int = 1) -> None:
        self.call_seconds[key].append(outcome.elapsed_s)
        for pos, i in enumerate(indices):
            error = outcome.errors[pos]
            if error is not None and outcome.transient:
                error = f"{error} (still failing after {attempts} attempt(s), RewardSpec.max_retries)"
            self.results[key][i], self.errors[key][i] = outcome.results[pos], error


def _step_error(key: str, rollouts: Sequence[Rollout], failures: list[tuple[int, str]]) -> RewardError:
    first, cause = failures[0]
    others = [rollouts[i].rollout_id for i, _ in failures[1:]]
    more = f"{len(others)} more rollout(s) failed too ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}). "
    return RewardError(key, cause, rollout_id=rollouts[first].rollout_id,
                       hint=(more if others else "") + "The step fails under failure_policy 'fail'; set "
                       "failure_policy: skip_group on this reward to drop the affected groups instead.")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _metrics(scored: Sequence[ScoredRollout], prepared: Sequence[PreparedReward], run: RewardRun,
             num_dropped: int, elapsed_s: float) -> dict[str, float]:
    metrics = {"reward/dropped_groups": float(num_dropped), "timing/reward": elapsed_s}
    for p in prepared:
        metrics[f"timing/reward/{p.key}"] = sum(run.call_seconds[p.key])
        if not scored:
            continue
        metrics[f"reward/{p.key}"] = _mean([s.results[p.key].score for s in scored])
        components: dict[str, list[float]] = {}
        for s in scored:
            for name, value in s.results[p.key].components.items():
                components.setdefault(name, []).append(float(value))
        for name, values in components.items():
            metrics[f"reward/{p.key}/{name}"] = _mean(values)
    if scored:
        metrics["reward/total"] = _mean([s.reward for s in scored])
    return metrics


def assemble_report(rollouts: Sequence[Rollout], prepared: Sequence[PreparedReward], run: RewardRun, *,
                    combiner: str, elapsed_s: float) -> ScoreReport:
    """Apply failure policies (all "fail" rewards first), combine the kept rollouts' scores and compute metrics."""
    ordered = sorted(prepared, key=lambda p: p.spec.failure_policy != "fail")
    dropped: set[str] = set()
    messages: list[str] = []
    for p in ordered:
        failures = [(i, e) for i, e in enumerate(run.errors[p.key]) if e is not None]
        if failures and p.spec.failure_policy == "fail":
            raise _step_error(p.key, rollouts, failures)
        for i, cause in failures:
            dropped.add(rollouts[i].sample.sample_id)
            messages.append(str(RewardError(p.key, cause, rollout_id=rollouts[i].rollout_id)))
    for message in messages:
        logger.warning("%s (group dropped: failure_policy skip_group)", message)
    specs = {p.key: p.spec for p in prepared}
    combine = COMBINERS[combiner]
    scored = []
    for i, r in enumerate(rollouts):
        if r.sample.sample_id in dropped:
            continue
        results = {p.key: run.results[p.key][i] for p in prepared}
        assert all(v is not None for v in results.values()), f"rollout {r.rollout_id} has neither result nor error"
        total = combine({k: v.score for k, v in results.items()}, specs)  # type: ignore[union-attr]
        scored.append(ScoredRollout(rollout=r, reward=total, results=results))  # type: ignore[arg-type]
    dropped_ids = list(dict.fromkeys(r.sample.sample_id for r in rollouts if r.sample.sample_id in dropped))
    metrics = _metrics(scored, prepared, run, len(dropped_ids), elapsed_s)
    if run.cache_hits:
        metrics["reward/cache_hits"] = float(run.cache_hits)
    return ScoreReport(scored=scored, dropped_group_ids=dropped_ids, metrics=metrics, errors=messages)


class LocalRewardScorer:
    """`RewardService`'s contract in this process, without Ray: the same resolution, checks, micro-batches, retries,
    failure policies, combiners and metrics; one call at a time (per-call timings stay meaningful), no cache.

        scorer = LocalRewardScorer(RewardConfig(rewards=[RewardSpec(name="format")]))
        report = scorer.score(rollouts)
    """

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.prepared = prepare_rewards(cfg)
        self._runners = {p.key: RewardRunner(p.key, p.info.fn, p.spec.kwargs, timeout_s=p.spec.timeout_s)
                         for p in self.prepared}

    async def _run_reward(self, p: PreparedReward, rollouts: Sequence[Rollout], run: RewardRun) -> None:
        for indices in make_batches(rollouts, p.spec.batch_size):
            batch = [rollouts[i] for i in indices]
            for attempt in range(1, p.spec.max_retries + 2):
                outcome = await self._runners[p.key].score(batch)
                if not outcome.transient or attempt > p.spec.max_retries:
                    break
                logger.warning("Reward '%s': %s; retrying (%d/%d).", p.key, outcome.errors[0], attempt,
                               p.spec.max_retries)
            run.record(p.key, indices, outcome, attempts=attempt)

    def run(self, rollouts: Sequence[Rollout]) -> RewardRun:
        """Every reward on every rollout; per-rollout results and errors, no failure policy applied."""
        run = RewardRun.empty([p.key for p in self.prepared], len(rollouts))
        for p in self.prepared:
            asyncio.run(self._run_reward(p, rollouts, run))  # one event loop per reward, as in its actor
        return run

    def score(self, rollouts: Sequence[Rollout]) -> ScoreReport:
        """Score, apply failure policies, combine; raises RewardError under failure_policy "fail"."""
        start = time.perf_counter()
        check_unique_ids(rollouts)
        run = self.run(rollouts)
        return assemble_report(rollouts, self.prepared, run, combiner=self.cfg.combiner,
                               elapsed_s=time.perf_counter() - start)
