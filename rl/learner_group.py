"""`LearnerGroup`: the driver-side handle over the DeepSpeed learner actors (one per rank).

It starts the actors, rendezvouses them into one torch.distributed group (rank 0's address and a free port), shards
each `TrainBatch` over the ranks with equal micro-batch counts (ZeRO's collectives need every rank to run the same
number of passes), computes the global loss denominator, and gathers metrics.

Failures (rl/health.py): every call goes through `rl.health.wait_all`, so a rank that dies fails the call at once and
a rank that does not answer within `call_timeout_s` (`cluster.learner_timeout_s`) fails it at the deadline, both with
`LearnerFailedError`, instead of the driver waiting on survivors that are blocked in a collective. Learner ranks are
not restarted in place (a new rank cannot join the old process group); the run resumes from its last checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from rl.config import AlgorithmConfig, LearnerConfig
from rl.health import ActorCallError, ping, wait_all
from rl.losses import loss_denominator
from rl.types import TrainBatch


class LearnerFailedError(ActorCallError):
    """A learner rank died, raised, or missed its deadline; the step cannot complete (the ranks share one group)."""

    def __init__(self, name: str, what: str, cause: str, *, timed_out: bool = False) -> None:
        super().__init__(name, what, cause, timed_out=timed_out)
        hint = ("Raise cluster.learner_timeout_s if the step is merely slow; otherwise " if timed_out else "")
        self.args = (f"{self.args[0]}. The learner ranks share one torch.distributed group and cannot go on without "
                     f"this rank, so the run stops here. {hint}Submit the same command again: with run.resume=auto "
                     "it resumes from the last checkpoint.",)


def shard_bounds(num_sequences: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [lo, hi) slices of the batch per rank."""
    base, extra = divmod(num_sequences, world_size)
    bounds, lo = [], 0
    for rank in range(world_size):
        hi = lo + base + (1 if rank < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def slice_batch(batch: TrainBatch, lo: int, hi: int) -> TrainBatch:
    return batch.rows(lo, hi)


class LearnerGroup:
    """Ray actors running `rl.learner.Learner`, one per rank."""

    def __init__(self, *, model_path: str, learner_cfg: LearnerConfig, algorithm_cfg: AlgorithmConfig, dtype: str,
                 temperature: float, seed: int, max_completion_length: int, colocate: bool,
                 call_timeout_s: float | None = None, actor_options: Sequence[Mapping[str, Any]] | None = None) -> None:
        """`call_timeout_s`: deadline of every call to the ranks (None = none; a dead rank still fails at once).
        `actor_options`: one mapping of Ray actor options per rank overriding the default resources below, e.g. the
        `num_cpus`/`num_gpus`/`scheduling_strategy` of its placement-group bundle (`rl.placement_groups`)."""
        from rl.learner import Learner  # deepspeed is imported by the actors' module; keep it lazy on the driver

        self.cfg, self.algo = learner_cfg, algorithm_cfg
        self.call_timeout_s = call_timeout_s
        self.max_completion_length = max_completion_length
        world = learner_cfg.num_ranks
        gpu = torch.cuda.is_available() or bool(ray.cluster_resources().get("GPU"))
        # Defaults without placement options (the Trainer passes a bundle share instead, rl/placement.py): colocated
        # actors reserve no CPU so rollout, reward and learner actors all fit; torch threads are split between ranks.
        num_cpus = 0 if colocate else 1
        num_gpus = (1.0 / max(world, 1) if colocate else 1) if gpu else 0
        threads = max(1, (os.cpu_count() or 1) // world)
        per_rank = list(actor_options) if actor_options is not None else [{}] * world
        if len(per_rank) != world:
            raise ValueError(f"{len(per_rank)} actor_options for {world} learner ranks; pass one per rank.")
        actor_cls = ray.remote(Learner)
        self.actors = [
            actor_cls.options(**{"num_cpus": num_cpus, "num_gpus": num_gpus, **per_rank[rank]}).remote(
                model_path=model_path, learner_cfg=learner_cfg, algorithm_cfg=algorithm_cfg, dtype=dtype,
                temperature=temperature, rank=rank, world_size=world, seed=seed,
                max_completion_length=max_completion_length, num_threads=threads)
            for rank in range(world)
        ]
        try:
            master_addr, master_port = self._gather({0: self.actors[0].address.remote()}, "start-up")[0]
            self._gather({rank: a.setup.remote(master_addr, master_port) for rank, a in enumerate(self.actors)},
                         "setup")
        except BaseException:
            self.shutdown()  # the surviving ranks may be blocked in the rendezvous: never leave them behind
            raise

    def _gather(self, calls: dict[int, ray.ObjectRef], what: str) -> list[Any]:
        """Results in rank order; `LearnerFailedError` on the first dead/raising rank or at the deadline."""
        try:
            results = wait_all({f"learner rank {rank}": ref for rank, ref in calls.items()}, what=what,
                               timeout_s=self.call_timeout_s)
        except ActorCallError as err:
            raise LearnerFailedError(err.name, err.what, err.cause, timed_out=err.timed_out) from err
        return [results[f"learner rank {rank}"] for rank in sorted(calls)]

    def heartbeat(self, timeout_s: float) -> float:
        """Ping every rank; returns the slowest answer's latency. `LearnerFailedError` if a rank is dead or silent."""
        beats = ping({f"learner rank {rank}": actor for rank, actor in enumerate(self.actors)}, timeout_s=timeout_s)
        for beat in beats.values():
            if not beat.alive:
                raise LearnerFailedError(beat.name, "a heartbeat", beat.error or "no answer", timed_out=not beat.dead)
        return max((beat.latency_s for beat in beats.values()), default=0.0)

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def train(self, batch: TrainBatch, *, entropy_coef: float, kl_coef: float | None = None) -> dict[str, float]:
        """One optimiser step over the whole batch; loss metrics are summed over ranks (they share one denominator).
        `kl_coef` overrides algorithm.kl_coef for this step (None = keep it)."""
        max_len = self.algo.dr_grpo_max_tokens or self.max_completion_length
        if batch.level_positions_BL is not None:  # HEPO: hepo_loss divides by the number of candidates
            denominator = float(max(int((batch.loss_mask_BT.sum(-1) > 0).sum()), 1))
        else:
            denominator = float(loss_denominator(batch.loss_mask_BT, aggregation=self.algo.aggregation,
                                                 max_completion_length=max_len))
        bounds = shard_bounds(batch.num_sequences, self.world_size)
        num_micro = max(1, max(math.ceil((hi - lo) / self.cfg.micro_batch_size) for lo, hi in bounds))
        futures = [
            actor.train.remote(slice_batch(batch, lo, hi) if hi > lo else slice_batch(batch, 0, 1),
                               loss_denominator=denominator, num_micro_batches=num_micro, entropy_coef=entropy_coef,
                               kl_coef=kl_coef)
            for actor, (lo, hi) in zip(self.actors, bounds, strict=True)
        ]
        # A rank given no sequences trains on a zero-mask copy (see `micro_batches`); it adds nothing to the loss.
        per_rank = self._gather(dict(enumerate(futures)), "train")
        return _reduce_metrics(per_rank, batch)

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Current policy log-probs (B, T) of every token of `batch`, each rank computing its shard."""
        bounds = shard_bounds(batch.num_sequences, self.world_size)
        pairs = enumerate(zip(self.actors, bounds, strict=True))
        parts = self._gather({rank: a.logprobs.remote(slice_batch(batch, lo, hi)) for rank, (a, (lo, hi)) in pairs
                              if hi > lo}, "logprobs")
        return torch.cat(parts, dim=0)

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """HEPO: the value head's V(s_l) (B, L) at `batch.level_positions_BL`, each rank computing its shard."""
        bounds = shard_bounds(batch.num_sequences, self.world_size)
        pairs = enumerate(zip(self.actors, bounds, strict=True))
        parts = self._gather({rank: a.values.remote(slice_batch(batch, lo, hi)) for rank, (a, (lo, hi)) in pairs
                              if hi > lo}, "values")
        return torch.cat(parts, dim=0)

    def export_weights(self, directory: str) -> dict[str, float]:
        return self._gather(self._all(lambda a: a.export_weights.remote(directory)), "weight export")[0]

    def weight_group_address(self) -> tuple[str, int, str]:
        """Rank 0's address, a free port and device type for the broadcast transport's weight group."""
        return tuple(self._gather({0: self.actors[0].weight_group_address.remote()}, "weight group address")[0])

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        """Rank 0 joins the weight group (blocks until every vLLM worker has joined too)."""
        self._gather({0: self.actors[0].join_weight_group.remote(host, port, world_size, backend, timeout_s)},
                     "weight group join")

    def broadcast_weights(self, policy_version: int, bucket_bytes: int) -> dict[str, float]:
        """Every rank enters (ZeRO-3 gathers collectively); rank 0 broadcasts to the weight group."""
        call = lambda a: a.broadcast_weights.remote(policy_version, bucket_bytes)  # noqa: E731
        return self._gather(self._all(call), "weight broadcast")[0]

    def leave_weight_group(self) -> None:
        self._gather({0: self.actors[0].leave_weight_group.remote()}, "weight group leave")

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self._gather(self._all(lambda a: a.save_checkpoint.remote(directory, tag)), "checkpoint save")

    def load_checkpoint(self, directory: str, tag: str) -> None:
        self._gather(self._all(lambda a: a.load_checkpoint.remote(directory, tag)), "checkpoint load")

    def greedy(self, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
        return self._gather({0: self.actors[0].greedy.remote(prompt_token_ids, max_new_tokens)}, "greedy")[0]

    def _all(self, call: Any) -> dict[int, ray.ObjectRef]:
        return {rank: call(actor) for rank, actor in enumerate(self.actors)}

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _reduce_metrics(per_rank: list[dict[str, float]], batch: TrainBatch) -> dict[str, float]:
    from rl.learner import merge_metrics

    out = merge_metrics(per_rank)
    tokens = max(out.get("rollout/num_loss_tokens", 0.0), 1.0)
    out["rollout/logprob_mismatch_mean"] = out.pop("rollout/logprob_mismatch_sum", 0.0) / tokens
    out["actor/entropy"] = out.pop("actor/entropy_sum", 0.0) / tokens
    if "critic/num_values_sum" in out:  # HEPO's value head
        num_values = max(out.pop("critic/num_values_sum"), 1.0)
        out["critic/value_mean"] = out.pop("critic/value_sum") / num_values
        out["critic/abs_error"] = out.pop("critic/abs_error_sum") / num_values
    out["timing/train_rank"] = max(m.get("timing/train_rank", 0.0) for m in per_rank)
    return out
