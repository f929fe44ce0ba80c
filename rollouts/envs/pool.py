"""`EnvPool`: GUI environments in Ray actors behind one typed driver-side handle.

    pool = EnvPool(4, MiniWoBConfig(tasks=("click-button", "enter-text")), seed=0)
    observations = pool.reset([0, 1], ["click-button", "enter-text"], seeds=[11, 12])
    results = pool.step([0, 1], [completion_0, completion_1])     # StepResult per env, in the given order
    pool.close()

Each actor runs an `EnvWorker`, a plain class that tests (and single-process debug runs) use without Ray. The calls of
one `reset`/`step` run concurrently on their actors and share one deadline, `call_timeout_s`.

Fault tolerance: an actor that dies or misses the deadline is killed and replaced by a fresh one (its browser is
reaped by the next browser start on that host, see rollouts.envs.miniwob). A `step` on it returns a failed final
step (`done=True`, reward 0, `info["env_error"]`), so the trajectory ends instead of hanging; a `reset` on it is
retried once on the replacement. A slot replaced more than `max_restarts` times raises `EnvPoolError`. Errors the
environment raises on purpose (`EnvUsageError`: step after done, unknown task) reach the caller unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rollouts.envs.base import Environment, EnvStartError, EnvUsageError, Observation, StepResult
from rollouts.envs.miniwob import MiniWoBConfig, MiniWoBEnv

log = logging.getLogger(__name__)

EnvFactory = Callable[[int, int], Environment]
"""(env index, seed) -> an Environment; the default builds a MiniWoBEnv from the pool's config."""


class EnvPoolError(RuntimeError):
    """An environment slot failed more often than `max_restarts` allows, or its reset failed on a fresh actor."""


class EnvWorker:
    """One environment, as each pool actor holds it. A plain class: usable directly without Ray."""

    def __init__(self, env_cfg: MiniWoBConfig | None, *, index: int, seed: int,
                 make_env: EnvFactory | None = None) -> None:
        self.index = index
        self.env: Environment = (make_env(index, seed) if make_env is not None
                                 else MiniWoBEnv(env_cfg, seed=seed, name=f"env{index}"))

    def ready(self) -> int:
        """The worker's process id, once the environment is constructed."""
        return os.getpid()

    def reset(self, task: str, seed: int | None) -> Observation:
        return self.env.reset(task, seed)

    def step(self, action_text: str) -> StepResult:
        return self.env.step(action_text)

    def close(self) -> None:
        self.env.close()


@dataclasses.dataclass(kw_only=True)
class _Slot:
    actor: Any
    restarts: int = 0
    last_obs: Observation | None = None
    task: str = ""


