"""Trie-constrained semantic IDs inside vLLM: the trie file and the per-request mask, without vLLM.

A `RolloutWorker` built with `sid_index` (rollouts/engine.py) registers the V1 custom logits processor
`rollouts.engine:SIDTrieLogitsProcessor`, which vLLM loads by name in its engine-core process. That class subclasses
a vLLM class, so it stays in rollouts/engine.py (the only module that imports vllm) as thin glue; everything it does
is here and runs without vLLM:

- `write_sid_trie` writes the token-id trie of an index once, to a file named by its content hash;
- a request opts in with `SamplingParams(extra_args={SID_TRIE_ARG: path})`; `check_sid_trie_arg` validates that
  key when vLLM accepts the request, and `request_mask` builds the request's `SIDTrieMask` (None = unconstrained);
- `SIDTrieMask` keeps, at each step, only the tokens that continue a valid SID (the end ids once the SID is complete),
  so every constrained completion is exactly one real item's SID; `SID_PREFIX_ARG` starts it mid-SID (the worker's
  beam search, `RolloutWorker.beam_search_sids`, extends each beam that way).

The sampler's log-probs are those of the masked distribution (the one sampled from). So that the learner trains that
same policy, each constrained rollout also records the token ids the mask allowed at every completion position
(`allowed_sets`, stored as `Rollout.allowed_token_ids`); the learner renormalises its log-probs and entropy over those
sets (rl/kernels/restricted.py). Scoring the full vocabulary instead would push probability onto tokens the sampler
can never emit and put noise gradient on forced tokens (a single legal code, the end token), which carry none here.

Shape legend: V vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rollouts.sid import SIDIndex
    from rollouts.sid_trie import SIDTrie

log = logging.getLogger(__name__)

SID_TRIE_ARG = "recforge_sid_trie"
"""`SamplingParams.extra_args` key: path of the token-id trie file that constrains the request to valid SIDs."""
SID_PREFIX_ARG = "recforge_sid_prefix"
"""`SamplingParams.extra_args` key (with SID_TRIE_ARG): SID token ids already chosen, at the end of the prompt; the
mask continues from there (beam search extends its beams one token per request this way)."""


def write_sid_trie(index: SIDIndex, token_to_id: Mapping[str, int], end_ids: Sequence[int], directory: Path) -> Path:
    """The token-id trie of `index` as a JSON file named by its content hash (so a cached load is never stale)."""
    trie = index.trie(token_to_id, end_ids=end_ids)  # checks that every SID token has an id
    body = json.dumps({"end_ids": list(end_ids),
                       "sids": [[token_to_id[t] for t in sid] for sid in index.sids.values()]})
    path = directory / f"sid-trie-{hashlib.sha256(body.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body)
        os.replace(tmp, path)
    log.info("SID trie: %d items, %d distinct tokens, depth %d -> %s", trie.num_items, len(trie.symbols),
             trie.max_depth, path)
    return path


@functools.lru_cache(maxsize=8)
def load_sid_trie(path: str) -> SIDTrie:
    """The trie written by `write_sid_trie` (cached per process: one load per engine, not per request)."""
    from rollouts.sid_trie import SIDTrie

    data = json.loads(Path(path).read_text())
    return SIDTrie(dict(enumerate(data["sids"])), end_ids=data["end_ids"])


class SIDTrieMask:
    """One request's constraint: walks the trie along the tokens generated so far and masks the next logits.

    Called by vLLM as `mask(output_token_ids, logits_V)`; `output_token_ids` is the request's live list, so only the
    tokens added since the last call are stepped through (from scratch if the list shrank, e.g. after preemption).
    """

    def __init__(self, trie: SIDTrie, prefix: Sequence[int] = ()) -> None:
        self.trie = trie
        self.start = trie.node_for(prefix) if prefix else 0
        if self.start < 0:
            raise ValueError(f"SID prefix {list(prefix)} is not the start of any item's semantic ID.")
        self.node = self.start
        self.num_seen = 0

    def __call__(self, output_token_ids: list[int], logits_V: torch.Tensor) -> torch.Tensor:
        self.advance(output_token_ids)
        if self.finished:
            # Finished (or, impossibly, off the trie): only an end token may follow.
            allowed = torch.tensor(self.trie.end_ids, dtype=torch.long)
            if allowed.numel() == 0:
                return logits_V  # no end ids given: max_tokens ends the request
            kept = logits_V[allowed.to(logits_V.device)].clone()
            logits_V.fill_(float("-inf"))
            logits_V[allowed.to(logits_V.device)] = kept
            return logits_V
        return self.trie.mask_logits_(logits_V, node=self.node)

    def advance(self, output_token_ids: Sequence[int]) -> None:
        """Walk the trie along the tokens added since the last call (from the start again if the list shrank)."""
        if len(output_token_ids) < self.num_seen:
            self.node, self.num_seen = self.start, 0
        for token in output_token_ids[self.num_seen:]:
            if not self.trie.is_leaf(self.node):
                self.node = self.trie.step(self.node, token)
        self.num_seen = len(output_token_ids)

    @property
    def finished(self) -> bool:
        return self.node < 0 or self.trie.is_leaf(self.node)

    def allowed_now(self) -> tuple[int, ...]:
        """The token ids `__call__` keeps at the current position; () when it keeps the whole vocabulary."""
        return tuple(self.trie.end_ids) if self.finished else tuple(self.trie.allowed_at(self.node))


def allowed_sets(trie: SIDTrie, completion_ids: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """For each completion token, the token ids the trie mask allowed when it was sampled (() = no constraint there).

    Replays `SIDTrieMask` along the completion, so the sets are exactly the ones vLLM's logits processor applied."""
    mask = SIDTrieMask(trie)
    sets = []
    for position in range(len(completion_ids)):
        mask.advance(completion_ids[:position])
        sets.append(mask.allowed_now())
    return tuple(sets)


def check_sid_trie_arg(extra_args: Mapping[str, Any] | None) -> None:
    """Raise ValueError when a request's `extra_args[SID_TRIE_ARG]` is set but names no readable trie file."""
    path = (extra_args or {}).get(SID_TRIE_ARG)
    if path is not None and not (isinstance(path, str) and Path(path).is_file()):
        raise ValueError(f"extra_args[{SID_TRIE_ARG!r}]={path!r} is not a readable SID trie file; pass the path "
                         "`write_sid_trie` returned (RolloutWorker.sid_trie_path), or leave the key out.")
    prefix = (extra_args or {}).get(SID_PREFIX_ARG)
    if prefix is not None:
        if path is None or not (isinstance(prefix, list) and all(isinstance(t, int) for t in prefix)):
            raise ValueError(f"extra_args[{SID_PREFIX_ARG!r}]={prefix!r}: give a list of token ids, together with "
                             f"extra_args[{SID_TRIE_ARG!r}].")
        if load_sid_trie(path).node_for(prefix) < 0:
            raise ValueError(f"extra_args[{SID_PREFIX_ARG!r}]={prefix} is not the start of any item's semantic ID.")


def request_mask(extra_args: Mapping[str, Any] | None) -> SIDTrieMask | None:
    """The mask for a request with these `extra_args` (None when it does not ask for SID constraints)."""
    path = (extra_args or {}).get(SID_TRIE_ARG)
    if path is None:
        return None
    return SIDTrieMask(load_sid_trie(path), prefix=(extra_args or {}).get(SID_PREFIX_ARG) or ())
