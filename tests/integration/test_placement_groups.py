"""Placement groups with real local Ray and plain small actors (no vLLM, no DeepSpeed; a few seconds).

- separate mode: one group per role, every actor in its own bundle (its placement group id and the bundle's
  `CPU_group_<i>_<pg>` resource show it), a restarted actor back in the same bundle, a reward actor replaced by
  the reward service in its bundle again; `remove()` frees everything and ends the actors in the groups;
- colocate mode: one bundle shared by rollout, learner and reward actors in equal CPU shares;
- a request the cluster cannot hold fails with the clear error (at once on a local instance, after
  `placement_timeout_s` where nodes might join) and leaves nothing reserved.
"""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from rl.config import load_config  # noqa: E402
from rl.placement import PlacementError, plan_placement  # noqa: E402
from rl.placement_groups import PlacementGroups  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(max_restarts=1, max_task_retries=0)
class Probe:
    def where(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"pg": ctx.get_placement_group_id(), "cpu": ctx.get_assigned_resources().get("CPU", 0.0),
                "pid": os.getpid()}


def bundle_free(pg, index: int) -> float:
    return ray.available_resources().get(f"CPU_group_{index}_{pg.id.hex()}", 0.0)


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    """Ray's resource view is updated asynchronously: poll until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def separate_plan():
    cfg = load_config(None, ["cluster.colocate=false", "rollout.num_workers=2", "cluster.rollout_num_cpus=0.5",
                             "learner.num_ranks=2", "cluster.learner_num_cpus=0.25",
                             "cluster.learner_placement=STRICT_PACK",
                             "reward.rewards=[{name: format, num_cpus: 0.2, num_actors: 2}]"])
    return plan_placement(cfg, gpu=False)


def test_separate_groups_pin_actors_to_their_bundles_and_restarts_stay(ray_local):
    groups = PlacementGroups(separate_plan(), timeout_s=30, colocate=False, fixed_cluster=True)
    pgs = dict(groups.groups)
    try:
        assert set(pgs) == {"rollout", "learner", "reward/format"}
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(2.0 - 0.5 * 2 - 0.25 * 2 - 0.2 * 2)
        roles = {"rollout": groups.plan.rollout, "learner": groups.plan.learner}
        actors = {(role, i): Probe.options(**opts).remote()
                  for role, slots in roles.items() for i, opts in enumerate(groups.actor_options(slots))}
        for (role, i), actor in actors.items():
            seen = ray.get(actor.where.remote(), timeout=60)
            assert seen["pg"] == groups.groups[role].id.hex()
            assert seen["cpu"] == pytest.approx(roles[role][i].num_cpus)
        for role in roles:  # each bundle is used up by exactly its own actor
            wait_for(lambda role=role: all(bundle_free(groups.groups[role], i) == 0.0 for i in range(2)))

        actor = actors[("rollout", 1)]
        before = ray.get(actor.where.remote())
        ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=1) with the same scheduling strategy
        deadline, after = time.monotonic() + 30, before
        while after["pid"] == before["pid"]:
            assert time.monotonic() < deadline, "the killed actor did not come back"
            try:
                after = ray.get(actor.where.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        assert after["pg"] == before["pg"]
        wait_for(lambda: bundle_free(pgs["rollout"], 1) == 0.0 and bundle_free(pgs["rollout"], 0) == 0.0)
    finally:
        groups.remove()
    assert [ray.util.placement_group_table(pg)["state"] for pg in pgs.values()] == ["REMOVED"] * 3
    assert groups.groups == {}
    with pytest.raises(ray.exceptions.RayActorError):  # Ray ends the actors of a removed group
        ray.get(actors[("learner", 0)].where.remote(), timeout=30)
    wait_for(lambda: ray.available_resources().get("CPU", 0.0) == pytest.approx(2.0))


def test_reward_service_replacement_actor_lands_in_the_same_bundle(ray_local):
    from rewards.service import RewardService
    from rl.config import RewardConfig, RewardSpec

    cfg = load_config(None, ["cluster.colocate=false", "cluster.rollout_num_cpus=0.25", "cluster.learner_num_cpus=0.25",
                             "reward.rewards=[{name: format, num_cpus: 0.5}]"])
    groups = PlacementGroups(plan_placement(cfg, gpu=False), timeout_s=30, colocate=False, fixed_cluster=True)
    pg = groups.groups["reward/format"]
    try:
        with RewardService(RewardConfig(rewards=[RewardSpec(name="format", num_cpus=0.5)]), max_restarts=1,
                           slot_options=groups.reward_options()) as service:
            wait_for(lambda: bundle_free(pg, 0) == 0.0)
            pool = service._pools["format"]
            pool.to_replace.add(0)  # as after a timed-out call: killed for good, a fresh actor takes the slot
            pool.replace_marked()
            ray.get(pool.actors[0].ready.remote(), timeout=60)
            assert pool.replacements == 1
            wait_for(lambda: bundle_free(pg, 0) == 0.0)  # the fresh actor holds the bundle again
            assert ray.available_resources().get("CPU", 0.0) == pytest.approx(1.0)  # 0.25 + 0.25 + 0.5 reserved
    finally:
        groups.remove()


def test_colocated_actors_share_one_bundle(ray_local):
    cfg = load_config(None, ["cluster.colocate=true", "learner.num_ranks=2"])
    groups = PlacementGroups(plan_placement(cfg, gpu=False), timeout_s=30, colocate=True, fixed_cluster=True)
    try:
        plan, pg = groups.plan, groups.groups["colocated"]
        slots = [*plan.rollout, *plan.learner, *plan.rewards["format"]]
        actors = [Probe.options(**opts).remote() for opts in groups.actor_options(slots)]
        seen = ray.get([actor.where.remote() for actor in actors], timeout=60)
        assert {s["pg"] for s in seen} == {pg.id.hex()}
        assert [s["cpu"] for s in seen] == [0.25] * 4  # 1 CPU over 1 worker + 2 ranks + 1 reward actor
        wait_for(lambda: bundle_free(pg, 0) == 0.0)
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(1.0)  # the other CPU stays free
    finally:
        groups.remove()


def test_infeasible_request_fails_with_the_clear_error_and_reserves_nothing(ray_local):
    cfg = load_config(None, ["cluster.colocate=true", "cluster.colocate_num_cpus=4"])
    plan = plan_placement(cfg, gpu=False)
    start = time.monotonic()
    with pytest.raises(PlacementError) as local:  # a local instance cannot grow: fails before waiting
        PlacementGroups(plan, timeout_s=30, colocate=True, fixed_cluster=True)
    assert time.monotonic() - start < 5
    text = str(local.value)
    assert "the groups need 4 CPU in all, the cluster has 2" in text
    assert "colocated: 1 x {CPU: 4}, STRICT_PACK (sized by cluster.colocate_num_cpus" in text
    assert "Lower cluster.colocate_num_cpus" in text

    start = time.monotonic()
    with pytest.raises(PlacementError) as waited:  # a cluster that might grow: waits placement_timeout_s
        PlacementGroups(plan, timeout_s=1.5, colocate=True, fixed_cluster=False)
    assert 1.5 <= time.monotonic() - start < 10
    text = str(waited.value)
    assert "placement group(s) colocated were not reserved within 1.5 s (cluster.placement_timeout_s)" in text
    assert "they can never fit its nodes: the groups need 4 CPU in all, the cluster has 2" in text
    assert "The cluster has {CPU: 2} in all, {CPU: 2} free now." in text
    table = ray.util.placement_group_table()
    assert all(entry["state"] == "REMOVED" for entry in table.values())
    wait_for(lambda: ray.available_resources().get("CPU", 0.0) == pytest.approx(2.0))
