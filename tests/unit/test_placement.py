"""Placement planning (rl/placement.py): bundles and actor slots computed by hand for colocate/separate, CPU/GPU."""

from __future__ import annotations

import pytest

from rl.config import ConfigError, load_config
from rl.placement import ActorSlot, PlacementError, placement_error, plan_placement, share, shortfall

FORMAT = "{name: format, num_cpus: 0.1}"


def cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_share_rounds_down_to_ray_granularity_and_never_overfills():
    assert share(1.0, 3) == 0.3333
    assert share(1.0, 4) == 0.25
    assert share(0.7, 7) == 0.1  # 0.7 / 7 is 0.09999999999999999 in floats: still one tenth
    assert share(2.0, 1) == 2.0
    for total in (0.5, 1.0, 1.5, 2.0, 3.0):
        for num in range(1, 13):
            assert share(total, num) * num <= total + 1e-12
            assert total - share(total, num) * num < num * 1e-4  # at most one unit lost per actor


def test_colocate_cpu_one_bundle_split_three_ways():
    # defaults: 1 rollout worker, 1 learner rank, 1 reward actor ("format"), colocate_num_cpus 1.0
    plan = plan_placement(cfg("cluster.colocate=true"), gpu=False)
    assert [(g.name, g.strategy, g.bundles) for g in plan.groups] == [("colocated", "STRICT_PACK", ({"CPU": 1.0},))]
    third = ActorSlot(group="colocated", bundle_index=0, num_cpus=0.3333, num_gpus=0.0)
    assert plan.rollout == (third,)
    assert plan.learner == (third,)
    assert plan.rewards == {"format": (third,)}
    assert plan.totals() == {"CPU": 1.0}


def test_colocate_gpu_splits_the_gpu_among_gpu_users_only():
    # 2 workers + 2 ranks + format x2 (CPU only) + a judge x1 with num_gpus > 0: 7 actors share 2 CPUs (0.2857
    # each); 5 GPU users share 1 GPU (0.2 each); the format actors get no GPU.
    plan = plan_placement(cfg("cluster.colocate=true", "cluster.colocate_num_cpus=2", "rollout.num_workers=2",
                              "learner.num_ranks=2",
                              "reward.rewards=[{name: format, num_actors: 2}, "
                              "{name: length, alias: judge, num_gpus: 0.5}]"), gpu=True)
    assert [g.bundles for g in plan.groups] == [({"CPU": 2.0, "GPU": 1.0},)]
    gpu_slot = ActorSlot("colocated", 0, 0.2857, 0.2)
    assert plan.rollout == (gpu_slot, gpu_slot)
    assert plan.learner == (gpu_slot, gpu_slot)
    assert plan.rewards["judge"] == (gpu_slot,)
    assert plan.rewards["format"] == (ActorSlot("colocated", 0, 0.2857, 0.0),) * 2
    slots = [*plan.rollout, *plan.learner, *plan.rewards["judge"], *plan.rewards["format"]]
    assert sum(s.num_gpus for s in slots) == pytest.approx(1.0)
    assert sum(s.num_cpus for s in slots) <= 2.0


def test_separate_cpu_one_bundle_per_actor():
    plan = plan_placement(cfg("cluster.colocate=false", "rollout.num_workers=2", "cluster.rollout_num_cpus=2",
                              "learner.num_ranks=3", "cluster.learner_num_cpus=1",
                              "cluster.learner_placement=STRICT_PACK", "cluster.rollout_placement=SPREAD",
                              "reward.rewards=[{name: format, num_cpus: 0.5, num_actors: 2}, "
                              "{name: length, num_cpus: 0}]"), gpu=False)
    groups = {g.name: (g.strategy, g.bundles) for g in plan.groups}
    assert groups == {
        "rollout": ("SPREAD", ({"CPU": 2.0},) * 2),
        "learner": ("STRICT_PACK", ({"CPU": 1.0},) * 3),
        "reward/format": ("PACK", ({"CPU": 0.5},) * 2),
    }  # "length" asks for nothing: no group (Ray refuses all-zero bundles)
    assert plan.rollout == (ActorSlot("rollout", 0, 2.0, 0.0), ActorSlot("rollout", 1, 2.0, 0.0))
    assert plan.learner == tuple(ActorSlot("learner", i, 1.0, 0.0) for i in range(3))
    assert plan.rewards["format"] == (ActorSlot("reward/format", 0, 0.5, 0.0), ActorSlot("reward/format", 1, 0.5, 0.0))
    assert plan.rewards["length"] == (ActorSlot(None, -1, 0.0, 0.0),)
    assert plan.totals() == {"CPU": 8.0}


