"""`RolloutPool`'s side of the broadcast weight sync without Ray actors: rank offsets of the weight group, collective
calls that gather every worker before raising (no re-issue), and a worker restarted after a broadcast getting that
version through the path export hook. The actors are stand-ins whose calls return their result directly."""

from __future__ import annotations

from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray.exceptions import RayActorError  # noqa: E402

from rollouts import pool as pool_module  # noqa: E402
from rollouts.pool import RolloutPool  # noqa: E402


class Call:
    def __init__(self, fn, log: list, name: str) -> None:
        self.fn, self.log, self.name = fn, log, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append((self.name, args, kwargs))
        try:
            return ("ok", self.fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 — delivered by the fake ray.get
            return ("err", err)


class FakeWorker:
    """A RolloutWorker actor handle; `dead=True` makes every call fail like a dead actor until `restart()`."""

    def __init__(self, ranks: int) -> None:
        self.ranks, self.dead, self.log = ranks, False, []

    def __getattr__(self, name: str) -> Call:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise RayActorError(error_msg="dead")
            return {"num_weight_ranks": lambda: self.ranks, "health": lambda: {"pid": 1},
                    "receive_weights": lambda version: {"weight_sync/received_bytes": 8.0}}.get(
                        name, lambda *a, **k: None)(*args, **kwargs)

        return Call(run, self.log, name)


def fake_get(ref: Any, timeout: float | None = None) -> Any:
    kind, value = ref
    if kind == "err":
        raise value
    return value


def make_pool(monkeypatch, workers: list[FakeWorker]) -> RolloutPool:
    monkeypatch.setattr(pool_module.ray, "get", fake_get)
    pool = RolloutPool.__new__(RolloutPool)
    pool._actors, pool._failures, pool._reissued, pool._closed = workers, [0] * len(workers), 0, False
    pool._synced, pool._restart_weights, pool._num_weight_ranks = None, None, None
    pool.max_restarts, pool.restart_timeout_s = 1, 5.0
    return pool


def test_join_gives_consecutive_ranks_after_the_learner(monkeypatch):
    workers = [FakeWorker(ranks=1), FakeWorker(ranks=2), FakeWorker(ranks=1)]
    pool = make_pool(monkeypatch, workers)
    assert pool.num_weight_ranks == 4
    pool.join_weight_group("h", 1234, 5, "gloo", 30.0)
    offsets = [next(args[2] for name, args, _ in w.log if name == "join_weight_group") for w in workers]
    assert offsets == [1, 2, 4]  # learner rank 0, then 1 | 2, 3 | 4


def test_receive_gathers_every_worker_then_raises_without_reissuing(monkeypatch):
    workers = [FakeWorker(ranks=1), FakeWorker(ranks=1)]
    pool = make_pool(monkeypatch, workers)
    workers[0].dead = True
    with pytest.raises(RayActorError):
        pool.receive_weights(3)
    assert [name for name, _, _ in workers[1].log] == ["receive_weights"]  # the survivor was awaited, once
    assert pool.num_failures == 0 and pool._synced is None  # recovered at the next call, not inside a collective


def test_a_worker_restarted_after_a_broadcast_gets_that_version_by_path(monkeypatch):
    workers = [FakeWorker(ranks=1), FakeWorker(ranks=1)]
    pool = make_pool(monkeypatch, workers)
    exported: list[int] = []
    pool.set_restart_weights(lambda version: exported.append(version) or f"/dev/shm/v{version}")
    assert pool.receive_weights(7)["weight_sync/received_bytes"] == 16.0
    pool._recover(1, RayActorError(error_msg="killed"))  # what a failed call or a heartbeat does
    assert exported == [7]
    assert ("reload_weights", ("/dev/shm/v7", 7), {}) in workers[1].log
    assert pool.num_failures == 1  # the broadcast transport re-creates its group when this count moves
