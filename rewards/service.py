"""The reward service: a pool of Ray actors per reward, micro-batched calls, timeouts, retries and a result cache.

Driver-side use (the runtime calls this once per step; Ray must already be initialised by the caller):

    service = RewardService(cfg.reward)     # resolves every reward, starts its actors, checks they can import it
    report = service.score(rollouts)        # ScoreReport: .scored (input order, dropped groups left out),
                                            #              .dropped_group_ids, .metrics (reward/<name>, ...)
    service.shutdown()

Per reward (`RewardSpec`): `num_actors` actors, each reserving `num_cpus`/`num_gpus` and running up to
`max_concurrency` calls at once (async rewards overlap inside one actor; sync ones each get a thread). Rollouts are
cut into micro-batches of `batch_size`, whole groups kept together where they fit. Each call has `timeout_s`; calls
that fail transiently (the actor died, the reward raised `TransientRewardError`/`ConnectionError`) are retried up to
`max_retries` times; timeouts and plugin bugs are not retried. An actor whose sync call timed out keeps a thread
running, so it is replaced by a fresh one after the step. A dead actor is restarted by Ray (`max_restarts`) and the
calls it had in flight are re-issued once it answers again (one death counts once, however many calls it held); an
actor that dies more than `max_restarts` times stops the step with a `RewardError`. Restarts, re-issued calls and
replacements are logged and counted (`fault_counts()`), and `heartbeat()` checks every actor between steps.
Results of deterministic rewards are cached on the driver by (reward, sample id, completion hash). Failure policies,
combiners and metrics are `rewards.local.assemble_report`, shared with the no-Ray `LocalRewardScorer`, so
`recforge reward test` behaves like a training step.

This is the only module under rewards/ that imports ray.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayError,
)

from rewards.api import RewardError
from rewards.local import (
    BatchOutcome,
    PreparedReward,
    RewardRun,
    RewardRunner,
    ScoreReport,
    assemble_report,
    check_unique_ids,
    failed_outcome,
    make_batches,
    prepare_rewards,
)
from rl.config import RewardConfig
from rl.health import ping
from rl.types import RewardResult, Rollout

__all__ = ["RewardService", "ScoreReport"]

logger = logging.getLogger(__name__)

GRACE_S = 30.0
"""The driver gives up on a call `timeout_s + GRACE_S` after sending it (the actor enforces `timeout_s` itself; this
catches an actor too stuck to answer, e.g. a plugin holding the GIL in C code)."""

_RemoteRunner = ray.remote(RewardRunner)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _short(err: BaseException, limit: int = 600) -> str:
    text = " ".join(_ANSI.sub("", str(err)).split())
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:]


def _root_cause(err: BaseException) -> str:
    """The last line of a Ray error's remote traceback: the exception the actor raised, e.g. its import error."""
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return lines[-1] if lines else repr(err)


