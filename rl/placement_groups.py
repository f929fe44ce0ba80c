"""`PlacementGroups`: the driver-side handle that reserves a `rl.placement.PlacementPlan` with Ray.

    groups = PlacementGroups(plan_placement(cfg, gpu=cluster_has_gpu()), timeout_s=cfg.cluster.placement_timeout_s,
                             colocate=cfg.cluster.colocate, fixed_cluster=cfg.cluster.address is None)
    pool = RolloutPool(..., actor_options=groups.actor_options(groups.plan.rollout))
    service = RewardService(..., slot_options=groups.reward_options())
    ...
    groups.remove()                                   # after the actors are gone (Trainer.close)

On a local Ray instance (`fixed_cluster`), a plan that can never fit (more than the cluster's total of a resource,
a bundle or STRICT_PACK group bigger than every node) fails at once. Otherwise it waits up to `timeout_s` for every
group to be reserved (other jobs may hold resources, an autoscaler may add nodes), then fails. The `PlacementError`
names the groups asked for (bundles, strategy, the config keys that size them), the cluster's total and free CPUs
and GPUs, and what to change. Nothing stays reserved after a failure.

Each actor's options pin it to its bundle (`PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)`)
with its share of the bundle as `num_cpus`/`num_gpus`. Ray restarts an actor with the same options, so a restarted
actor lands in the same bundle. The groups share the driver's lifetime (Ray removes them if the driver dies).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.placement import ActorSlot, PlacementPlan, describe_group, placement_error, shortfall

log = logging.getLogger(__name__)


def cluster_has_gpu() -> bool:
    return bool(ray.cluster_resources().get("GPU"))


def _largest_node() -> dict[str, float]:
    """Per resource, the most any single alive node has (an upper bound of what one bundle can get)."""
    largest: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in node.get("Resources", {}).items():
                largest[name] = max(largest.get(name, 0.0), amount)
    return largest


class PlacementGroups:
    """The reserved groups of one plan; `actor_options` pins actors to their bundles, `remove` frees everything."""

    def __init__(self, plan: PlacementPlan, *, timeout_s: float, colocate: bool, fixed_cluster: bool) -> None:
        """`fixed_cluster`: no node can join (a local Ray instance), so a plan bigger than the cluster fails at once
        instead of after `timeout_s` (an autoscaling cluster may still grow to fit it)."""
        self.plan = plan
        self._colocate = colocate
        self.groups: dict[str, PlacementGroup] = {}
        problems = shortfall(plan, ray.cluster_resources(), _largest_node())
        if problems and fixed_cluster:
            raise self._error("; ".join(problems))
        try:
            self._reserve(timeout_s)
        except BaseException:
            self.remove()  # nothing stays reserved after a failure (or a Ctrl-C while waiting)
            raise

    def _reserve(self, timeout_s: float) -> None:
        run_id = uuid.uuid4().hex[:8]
        for group in self.plan.groups:
            self.groups[group.name] = placement_group(list(map(dict, group.bundles)), strategy=group.strategy,
                                                      name=f"recforge-{group.name}-{run_id}")
        start = time.monotonic()
        refs = {pg.ready(): name for name, pg in self.groups.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            never = shortfall(self.plan, ray.cluster_resources(), _largest_node())
            why = f"; they can never fit its nodes: {'; '.join(never)}" if never else (
                "; the cluster lacks the free resources (other jobs hold them?), or a strategy cannot be met")
            raise self._error(f"placement group(s) {', '.join(refs[ref] for ref in pending)} were not reserved "
                              f"within {timeout_s:g} s (cluster.placement_timeout_s){why}")
        ray.get(ready)
        log.info("Placement groups reserved in %.1f s: %s", time.monotonic() - start,
                 "; ".join(describe_group(group) for group in self.plan.groups))

    def _error(self, problem: str) -> Exception:
        return placement_error(self.plan, problem=problem, available=ray.available_resources(),
                               total=ray.cluster_resources(), colocate=self._colocate)

    def actor_options(self, slots: Sequence[ActorSlot]) -> list[dict[str, Any]]:
        """Ray actor options (`num_cpus`, `num_gpus`, `scheduling_strategy`), one dict per slot, in slot order."""
        options = []
        for slot in slots:
            option: dict[str, Any] = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus}
            if slot.group is not None:
                option["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.groups[slot.group], placement_group_bundle_index=slot.bundle_index)
            options.append(option)
        return options

    def reward_options(self) -> dict[str, list[dict[str, Any]]]:
        """`actor_options` of every reward's actors, keyed by reward key (for `RewardService(slot_options=...)`)."""
        return {key: self.actor_options(slots) for key, slots in self.plan.rewards.items()}

    def remove(self) -> None:
        """Free every group (idempotent). Actors still in a group are killed by Ray, so remove after shutdown."""
        for name, pg in list(self.groups.items()):
            try:
                remove_placement_group(pg)
            except Exception as err:  # noqa: BLE001 - Ray already gone at interpreter exit: nothing left to free
                log.debug("removing placement group %s: %s", name, err)
        self.groups.clear()