def test_separate_gpu_one_device_per_rollout_worker_and_rank():
    plan = plan_placement(cfg("cluster.colocate=false", "rollout.num_workers=2", "learner.num_ranks=4",
                              "reward.rewards=[{name: format, num_cpus: 1, num_gpus: 0.25}]"), gpu=True)
    groups = {g.name: g.bundles for g in plan.groups}
    assert groups["rollout"] == ({"CPU": 1.0, "GPU": 1.0},) * 2
    assert groups["learner"] == ({"CPU": 1.0, "GPU": 1.0},) * 4
    assert groups["reward/format"] == ({"CPU": 1.0, "GPU": 0.25},)
    assert plan.learner[3] == ActorSlot("learner", 3, 1.0, 1.0)
    assert plan.totals() == {"CPU": 7.0, "GPU": 6.25}


def test_shortfall_names_totals_bundles_and_strict_pack():
    colocated = plan_placement(cfg("cluster.colocate=true", "cluster.colocate_num_cpus=4"), gpu=False)
    assert shortfall(colocated, {"CPU": 2.0}, {"CPU": 2.0}) == [
        "the groups need 4 CPU in all, the cluster has 2",
        "group colocated: a bundle needs 4 CPU, the largest node has 2"]
    assert shortfall(colocated, {"CPU": 8.0}, {"CPU": 4.0}) == []
    # nodes of 1.5 CPUs: 2 learner bundles of 1 CPU fit with PACK (one per node), not with STRICT_PACK
    packed = plan_placement(cfg("cluster.colocate=false", "learner.num_ranks=2", "rollout.num_workers=1",
                                f"reward.rewards=[{FORMAT}]"), gpu=False)
    assert shortfall(packed, {"CPU": 4.5}, {"CPU": 1.5}) == []
    assert shortfall(packed, {"CPU": 3.0}, {"CPU": 1.5}) == ["the groups need 3.1 CPU in all, the cluster has 3"]
    strict = plan_placement(cfg("cluster.colocate=false", "learner.num_ranks=2", "rollout.num_workers=1",
                                "cluster.learner_placement=STRICT_PACK", f"reward.rewards=[{FORMAT}]"), gpu=False)
    assert shortfall(strict, {"CPU": 4.5}, {"CPU": 1.5}) == [
        "group learner: its bundles together (STRICT_PACK: one node) need 2 CPU, the largest node has 1.5"]
    gpu = plan_placement(cfg("cluster.colocate=false"), gpu=True)
    assert "the groups need 2 GPU in all, the cluster has 0" in shortfall(gpu, {"CPU": 8.0}, {"CPU": 8.0})


def test_placement_error_says_what_was_asked_what_there_is_and_what_to_change():
    plan = plan_placement(cfg("cluster.colocate=false", "learner.num_ranks=2", f"reward.rewards=[{FORMAT}]"),
                          gpu=False)
    err = placement_error(plan, problem="the groups need 3.1 CPU in all, the cluster has 2",
                          available={"CPU": 0.5, "memory": 1e9, "node:x": 1.0},
                          total={"CPU": 2.0, "GPU": 1.0, "memory": 2e9}, colocate=False)
    text = str(err)
    assert isinstance(err, PlacementError) and isinstance(err, ConfigError)
    assert "learner: 2 x {CPU: 1}, PACK (sized by learner.num_ranks, cluster.learner_num_cpus)" in text
    assert "rollout: 1 x {CPU: 1}, PACK (sized by rollout.num_workers, cluster.rollout_num_cpus)" in text
    assert "reward/format: 1 x {CPU: 0.1}, PACK (sized by reward.rewards.0.num_actors, .num_cpus, .num_gpus)" in text
    assert "The cluster has {CPU: 2, GPU: 1} in all, {CPU: 0.5} free now." in text
    assert "cluster.colocate=true" in text
    colocated = plan_placement(cfg("cluster.colocate=true"), gpu=False)
    text = str(placement_error(colocated, problem="x", available={}, total={}, colocate=True))
    assert "colocated: 1 x {CPU: 1}, STRICT_PACK (sized by cluster.colocate_num_cpus, plus one GPU" in text
    assert "Lower cluster.colocate_num_cpus, raise cluster.num_cpus" in text


def test_placement_keys_are_checked():
    with pytest.raises(ConfigError, match="cluster.learner_placement='PACKED' is not one of .*Did you mean 'PACK'"):
        cfg("cluster.learner_placement=PACKED")
    with pytest.raises(ConfigError, match=r"cluster.colocate_num_cpus=0.0 is out of range: it must be > 0"):
        cfg("cluster.colocate_num_cpus=0")
    with pytest.raises(PlacementError, match="Raise cluster.colocate_num_cpus"):
        plan_placement(cfg("cluster.colocate_num_cpus=0.0002", "rollout.num_workers=2"), gpu=False)