class _Pool:
    """The actors of one reward; each call goes to the least busy actor."""

    def __init__(self, p: PreparedReward, *, max_restarts: int, actor_options: Mapping[str, Any],
                 slot_options: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.prepared = p
        self.max_restarts = max_restarts
        self.capacity = p.spec.num_actors * p.spec.max_concurrency
        self._options = {"num_cpus": p.spec.num_cpus, "num_gpus": p.spec.num_gpus,
                         "max_concurrency": p.spec.max_concurrency, "max_restarts": max_restarts,
                         "max_task_retries": 0, **actor_options}  # retries are ours: counted, and never after a timeout
        self._slot_options = list(slot_options) if slot_options is not None else [{}] * p.spec.num_actors
        if len(self._slot_options) != p.spec.num_actors:
            raise ValueError(f"Reward '{p.key}': {len(self._slot_options)} slot options for {p.spec.num_actors} "
                             "actors; pass one per actor.")
        self.actors = [self._start(slot) for slot in range(p.spec.num_actors)]
        self.busy = [0] * len(self.actors)
        self.to_replace: set[int] = set()
        self.failures = [0] * len(self.actors)
        """Deaths of the actor in each slot (checked against max_restarts)."""
        self.recovered_at = [0.0] * len(self.actors)
        """When each slot last came back from a death: calls sent before it failed with that same death."""
        self.replacements = 0

    def _start(self, slot: int) -> Any:
        """A fresh actor for `slot`, with that slot's options: a replacement lands in the same placement bundle."""
        p = self.prepared
        options = {**self._options, **self._slot_options[slot]}
        return _RemoteRunner.options(**options).remote(p.key, p.info.target, p.spec.kwargs, timeout_s=p.spec.timeout_s)

    def submit(self, rollouts: list[Rollout]) -> tuple[ray.ObjectRef, int]:
        slot = min(range(len(self.actors)), key=self.busy.__getitem__)
        self.busy[slot] += 1
        return self.actors[slot].score.remote(rollouts), slot

    def recover(self, slot: int, timeout_s: float, *, sent_at: float | None = None) -> None:
        """Block until the actor in `slot` answers again after a failure: Ray restarts a dead actor (max_restarts) and
        calls sent while it restarts fail at once, so a retry must wait. An actor gone for good is replaced, once.

        `sent_at`: when the failed call was sent; a call sent before the slot's last recovery died with a death that
        was already counted and waited for. More than `max_restarts` deaths of one slot raise `RewardError`."""
        if sent_at is not None and sent_at < self.recovered_at[slot]:
            return
        key = self.prepared.key
        self.failures[slot] += 1
        if self.failures[slot] > self.max_restarts:
            raise RewardError(key, f"its reward actor {slot} died {self.failures[slot]} times, more than "
                              f"cluster.max_restarts={self.max_restarts}; the run stops rather than restart it again.",
                              hint="Check the actor's log (an OOM kill shows as SIGKILL) or raise "
                                   "cluster.max_restarts.")
        logger.warning("Reward '%s': actor %d died; waiting for its restart (%d/%d).", key, slot, self.failures[slot],
                       self.max_restarts)
        deadline, replaced = time.monotonic() + timeout_s, False
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[slot].ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
                self.recovered_at[slot] = time.monotonic()
                logger.warning("Reward '%s': actor %d is back.", key, slot)
                return
            except ActorDiedError:
                if replaced:
                    return  # a fresh actor died too: let the retried call report why
                logger.warning("Reward '%s': actor %d is gone for good; starting a fresh one.", self.prepared.key, slot)
                self.actors[slot], replaced = self._start(slot), True
            except (ActorUnavailableError, GetTimeoutError):
                time.sleep(0.5)

    def replace_marked(self) -> None:
        for slot in sorted(self.to_replace):
            logger.warning("Reward '%s': replacing actor %d after a timed-out call (its thread may still run).",
                           self.prepared.key, slot)
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._start(slot)
            self.replacements += 1
        self.to_replace.clear()

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@dataclass(kw_only=True)
class _Call:
    key: str
    indices: list[int]
    attempt: int = 1
    slot: int = -1
    deadline: float = 0.0
    sent_at: float = 0.0


class RewardService:
    """Scores rollouts with Ray reward actors; see the module docstring.

    cfg: the recipe's `reward` section. max_restarts: restarts of a dead reward actor (`cluster.max_restarts`).
    actor_options: extra `ray.remote` options for every reward actor, e.g. a placement-group `scheduling_strategy`
    or a `runtime_env`. slot_options: per reward key (alias or name), one mapping of Ray options per actor that
    overrides the above, e.g. the `num_cpus`/`num_gpus`/`scheduling_strategy` of its placement-group bundle
    (`rl.placement_groups.PlacementGroups.reward_options()`); restarted and replacement actors keep their slot's.
    start_timeout_s: how long to wait for the actors to start and import their reward.
    """

    def __init__(self, cfg: RewardConfig, *, max_restarts: int = 3, actor_options: Mapping[str, Any] | None = None,
                 slot_options: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 start_timeout_s: float = 300.0) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RewardService needs a running Ray: call ray.init(...) first (the recipe's driver "
                               "does). To score without Ray, use rewards.local.LocalRewardScorer.")
        self.cfg = cfg
        self.prepared = prepare_rewards(cfg)
        self._start_timeout_s = start_timeout_s
        for p in self.prepared:
            module = p.info.target.split(":", 1)[0]
            if "<locals>" in p.info.target or module == "__main__":
                raise RewardError(p.key, f"{p.info.target} is defined in a function or in the __main__ script, so "
                                  "Ray reward actors cannot import it.", hint="Move it to an importable module.")
        self._pools: dict[str, _Pool] = {}
        self._reissued = 0
        self._cache: collections.OrderedDict[tuple[str, str, str], RewardResult] = collections.OrderedDict()
        try:
            for p in self.prepared:
                self._pools[p.key] = _Pool(p, max_restarts=max_restarts, actor_options=actor_options or {},
                                           slot_options=(slot_options or {}).get(p.key))
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    @property
    def reward_names(self) -> list[str]:
        return [p.key for p in self.prepared]

    def fault_counts(self) -> dict[str, int]:
        """Cumulative counts since start: actor deaths recovered from, calls re-issued after one, and actors replaced
        after a stuck (timed-out) call."""
        return {"fault/reward_restarts": sum(sum(pool.failures) for pool in self._pools.values()),
                "fault/reissued_reward_calls": self._reissued,
                "fault/reward_replacements": sum(pool.replacements for pool in self._pools.values())}

    def heartbeat(self, timeout_s: float) -> float:
        """Ping every reward actor between steps; returns the slowest answer's latency. A dead actor is waited for
        (Ray restarts it; counts against max_restarts), one that does not answer in time is replaced."""
        actors = {f"{key}/{slot}": actor for key, pool in self._pools.items() for slot, actor in enumerate(pool.actors)}
        beats = ping(actors, timeout_s=timeout_s)
        for name, beat in beats.items():
            if beat.alive:
                continue
            key, slot = name.rsplit("/", 1)
            pool = self._pools[key]
            logger.warning("Reward '%s': actor %s failed its heartbeat (%s).", key, slot, beat.error)
            if beat.dead:
                pool.recover(int(slot), self._start_timeout_s)
            else:
                pool.to_replace.add(int(slot))
        for pool in self._pools.values():
            pool.replace_marked()
        return max((beat.latency_s for beat in beats.values()), default=0.0)

    def _wait_ready(self, timeout_s: float) -> None:
        refs = {actor.ready.remote(): key for key, pool in self._pools.items() for actor in pool.actors}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except RayError as err:
                raise RewardError(refs[ref], f"its reward actor could not start: {_root_cause(err)}") from err
        if pending:
            spec = self._pools[refs[pending[0]]].prepared.spec
            raise RewardError(refs[pending[0]], f"its reward actors did not start within {timeout_s:g} s.",
                              hint=f"The cluster may lack the resources they ask for (num_cpus={spec.num_cpus}, "
                                   f"num_gpus={spec.num_gpus}, num_actors={spec.num_actors}).")

    def score(self, rollouts: Sequence[Rollout]) -> ScoreReport:
        """Score every rollout with every reward and combine; raises RewardError under failure_policy "fail"."""
        start = time.perf_counter()
        rollouts = list(rollouts)
        check_unique_ids(rollouts)
        run = RewardRun.empty(self.reward_names, len(rollouts))
        queues: dict[str, collections.deque[_Call]] = {}
        for p in self.prepared:
            todo = self._from_cache(p, rollouts, run)
            batches = make_batches([rollouts[i] for i in todo], p.spec.batch_size)
            queues[p.key] = collections.deque(_Call(key=p.key, indices=[todo[j] for j in b]) for b in batches)
            self._pools[p.key].busy = [0] * len(self._pools[p.key].actors)
        in_flight: dict[ray.ObjectRef, _Call] = {}
        while in_flight or any(queues.values()):
            self._submit(queues, in_flight, rollouts)
            self._collect(in_flight, queues, run, rollouts)
        for pool in self._pools.values():
            pool.replace_marked()
        self._store(rollouts, run)
        return assemble_report(rollouts, self.prepared, run, combiner=self.cfg.combiner,
                               elapsed_s=time.perf_counter() - start)

    def _submit(self, queues: dict[str, collections.deque[_Call]], in_flight: dict[ray.ObjectRef, _Call],
                rollouts: list[Rollout]) -> None:
        """Send queued calls while each pool has free slots (the concurrency limit: num_actors × max_concurrency)."""
        for key, queue in queues.items():
            pool = self._pools[key]
            while queue and sum(pool.busy) < pool.capacity:
                call = queue.popleft()
                ref, call.slot = pool.submit([rollouts[i] for i in call.indices])
                call.sent_at = time.monotonic()
                call.deadline = call.sent_at + pool.prepared.spec.timeout_s + GRACE_S
                in_flight[ref] = call

    def _collect(self, in_flight: dict[ray.ObjectRef, _Call], queues: dict[str, collections.deque[_Call]],
                 run: RewardRun, rollouts: list[Rollout]) -> None:
        """Wait for the next finished call (or the nearest driver deadline) and record or retry it."""
        wait_s = max(0.0, min(c.deadline for c in in_flight.values()) - time.monotonic())
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
        for ref in ready:
            call = in_flight.pop(ref)
            pool = self._pools[call.key]
            pool.busy[call.slot] -= 1
            outcome, actor_failed = self._outcome(ref, len(call.indices))
            if actor_failed:
                pool.recover(call.slot, self._start_timeout_s, sent_at=call.sent_at)
            self._settle(call, outcome, queues, run, actor_failed=actor_failed)
        now = time.monotonic()
        for ref, call in list(in_flight.items()):
            if call.deadline <= now:
                del in_flight[ref]
                ray.cancel(ref)
                pool = self._pools[call.key]
                pool.busy[call.slot] -= 1
                pool.to_replace.add(call.slot)
                cause = (f"no answer from its reward actor within timeout_s + {GRACE_S:g} s "
                         f"({pool.prepared.spec.timeout_s + GRACE_S:g} s); the actor seems stuck")
                self._settle(call, failed_outcome(len(call.indices), cause, pool.prepared.spec.timeout_s + GRACE_S,
                                                  timed_out=True),
                             queues, run)

    @staticmethod
    def _outcome(ref: ray.ObjectRef, num: int) -> tuple[BatchOutcome, bool]:
        """The call's outcome, and whether its actor failed (died, restarting, unreachable)."""
        try:
            return ray.get(ref), False
        except (RayActorError, ObjectLostError) as err:
            cause = f"its reward actor died or became unreachable: {_short(err)}"
            return failed_outcome(num, cause, 0.0, transient=True), isinstance(err, RayActorError)
        except RayError as err:
            return failed_outcome(num, f"the Ray call failed: {_short(err)}", 0.0), False

    def _settle(self, call: _Call, outcome: BatchOutcome, queues: dict[str, collections.deque[_Call]],
                run: RewardRun, *, actor_failed: bool = False) -> None:
        pool = self._pools[call.key]
        if outcome.timed_out and not pool.prepared.info.is_async:
            pool.to_replace.add(call.slot)  # its daemon thread may still be running the plugin
        if outcome.transient and call.attempt <= pool.prepared.spec.max_retries:
            if actor_failed:
                self._reissued += 1
                logger.warning("Reward '%s': re-issuing a call of %d rollouts that its dead actor held (re-issue %d "
                               "in this run).", call.key, len(call.indices), self._reissued)
            logger.warning("Reward '%s': %s; retrying (%d/%d).", call.key, outcome.errors[0], call.attempt,
                           pool.prepared.spec.max_retries)
            queues[call.key].appendleft(_Call(key=call.key, indices=call.indices, attempt=call.attempt + 1))
            return
        run.record(call.key, call.indices, outcome, attempts=call.attempt)

    # -----------------------------------------------------------------------------------------------------------------
    # Cache of deterministic rewards: (reward key, sample id, completion hash) → RewardResult, LRU.

    def _cache_on(self, p: PreparedReward) -> bool:
        return p.deterministic and self.cfg.cache_size > 0

    def _from_cache(self, p: PreparedReward, rollouts: list[Rollout], run: RewardRun) -> list[int]:
        """Fill cached results into `run`; return the indices still to compute."""
        if not self._cache_on(p):
            return list(range(len(rollouts)))
        todo = []
        for i, r in enumerate(rollouts):
            key = (p.key, r.sample.sample_id, r.completion_hash)
            if key in self._cache:
                self._cache.move_to_end(key)
                run.results[p.key][i] = self._cache[key]
                run.cache_hits += 1
            else:
                todo.append(i)
        return todo

    def _store(self, rollouts: list[Rollout], run: RewardRun) -> None:
        for p in self.prepared:
            if not self._cache_on(p):
                continue
            for i, result in enumerate(run.results[p.key]):
                if result is not None:
                    self._cache[(p.key, rollouts[i].sample.sample_id, rollouts[i].completion_hash)] = result
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)

    def shutdown(self) -> None:
        """Kill every reward actor (idempotent)."""
        for pool in self._pools.values():
            pool.kill()
        self._pools.clear()

    def __enter__(self) -> RewardService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
