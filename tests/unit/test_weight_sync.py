"""Weight-sync transports without vLLM: bucket plans, the safetensors writer, the broadcast protocol over a real
gloo group (threads stand in for the vLLM workers), and the driver-side group lifecycle (join, rejoin after a
worker restart, path fallback when a push fails)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rl.config import ConfigError, load_config
from rl.weight_sync import (
    BroadcastPlan,
    BroadcastWeightSync,
    PathWeightSync,
    WeightGroup,
    make_weight_sync,
    plan_buckets,
    read_safetensors,
    receive_buckets,
    receive_plan,
    send_weights,
    write_safetensors,
)
from rollouts.weight_receiver import with_tied_lm_head

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 8),
        "model.norm.weight": torch.randn(8).to(torch.bfloat16),  # 8 bf16 = 16 bytes
        "odd.bf16": torch.randn(3).to(torch.bfloat16),  # 6 bytes: would misalign a following fp32
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8),
        "scalar": torch.tensor(2.5),
        "big": torch.randn(300),  # 1200 bytes: larger than the test bucket, goes alone
    }


def test_plan_buckets_aligned_bounded_and_complete():
    weights = sample_weights()
    plan = plan_buckets([(n, tuple(t.shape), t.dtype) for n, t in weights.items()], bucket_bytes=1024,
                        policy_version=7)
    assert sorted(plan.names) == sorted(weights)
    assert plan.num_bytes == sum(t.numel() * t.element_size() for t in weights.values())
    for bucket, size in zip(plan.buckets, plan.bucket_sizes, strict=True):
        assert size <= 1024 or len(bucket) == 1  # only a tensor bigger than the bucket gets one that big
        end = 0
        for slot in bucket:
            assert slot.offset == end  # packed, no holes
            assert slot.offset % torch.empty(0, dtype=getattr(torch, slot.dtype)).element_size() == 0
            end += slot.num_bytes
    # fp32 tensors come before bf16 ones, so the odd-sized bf16 tensor cannot misalign an fp32 one.
    dtypes = [slot.dtype for bucket in plan.buckets for slot in bucket]
    assert dtypes == sorted(dtypes, key=lambda d: d != "float32")
    assert BroadcastPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], bucket_bytes=0, policy_version=0)


def test_write_safetensors_roundtrip_with_alias(tmp_path):
    weights = sample_weights()
    named = [*weights.items(), ("lm_head.weight", weights["model.embed_tokens.weight"])]
    num_bytes = write_safetensors(tmp_path / "model.safetensors", named)
    assert num_bytes == sum(t.numel() * t.element_size() for _, t in named)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert set(loaded) == {name for name, _ in named}
    for name, tensor in named:
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    viewed = dict(read_safetensors(tmp_path / "model.safetensors"))  # memory-mapped views (misaligned: copied)
    assert list(viewed) == [name for name, _ in named]
    for name, tensor in named:
        assert viewed[name].dtype == tensor.dtype and torch.equal(viewed[name], tensor), name
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_write_safetensors_in_place_overwrites_and_truncates(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [("a", torch.ones(1000)), ("b", torch.ones(10))], in_place=True)
    write_safetensors(path, [("a", torch.full((100,), 2.0))], in_place=True)  # smaller: the old tail must go
    assert set(load_file(str(path))) == {"a"} and torch.equal(load_file(str(path))["a"], torch.full((100,), 2.0))


def test_path_sync_alternates_slots_and_keeps_the_newest_version_intact(tmp_path):
    class Exporter:
        def export_weights(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            num = write_safetensors(Path(directory) / "model.safetensors", [("w", torch.full((4,), float(version)))],
                                    in_place=True)
            return {"weight_sync/bytes": float(num)}

    class Workers:
        def sync(self, weights_dir, policy_version):
            synced.append((weights_dir, policy_version))
            return {}

    synced: list[tuple[str, int]] = []
    sync = PathWeightSync(str(tmp_path))
    for version in (1, 2, 3):
        sync.push(Exporter(), Workers(), version)
    assert synced[0][0] == synced[2][0] != synced[1][0]  # v3 overwrote v1's slot
    assert torch.equal(load_file(str(Path(synced[1][0]) / "model.safetensors"))["w"], torch.full((4,), 2.0))
    assert torch.equal(load_file(str(Path(synced[2][0]) / "model.safetensors"))["w"], torch.full((4,), 3.0))
    sync.close()
    assert not sync.base.exists()


def _receiver(port: int, rank: int, world: int, out: dict, tied: bool) -> None:
    group = WeightGroup(host="127.0.0.1", port=port, rank=rank, world_size=world, backend="gloo", timeout_s=60,
                        device=torch.device("cpu"))
    plan = receive_plan(group)
    stream = receive_buckets(group, plan)
    out[rank] = (plan.policy_version, dict(with_tied_lm_head(stream) if tied else stream))
    group.close()


def test_gloo_broadcast_delivers_every_tensor_bit_exact():
    weights = sample_weights()
    port, world, out = free_port(), 3, {}
    threads = [threading.Thread(target=_receiver, args=(port, rank, world, out, rank == 2)) for rank in (1, 2)]
    for thread in threads:
        thread.start()
    group = WeightGroup(host="127.0.0.1", port=port, rank=0, world_size=world, backend="gloo", timeout_s=60,
                        device=torch.device("cpu"))
    plan = send_weights(group, weights.items(), policy_version=3, bucket_bytes=256)
    for thread in threads:
        thread.join(timeout=60)
    group.close()
    assert len(plan.buckets) > 2
    for rank in (1, 2):
        version, got = out[rank]
        assert version == 3
        for name, tensor in weights.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
            assert torch.equal(got[name], tensor), (rank, name)
    assert set(out[1][1]) == set(weights)
    assert torch.equal(out[2][1]["lm_head.weight"], weights["model.embed_tokens.weight"])  # tied alias added


def test_make_weight_sync_and_config_names():
    cluster = load_config(ROOT / "recipes/rec_reasoning/debug.yaml", []).cluster
    assert isinstance(make_weight_sync(cluster), PathWeightSync)
    cfg = load_config(ROOT / "recipes/rec_reasoning/debug.yaml",
                      ["cluster.weight_sync=broadcast", "cluster.weight_sync_bucket_mb=1"])
    sync = make_weight_sync(cfg.cluster)
    assert isinstance(sync, BroadcastWeightSync) and sync.backend == "auto" and sync.bucket_bytes == 1 << 20
    sync.close()
    with pytest.raises(ConfigError, match="NCCL"):
        load_config(ROOT / "recipes/rec_reasoning/debug.yaml", ["cluster.weight_sync=nccl", "cluster.colocate=true"])
    with pytest.raises(ConfigError, match="NCCL"):
        load_config(ROOT / "recipes/rec_reasoning/debug.yaml",
                    ["cluster.weight_sync=broadcast", "cluster.weight_sync_backend=nccl", "cluster.colocate=true"])


# -- the driver-side lifecycle with in-process stand-ins for the learner group and the rollout pool ----------------


class FakeLearners:
    """Rank 0 of a learner group: a real gloo weight group, weights that change every push."""

    def __init__(self) -> None:
        self.weights = sample_weights()
        self.group: WeightGroup | None = None
        self.joins = 0
        self.exports: list[str] = []

    def weight_group_address(self):
        return "127.0.0.1", free_port(), "cpu"

    def join_weight_group(self, host, port, world_size, backend, timeout_s):
        assert backend == "gloo"
        self.joins += 1
        self.group = WeightGroup(host=host, port=port, rank=0, world_size=world_size, backend=backend,
                                 timeout_s=timeout_s, device=torch.device("cpu"))

    def broadcast_weights(self, policy_version, bucket_bytes):
        for tensor in self.weights.values():
            tensor.add_(1)
        plan = send_weights(self.group, self.weights.items(), policy_version=policy_version,
                            bucket_bytes=bucket_bytes)
        return {"weight_sync/bytes": float(plan.num_bytes)}

    def leave_weight_group(self):
        if self.group is not None:
            self.group.close()
        self.group = None

    def export_weights(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.exports.append(directory)
        return {"weight_sync/bytes": float(write_safetensors(Path(directory) / "model.safetensors",
                                                             self.weights.items()))}


class FakePool:
    """Two "vLLM workers" as threads; `fail_next_receive` makes one worker's receive raise without receiving."""

    def __init__(self) -> None:
        self.groups: dict[int, WeightGroup] = {}
        self.received: dict[int, dict[str, torch.Tensor]] = {}
        self.num_failures = 0
        self.restart_weights = None
        self.synced: list[tuple[str, int]] = []
        self.fail_next_receive = False

    num_weight_ranks = 2

    def set_restart_weights(self, export):
        self.restart_weights = export

    def _on_workers(self, fn):
        errors, threads = [], []

        def run(rank):
            try:
                fn(rank)
            except Exception as err:  # noqa: BLE001
                errors.append(err)

        for rank in (1, 2):
            threads.append(threading.Thread(target=run, args=(rank,)))
            threads[-1].start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]

    def join_weight_group(self, host, port, world_size, backend, timeout_s):
        def join(rank):
            self.groups[rank] = WeightGroup(host=host, port=port, rank=rank, world_size=world_size, backend=backend,
                                            timeout_s=timeout_s, device=torch.device("cpu"))

        self._on_workers(join)

    def receive_weights(self, policy_version):
        if self.fail_next_receive:  # a worker died: close the group under the learner, like a dead process
            self.fail_next_receive = False
            for group in self.groups.values():
                group.close()
            raise RuntimeError("worker 1 died")

        def receive(rank):
            plan = receive_plan(self.groups[rank])
            assert plan.policy_version == policy_version
            self.received[rank] = {n: t.clone() for n, t in receive_buckets(self.groups[rank], plan)}

        self._on_workers(receive)
        return {"timing/weight_sync_reload": 0.0}

    def leave_weight_group(self):
        for group in self.groups.values():
            group.close()
        self.groups = {}

    def sync(self, weights_dir, policy_version):
        self.synced.append((weights_dir, policy_version))
        return {"timing/weight_sync_reload": 0.0}


