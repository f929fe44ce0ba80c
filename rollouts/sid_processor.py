"""Trie-constrained semantic IDs inside vLLM: the trie file and the per-request mask, without vLLM.

A `RolloutWorker` built with `sid_index` (rollouts/engine.py) registers the V1 custom logits processor
`rollouts.engine:SIDTrieLogitsProcessor`, which vLLM loads by name in its engine-core process. That class subclasses
a vLLM class, so it stays in rollouts/engine.py (the only module that imports vllm) as thin glue; everything it does
is here and runs without vLLM:

- `write_sid_trie` writes the token-id trie of an index once, to a file named by its content hash;
- a request opts in with `SamplingParams(extra_args={SID_TRIE_ARG: path})`; `check_sid_trie_arg` validates that
  key when vLLM accepts the request, and `request_mask` builds the request's `SIDTrieMask` (None = unconstrained);
- `SIDTrieMask` keeps, at each step, only the tokens that continue a valid SID (the end ids once the SID is complete),
  so every constrained completion is exactly one real item's SID.

The sampler's log-probs are those of the masked distribution (the one sampled from); the learner recomputes unmasked
log-probs and uses its own as the ratio's reference, so training needs no change (the sampler/learner log-prob gap
metric shows log Z_allowed).

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

    def __init__(self, trie: SIDTrie) -> None:
        self.trie = trie
        self.node = 0
        self.num_seen = 0

    def __call__(self, output_token_ids: list[int], logits_V: torch.Tensor) -> torch.Tensor:
        if len(output_token_ids) < self.num_seen:
            self.node, self.num_seen = 0, 0
        for token in output_token_ids[self.num_seen:]:
            if not self.trie.is_leaf(self.node):
                self.node = self.trie.step(self.node, token)
        self.num_seen = len(output_token_ids)
        if self.node < 0 or self.trie.is_leaf(self.node):
            # Finished (or, impossibly, off the trie): only an end token may follow.
            allowed = torch.tensor(self.trie.end_ids, dtype=torch.long)
            if allowed.numel() == 0:
                return logits_V  # no end ids given: max_tokens ends the request
            kept = logits_V[allowed.to(logits_V.device)].clone()
            logits_V.fill_(float("-inf"))
            logits_V[allowed.to(logits_V.device)] = kept
            return logits_V
        return self.trie.mask_logits_(logits_V, node=self.node)


def check_sid_trie_arg(extra_args: Mapping[str, Any] | None) -> None:
    """Raise ValueError when a request's `extra_args[SID_TRIE_ARG]` is set but names no readable trie file."""
    path = (extra_args or {}).get(SID_TRIE_ARG)
    if path is not None and not (isinstance(path, str) and Path(path).is_file()):
        raise ValueError(f"extra_args[{SID_TRIE_ARG!r}]={path!r} is not a readable SID trie file; pass the path "
                         "`write_sid_trie` returned (RolloutWorker.sid_trie_path), or leave the key out.")


def request_mask(extra_args: Mapping[str, Any] | None) -> SIDTrieMask | None:
    """The mask for a request with these `extra_args` (None when it does not ask for SID constraints)."""
    path = (extra_args or {}).get(SID_TRIE_ARG)
    return None if path is None else SIDTrieMask(load_sid_trie(path))