class EnvPool:
    """`num_envs` EnvWorker actors. Env ids are 0..num_envs-1; see the module docstring for failure handling.

    seed: env i draws its episode seeds (for `reset(..., seeds=[None])`) from seed + i. num_cpus_per_env: Ray CPU
    reservation of each actor (Chromium itself needs about half a core while acting). actor_options: extra
    `ray.remote` options, e.g. a placement-group scheduling strategy. make_env: build something other than MiniWoBEnv
    (must be importable by the workers).
    """

    def __init__(self, num_envs: int, env_cfg: MiniWoBConfig | None = None, *, seed: int = 0,
                 call_timeout_s: float = 60.0, max_restarts: int = 3, num_cpus_per_env: float = 0.25,
                 actor_options: Mapping[str, Any] | None = None, make_env: EnvFactory | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"EnvPool(num_envs={num_envs}): need at least one environment.")
        if call_timeout_s <= 0:
            raise ValueError(f"EnvPool(call_timeout_s={call_timeout_s}): the per-call timeout must be > 0 s.")
        if not ray.is_initialized():
            raise RuntimeError("EnvPool needs a running Ray: call ray.init(...) first (the recipe's driver does). "
                               "Without Ray, use EnvWorker or MiniWoBEnv directly.")
        self.env_cfg = env_cfg or MiniWoBConfig()
        self.seed = seed
        self.call_timeout_s = call_timeout_s
        self.max_restarts = max_restarts
        self._make_env = make_env
        self._actor_cls = ray.remote(EnvWorker).options(
            num_cpus=num_cpus_per_env, max_restarts=0, max_task_retries=0, **dict(actor_options or {}))
        self._slots = [_Slot(actor=self._new_actor(i)) for i in range(num_envs)]
        refs = [slot.actor.ready.remote() for slot in self._slots]
        try:
            ray.get(refs, timeout=max(call_timeout_s, 120.0))
        except GetTimeoutError as err:
            self.close()
            raise EnvPoolError(f"{num_envs} environment actor(s) did not start within {max(call_timeout_s, 120):g} "
                               "s; the cluster may lack the CPUs they ask for (num_cpus_per_env="
                               f"{num_cpus_per_env}).") from err
        except BaseException:
            self.close()
            raise
        log.info("EnvPool: %d environment actor(s) ready.", num_envs)

    @property
    def num_envs(self) -> int:
        return len(self._slots)

    def reset(self, env_ids: Sequence[int], tasks: Sequence[str], seeds: Sequence[int | None]) -> list[Observation]:
        """Start an episode on each env in `env_ids` (tasks[i], seeds[i]); observations in the same order."""
        self._check(env_ids, tasks, "tasks")
        self._check(env_ids, seeds, "seeds")
        results = self._call(env_ids, lambda actor, i: actor.reset.remote(tasks[i], seeds[i]))
        for i, (env_id, outcome) in enumerate(zip(env_ids, results, strict=True)):
            if isinstance(outcome, _Failure):  # once more on the replacement actor
                retry = self._call([env_id], lambda actor, _, t=tasks[i], s=seeds[i]: actor.reset.remote(t, s))[0]
                if isinstance(retry, _Failure):
                    raise EnvPoolError(f"Environment {env_id}: reset({tasks[i]!r}, {seeds[i]}) failed twice, on a "
                                       f"fresh actor too: {retry.message}")
                outcome = retry
            results[i] = outcome
            slot = self._slots[env_id]
            slot.last_obs, slot.task = outcome, tasks[i]
        return results

    def step(self, env_ids: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        """Send actions[i] (a model completion) to env env_ids[i]; a failed actor gives a failed final step."""
        self._check(env_ids, actions, "actions")
        for env_id in env_ids:
            if self._slots[env_id].last_obs is None:
                raise EnvUsageError(f"Environment {env_id}: step() before reset().")
        results = self._call(env_ids, lambda actor, i: actor.step.remote(actions[i]))
        out = []
        for env_id, outcome in zip(env_ids, results, strict=True):
            if isinstance(outcome, _Failure):
                outcome = self._failed_step(env_id, outcome.message)
            self._slots[env_id].last_obs = outcome.observation
            out.append(outcome)
        return out

    def close(self) -> None:
        """Close every environment (browsers included) and end the actors. Safe to call twice."""
        slots, self._slots = getattr(self, "_slots", []), []
        refs = [slot.actor.close.remote() for slot in slots]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=30.0)
        finally:
            for slot in slots:
                ray.kill(slot.actor, no_restart=True)

    # -- internals -----------------------------------------------------------------------------------------------------

    def _new_actor(self, index: int) -> Any:
        return self._actor_cls.remote(self.env_cfg, index=index, seed=self.seed + index, make_env=self._make_env)

    def _check(self, env_ids: Sequence[int], values: Sequence[Any], what: str) -> None:
        if len(values) != len(env_ids):
            raise ValueError(f"EnvPool: {len(env_ids)} env ids but {len(values)} {what}; pass one per env id.")
        if len(set(env_ids)) != len(env_ids):
            raise ValueError(f"EnvPool: env ids {list(env_ids)} repeat; an environment takes one call at a time.")
        bad = [e for e in env_ids if not 0 <= e < self.num_envs]
        if bad:
            raise ValueError(f"EnvPool: env ids {bad} out of range; this pool has envs 0..{self.num_envs - 1}.")

    def _call(self, env_ids: Sequence[int], submit: Callable[[Any, int], Any]) -> list[Any]:
        """Submit one call per env, wait until all answer or the shared deadline passes; replace failed actors."""
        refs = [submit(self._slots[env_id].actor, i) for i, env_id in enumerate(env_ids)]
        deadline = time.monotonic() + self.call_timeout_s
        ray.wait(refs, num_returns=len(refs), timeout=self.call_timeout_s)
        results: list[Any] = []
        for env_id, ref in zip(env_ids, refs, strict=True):
            try:
                results.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except (EnvUsageError, EnvStartError):
                raise
            except GetTimeoutError:
                results.append(self._replace(env_id, f"did not answer within {self.call_timeout_s:g} s"))
            except RayActorError as err:
                results.append(self._replace(env_id, f"its actor died ({type(err).__name__})"))
        return results

    def _replace(self, env_id: int, why: str) -> _Failure:
        slot = self._slots[env_id]
        slot.restarts += 1
        if slot.restarts > self.max_restarts:
            raise EnvPoolError(f"Environment {env_id}: {why}, and it was replaced {self.max_restarts} time(s) "
                               "already (max_restarts). Check the worker log: Chromium crashing, out of memory, or "
                               "too little CPU for the number of environments.")
        log.warning("EnvPool: environment %d: %s; replacing its actor (restart %d/%d).", env_id, why,
                    slot.restarts, self.max_restarts)
        ray.kill(slot.actor, no_restart=True)
        slot.actor = self._new_actor(env_id)
        return _Failure(message=f"environment {env_id}: {why}; its actor was replaced by a fresh one")

    def _failed_step(self, env_id: int, message: str) -> StepResult:
        slot = self._slots[env_id]
        obs = slot.last_obs
        assert obs is not None
        info = {
            "task": slot.task, "seed": obs.seed, "step": obs.step + 1, "action": None, "penalty": False,
            "parse_error": None, "action_error": None, "env_error": message, "success": False, "raw_reward": None,
            "reason": "environment failed", "truncated": False, "elapsed_s": 0.0,
            "milestones_reached": list(obs.milestones_reached), "num_milestones": len(obs.milestones),
            "progress": obs.progress,
        }
        return StepResult(observation=dataclasses.replace(obs, step=obs.step + 1), reward=0.0, done=True, info=info)


@dataclasses.dataclass(frozen=True)
class _Failure:
    message: str
