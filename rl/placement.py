"""Placement planning: which Ray placement-group bundles a run reserves, and which bundle each actor lands in.

DESIGN.md, "Actors and placement". `plan_placement(cfg, gpu=...)` turns the config into a `PlacementPlan`; the
driver-side handle `rl.placement_groups.PlacementGroups` reserves it with Ray and hands every actor its scheduling
options. The plan is plain data, so it is tested by hand here without Ray.

Two modes (`cluster.colocate`):

- colocate=true (single-GPU or CPU debug): one group "colocated" of ONE bundle, {CPU: cluster.colocate_num_cpus}
  plus {GPU: 1} on a GPU cluster. Every rollout worker, learner rank and reward actor sits in bundle 0 and
  reserves an equal share of its CPUs; the GPU is split in equal shares among the actors that use one (rollout
  workers, learner ranks, reward actors with num_gpus > 0). Shares are rounded DOWN to Ray's resource granularity
  (0.0001), so they always fit in the bundle. On GPU, vLLM sleeps while the learner trains (rollouts/engine.py).
- colocate=false (a cluster): group "rollout" with one bundle per rollout worker ({CPU: cluster.rollout_num_cpus,
  GPU: 1 on a GPU cluster}), group "learner" with one bundle per learner rank ({CPU: cluster.learner_num_cpus,
  GPU: 1}), and per reward a group "reward/<name>" with one bundle per reward actor ({CPU: num_cpus, GPU:
  num_gpus} of its reward.rewards entry). Each actor takes its whole bundle. A reward asking for no CPU and no GPU
  reserves nothing (Ray refuses empty bundles) and is scheduled without a group.

An actor keeps its (group, bundle) for life: Ray restarts an actor (`max_restarts`) with the same scheduling
strategy, and the reward service starts a replacement actor with the slot's options, so it lands in the same bundle.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rl.config import Config, ConfigError

RESOURCE_GRANULARITY = 1e-4
"""Ray accounts resources in units of 0.0001 (`ray_constants.MIN_RESOURCE_GRANULARITY`)."""

COLOCATED = "colocated"


class PlacementError(ConfigError):
    """The placement groups cannot be reserved: the message names what was asked, what the cluster has, and the
    config keys to change."""


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: its bundles, Ray strategy, and the config keys that size it (for error messages)."""

    name: str
    strategy: str
    bundles: tuple[Mapping[str, float], ...]
    sized_by: str


@dataclass(frozen=True)
class ActorSlot:
    """Where one actor runs: bundle `bundle_index` of group `group` (None = no group, nothing reserved), reserving
    `num_cpus` and `num_gpus` of it."""

    group: str | None
    bundle_index: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PlacementPlan:
    groups: tuple[GroupPlan, ...]
    rollout: tuple[ActorSlot, ...]
    """One slot per rollout worker, in worker order."""
    learner: tuple[ActorSlot, ...]
    """One slot per learner rank, in rank order."""
    rewards: Mapping[str, tuple[ActorSlot, ...]]
    """Per reward key (its alias, else its name): one slot per reward actor."""

    def totals(self) -> dict[str, float]:
        """Resources of all bundles together, per resource name."""
        out: dict[str, float] = {}
        for group in self.groups:
            for bundle in group.bundles:
                for name, amount in bundle.items():
                    out[name] = out.get(name, 0.0) + amount
        return out


def share(total: float, num: int) -> float:
    """`total / num` rounded down to Ray's granularity, so `num` shares never exceed `total`."""
    units = math.floor(total / RESOURCE_GRANULARITY / num + 1e-9)
    return round(units * RESOURCE_GRANULARITY, 4)


def _bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    return {name: amount for name, amount in (("CPU", num_cpus), ("GPU", num_gpus)) if amount > 0}


def plan_placement(cfg: Config, *, gpu: bool) -> PlacementPlan:
    """The bundles and actor slots of `cfg` on a cluster with (`gpu=True`) or without GPUs; see the module doc."""
    return _plan_colocated(cfg, gpu=gpu) if cfg.cluster.colocate else _plan_separate(cfg, gpu=gpu)


def _reward_keys(cfg: Config) -> list[str]:
    return [spec.alias or spec.name for spec in cfg.reward.rewards]


def _plan_colocated(cfg: Config, *, gpu: bool) -> PlacementPlan:
    cluster = cfg.cluster
    num_rollout, num_learner = cfg.rollout.num_workers, cfg.learner.num_ranks
    specs = cfg.reward.rewards
    num_actors = num_rollout + num_learner + sum(spec.num_actors for spec in specs)
    num_gpu_actors = num_rollout + num_learner + sum(spec.num_actors for spec in specs if spec.num_gpus > 0)
    cpu = share(cluster.colocate_num_cpus, num_actors)
    gpu_share = share(1.0, num_gpu_actors) if gpu else 0.0
    if cpu <= 0:
        raise PlacementError(
            f"cluster.colocate_num_cpus={cluster.colocate_num_cpus} split over {num_actors} colocated actors gives "
            f"each less than Ray's smallest unit ({RESOURCE_GRANULARITY}). Raise cluster.colocate_num_cpus.")
    group = GroupPlan(name=COLOCATED, strategy="STRICT_PACK",
                      bundles=(_bundle(cluster.colocate_num_cpus, 1.0 if gpu else 0.0),),
                      sized_by="cluster.colocate_num_cpus, plus one GPU on a GPU cluster")
    slot = ActorSlot(group=COLOCATED, bundle_index=0, num_cpus=cpu, num_gpus=gpu_share)
    no_gpu = ActorSlot(group=COLOCATED, bundle_index=0, num_cpus=cpu, num_gpus=0.0)
    rewards = {key: tuple(slot if spec.num_gpus > 0 else no_gpu for _ in range(spec.num_actors))
               for key, spec in zip(_reward_keys(cfg), specs, strict=True)}
    return PlacementPlan(groups=(group,), rollout=(slot,) * num_rollout, learner=(slot,) * num_learner,
                         rewards=rewards)


