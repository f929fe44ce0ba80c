"""Actor health on the driver: calls with deadlines, heartbeats, fault counters and the restart budget.

Two kinds of actors, two policies (DESIGN.md, "Actors and placement"):

- Rollout workers and reward actors are restartable. Ray restarts a dead one (`cluster.max_restarts`), its handle
  (`rollouts.pool.RolloutPool`, `rewards.service.RewardService`) re-applies what it needs (the current weights) and
  re-issues the unfinished call exactly once. Every restart and re-issue is logged at WARNING and counted as a
  `fault/*` metric of the step; past `max_restarts` failures of one actor the run stops with an error.
- Learner ranks are not: they share one torch.distributed group, and a rank that dies leaves the others blocked in a
  collective. `wait_all` notices the death at once (it does not wait for the blocked survivors) and every learner
  call has a deadline (`cluster.learner_timeout_s`), so the step fails with a clear error instead of hanging; the run
  resumes from its last checkpoint when it is submitted again (`run.resume=auto`).

Before each step the trainer sends every actor a heartbeat (`ping`, bounded by `cluster.health_check_timeout_s`):
a dead or unresponsive rollout or reward actor is restarted there, between steps, and a dead learner fails the run
before any work of the step is spent.

This module imports ray but none of vllm/deepspeed; the handles use it, the actors never do.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_error(err: BaseException, limit: int = 600) -> str:
    """One line of a (Ray) error for a log line or an error message: ANSI colours dropped, the middle elided."""
    text = " ".join(_ANSI.sub("", f"{type(err).__name__}: {err}").split())
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:]


class ActorCallError(RuntimeError):
    """A named actor call failed (the actor died, or its method raised) or missed its deadline."""

    def __init__(self, name: str, what: str, cause: str, *, timed_out: bool = False) -> None:
        self.name, self.what, self.cause, self.timed_out = name, what, cause, timed_out
        super().__init__(f"{name} {'did not answer' if timed_out else 'failed'} during {what}: {cause}")

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only fields survive pickling
        return (_rebuild, (type(self), self.name, self.what, self.cause, self.timed_out))


def _rebuild(cls: type[ActorCallError], name: str, what: str, cause: str, timed_out: bool) -> ActorCallError:
    return cls(name, what, cause, timed_out=timed_out)


def wait_all(calls: Mapping[str, ray.ObjectRef], *, what: str, timeout_s: float | None) -> dict[str, Any]:
    """The result of every call, by name.

    Raises `ActorCallError` for the first call that fails, as soon as it fails (without waiting for the others: a
    learner rank blocked in a collective with a dead peer would never answer), or, once `timeout_s` has passed,
    for the calls still pending. `timeout_s=None` waits as long as it takes (failures still surface at once).
    """
    names = {ref: name for name, ref in calls.items()}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending, results = list(names), {}
    while pending:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        if not ready:
            stuck = ", ".join(names[ref] for ref in pending)
            raise ActorCallError(names[pending[0]], what, f"no answer within {timeout_s:g} s (still waiting for: "
                                 f"{stuck})", timed_out=True)
        for ref in ready:
            try:
                results[names[ref]] = ray.get(ref)
            except RayError as err:
                raise ActorCallError(names[ref], what, short_error(err)) from err
    return results


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """One actor's answer to a ping."""

    name: str
    alive: bool
    """Answered in time."""
    dead: bool
    """The actor is dead or restarting (a Ray actor error), as opposed to merely slow."""
    latency_s: float
    error: str | None = None


def ping(actors: Mapping[str, Any], *, timeout_s: float) -> dict[str, Heartbeat]:
    """Ping every actor handle at once with Ray's built-in `__ray_ready__` (answers as soon as the actor's queue lets
    it; idle actors answer in milliseconds) and report each within one shared deadline."""
    start = time.monotonic()
    refs = {}
    for name, actor in actors.items():
        refs[actor.__ray_ready__.remote()] = name
    out: dict[str, Heartbeat] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, start + timeout_s - time.monotonic()))
        if not ready:
            break
        for ref in ready:
            name, latency = refs[ref], time.monotonic() - start
            try:
                ray.get(ref)
                out[name] = Heartbeat(name=name, alive=True, dead=False, latency_s=latency)
            except RayError as err:
                out[name] = Heartbeat(name=name, alive=False, dead=True, latency_s=latency, error=short_error(err))
    for ref in pending:  # left to finish on its own: cancelling a queued call on a busy actor buys nothing
        out[refs[ref]] = Heartbeat(name=refs[ref], alive=False, dead=False, latency_s=timeout_s,
                                   error=f"no answer to a heartbeat within {timeout_s:g} s")
    return out


class FaultCounters:
    """Per-step `fault/*` metrics from the cumulative counts the handles keep (counts only grow)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def step_metrics(self, totals: Mapping[str, int]) -> dict[str, float]:
        """This step's increase of every count, plus `fault/restarts_total` (all restarts so far in this process)."""
        out = {key: float(value - self._last.get(key, 0)) for key, value in totals.items()}
        self._last = dict(totals)
        out["fault/restarts_total"] = float(sum(v for k, v in totals.items() if k.endswith("_restarts")))
        return out