def test_broadcast_sync_joins_once_rejoins_after_restart_and_falls_back(tmp_path):
    learners, pool = FakeLearners(), FakePool()
    sync = BroadcastWeightSync(bucket_mb=0.001, timeout_s=30, sync_dir=str(tmp_path))
    try:
        metrics = sync.push(learners, pool, 1)
        assert learners.joins == 1 and "timing/weight_group_join" in metrics
        assert metrics["weight_sync/bytes"] == sum(t.numel() * t.element_size() for t in learners.weights.values())
        for rank in (1, 2):
            assert all(torch.equal(pool.received[rank][n], t) for n, t in learners.weights.items())
        sync.push(learners, pool, 2)
        assert learners.joins == 1  # same group
        # A worker restart (the pool counts it): it got v2 by path through the hook, and the next push rejoins.
        pool.num_failures += 1
        restored = pool.restart_weights(2)
        assert (Path(restored) / "model.safetensors").is_file()
        metrics = sync.push(learners, pool, 3)
        assert learners.joins == 2 and "timing/weight_group_join" in metrics
        assert all(torch.equal(pool.received[1][n], t) for n, t in learners.weights.items())
        # A push that fails mid-way: the group is dropped and this version goes by path; the next push rejoins.
        pool.fail_next_receive = True
        metrics = sync.push(learners, pool, 4)
        assert metrics["weight_sync/fallback_path"] == 1.0 and pool.synced[-1][1] == 4
        sync.push(learners, pool, 5)
        assert learners.joins == 3
    finally:
        learners.leave_weight_group()
        pool.leave_weight_group()
        sync.close()


def _stalled_receiver(port: int) -> None:
    group = WeightGroup(host="127.0.0.1", port=port, rank=1, world_size=2, backend="gloo", timeout_s=60,
                        device=torch.device("cpu"))
    receive_plan(group)
    time.sleep(120)  # takes no bucket: the sender blocks once the socket buffers are full, until this dies


def test_a_receiver_killed_mid_push_fails_the_sender_at_once_not_at_the_timeout():
    """What the broadcast transport's fallback relies on: a dead vLLM worker process does not hang the learner."""
    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(target=_stalled_receiver, args=(port,), daemon=True)
    receiver.start()
    group = WeightGroup(host="127.0.0.1", port=port, rank=0, world_size=2, backend="gloo", timeout_s=60,
                        device=torch.device("cpu"))
    threading.Timer(1.0, os.kill, args=(receiver.pid, signal.SIGKILL)).start()
    weights = {f"w{i}": torch.zeros(1 << 20) for i in range(16)}  # 64 MB, far more than the socket buffers hold
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="(?i)connection|closed|reset"):
        send_weights(group, weights.items(), policy_version=1, bucket_bytes=4 << 20)
    assert time.perf_counter() - start < 20  # the group's timeout is 60 s
    receiver.join(timeout=10)
    group.close()