def _plan_separate(cfg: Config, *, gpu: bool) -> PlacementPlan:
    cluster = cfg.cluster
    device_gpus = 1.0 if gpu else 0.0
    groups = [
        GroupPlan(name="rollout", strategy=cluster.rollout_placement,
                  bundles=(_bundle(cluster.rollout_num_cpus, device_gpus),) * cfg.rollout.num_workers,
                  sized_by="rollout.num_workers, cluster.rollout_num_cpus"),
        GroupPlan(name="learner", strategy=cluster.learner_placement,
                  bundles=(_bundle(cluster.learner_num_cpus, device_gpus),) * cfg.learner.num_ranks,
                  sized_by="learner.num_ranks, cluster.learner_num_cpus"),
    ]
    rollout = tuple(ActorSlot("rollout", i, cluster.rollout_num_cpus, device_gpus)
                    for i in range(cfg.rollout.num_workers))
    learner = tuple(ActorSlot("learner", i, cluster.learner_num_cpus, device_gpus)
                    for i in range(cfg.learner.num_ranks))
    rewards: dict[str, tuple[ActorSlot, ...]] = {}
    for index, (key, spec) in enumerate(zip(_reward_keys(cfg), cfg.reward.rewards, strict=True)):
        bundle = _bundle(spec.num_cpus, spec.num_gpus)
        if not bundle:  # Ray refuses all-zero bundles; an actor that reserves nothing needs no group
            rewards[key] = (ActorSlot(None, -1, 0.0, 0.0),) * spec.num_actors
            continue
        name = f"reward/{key}"
        groups.append(GroupPlan(name=name, strategy=cluster.reward_placement, bundles=(bundle,) * spec.num_actors,
                                sized_by=f"reward.rewards.{index}.num_actors, .num_cpus, .num_gpus"))
        rewards[key] = tuple(ActorSlot(name, i, spec.num_cpus, spec.num_gpus) for i in range(spec.num_actors))
    return PlacementPlan(groups=tuple(groups), rollout=rollout, learner=learner, rewards=rewards)


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def describe_group(group: GroupPlan) -> str:
    """e.g. `learner: 2 x {CPU: 1, GPU: 1}, STRICT_PACK (sized by learner.num_ranks, cluster.learner_num_cpus)`."""
    kinds: dict[str, int] = {}
    for bundle in group.bundles:
        kinds[_fmt(bundle)] = kinds.get(_fmt(bundle), 0) + 1
    bundles = " + ".join(f"{count} x {text}" for text, count in kinds.items())
    return f"{group.name}: {bundles}, {group.strategy} (sized by {group.sized_by})"


def shortfall(plan: PlacementPlan, cluster_total: Mapping[str, float],
              largest_node: Mapping[str, float]) -> list[str]:
    """Reasons the plan can never fit this cluster (empty = it may fit): more of a resource than the whole cluster
    has, a bundle bigger than every node, or a STRICT_PACK group bigger than every node."""
    problems = []
    for name, amount in sorted(plan.totals().items()):
        if amount > cluster_total.get(name, 0.0) + 1e-9:
            problems.append(f"the groups need {amount:g} {name} in all, the cluster has {cluster_total.get(name, 0):g}")
    for group in plan.groups:
        strict = group.strategy == "STRICT_PACK" and len(group.bundles) > 1
        units = [group.bundles] if strict else [(bundle,) for bundle in group.bundles]
        too_big = _too_big(units, largest_node)
        if too_big is not None:
            name, need = too_big
            what = "its bundles together (STRICT_PACK: one node) need" if strict else "a bundle needs"
            problems.append(f"group {group.name}: {what} {need:g} {name}, the largest node has "
                            f"{largest_node.get(name, 0):g}")
    return problems


def _too_big(units: Sequence[Sequence[Mapping[str, float]]], node: Mapping[str, float]) -> tuple[str, float] | None:
    """The first (resource, amount) that some unit of bundles (placed together on one node) needs beyond `node`."""
    for bundles in units:
        for name in sorted({n for bundle in bundles for n in bundle}):
            need = sum(bundle.get(name, 0.0) for bundle in bundles)
            if need > node.get(name, 0.0) + 1e-9:
                return name, need
    return None


def placement_error(plan: PlacementPlan, *, problem: str, available: Mapping[str, float],
                    total: Mapping[str, float], colocate: bool) -> PlacementError:
    """The error a driver raises when the groups cannot be placed: what was asked, what there is, what to change."""
    asked = "\n".join(f"  - {describe_group(group)}" for group in plan.groups)
    shown = ("CPU", "GPU")
    have = _fmt({k: v for k, v in total.items() if k in shown})
    free = _fmt({k: v for k, v in available.items() if k in shown})
    if colocate:
        fix = ("Lower cluster.colocate_num_cpus, raise cluster.num_cpus for a local Ray instance, or free the "
               "resources other jobs hold.")
    else:
        fix = ("Lower the keys named above (fewer workers/ranks/actors or fewer CPUs/GPUs each), add nodes, use a "
               "less strict cluster.*_placement strategy, or set cluster.colocate=true to share one device.")
    return PlacementError(f"Cannot place the run's actors: {problem}.\nRequested placement groups:\n{asked}\n"
                          f"The cluster has {have} in all, {free} free now. {fix}")
