"""A prefix trie over valid semantic IDs, constrained sampling and beam search with it, and SID → item decoding.

The trie works on any hashable symbols: token ids for decoding (`SIDTrie.from_index(index, token_to_id)`), token
strings for parsing text (`SIDIndex.parse`). Nodes are ints (0 = root); each node's allowed next symbols are a sorted
tuple computed once, so a vLLM per-request logits processor pays a few dict lookups per token:

    node = trie.step(node, last_token_id)        # or trie.node_for(output_token_ids) without keeping state
    allowed = trie.allowed_at(node)             # token ids; at a finished SID, `end_ids` (e.g. EOS)
    trie.mask_logits_(logits_V, node=node)      # everything else to -inf, in place

`constrained_beam_search` and `sample_sids` are the pure-torch counterparts for transformers models (evaluation,
tests): they recompute the (short) sequence each step instead of keeping a KV cache, which is fine for SIDs of a few
tokens after a prompt.

Shape legend: S samples, B beams, P prompt tokens, T tokens so far, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rollouts.envs.rec_data import Id
    from rollouts.sid import SIDIndex

ROOT = 0
_GARBAGE = -1


class SIDTrie:
    """Prefix tree of item SIDs; SIDs must be distinct and prefix-free (a leaf is exactly a finished SID)."""

    def __init__(self, sequences: Mapping[Id, Sequence[Hashable]], *, end_ids: Sequence[int] = ()) -> None:
        children: list[dict[Hashable, int]] = [{}]
        items: list[Id | None] = [None]
        for item, seq in sequences.items():
            if len(seq) == 0:
                raise ValueError(f"Item {item!r} has an empty SID.")
            node = ROOT
            for symbol in seq:
                nxt = children[node].get(symbol)
                if nxt is None:
                    if items[node] is not None:
                        raise ValueError(f"The SID of item {items[node]!r} is a prefix of item {item!r}'s SID.")
                    nxt = len(children)
                    children[node][symbol] = nxt
                    children.append({})
                    items.append(None)
                node = nxt
            if items[node] is not None or children[node]:
                other = items[node] if items[node] is not None else "another item"
                raise ValueError(f"Item {item!r}'s SID equals or is a prefix of the SID of {other!r}.")
            items[node] = item
        self._children = children
        self._items = items
        self.end_ids = tuple(end_ids)
        self._allowed = [tuple(sorted(ch)) if ch else self.end_ids for ch in children]
        self._allowed_tensors: dict[int, torch.Tensor] = {}
        self.symbols = frozenset(s for ch in children for s in ch)
        self.num_items = sum(1 for i in items if i is not None)
        self.max_depth = max((len(s) for s in sequences.values()), default=0)

    @classmethod
    def from_index(cls, index: SIDIndex, token_to_id: Mapping[str, int], *, end_ids: Sequence[int] = ()) -> SIDTrie:
        """Token-id trie of `index`; `token_to_id` is what `add_sid_tokens` returned (or tokenizer.get_vocab())."""
        missing = sorted({t for sid in index.sids.values() for t in sid if t not in token_to_id})
        if missing:
            raise ValueError(f"{len(missing)} SID tokens have no token id (first: {missing[:5]}); add them to the "
                             "tokenizer with rollouts.sid.add_sid_tokens first.")
        return cls({item: [token_to_id[t] for t in sid] for item, sid in index.sids.items()}, end_ids=end_ids)

    # -- walking ------------------------------------------------------------------------------------------------------

    def step(self, node: int, symbol: Hashable) -> int:
        """The child of `node` along `symbol`, or -1 when no valid SID continues that way."""
        if node < 0:
            return -1
        return self._children[node].get(symbol, -1)

    def node_for(self, prefix: Sequence[Hashable]) -> int:
        """The node reached by `prefix` from the root, or -1 for a prefix of no valid SID."""
        node = ROOT
        for symbol in prefix:
            node = self.step(node, symbol)
            if node < 0:
                return -1
        return node

    def allowed_at(self, node: int) -> tuple:
        """Symbols that continue a valid SID from `node`; `end_ids` at a finished SID; () for an invalid node."""
        return self._allowed[node] if node >= 0 else ()

    def allowed_next(self, prefix_ids: Sequence[Hashable]) -> tuple:
        """Symbols allowed after `prefix_ids` (the SID tokens generated so far); see `allowed_at`."""
        return self.allowed_at(self.node_for(prefix_ids))

    def is_leaf(self, node: int) -> bool:
        return node >= 0 and self._items[node] is not None

    def item_at(self, node: int) -> Id | None:
        return self._items[node] if node >= 0 else None

    def item_for(self, seq: Sequence[Hashable]) -> Id | None:
        """The item whose SID is exactly `seq`, or None."""
        return self.item_at(self.node_for(seq))

    def allowed_tensor(self, node: int) -> torch.Tensor:
        """`allowed_at(node)` as a cached int64 tensor (token-id tries only)."""
        cached = self._allowed_tensors.get(node)
        if cached is None:
            cached = torch.tensor(self.allowed_at(node), dtype=torch.long)
            self._allowed_tensors[node] = cached
        return cached

    def mask_logits_(self, logits_V: torch.Tensor, *, node: int) -> torch.Tensor:
        """Set every logit but the allowed ones at `node` to -inf, in place; returns `logits_V`."""
        allowed = self.allowed_tensor(node).to(logits_V.device)
        if allowed.numel() == 0:
            raise ValueError(f"No token is allowed at trie node {node} (an invalid prefix, or a finished SID without "
                             "end_ids); masking would leave nothing to sample.")
        kept = logits_V[allowed].clone()
        logits_V.fill_(float("-inf"))
        logits_V[allowed] = kept
        return logits_V

    # -- decoding -----------------------------------------------------------------------------------------------------

    def decode(self, seq: Sequence[Hashable]) -> list[Id | None]:
        """Items named by consecutive SIDs in `seq`, in order; None for each invalid or unfinished SID.

        Symbols outside the trie's vocabulary (text, EOS) separate SIDs. A symbol that cannot continue the current
        SID ends it as invalid and, if it can start an SID, starts the next one; symbols that can start nothing are
        skipped up to the next valid start (one None per such stretch).
        """
        out: list[Id | None] = []
        node = ROOT
        for symbol in seq:
            if symbol not in self.symbols:
                if node > ROOT:
                    out.append(None)  # unfinished
                node = ROOT
                continue
            nxt = self.step(node, symbol) if node >= ROOT else -1
            if nxt < 0:
                if node != _GARBAGE:
                    out.append(None)
                nxt = self.step(ROOT, symbol)
            node = nxt if nxt >= 0 else _GARBAGE
            if self.is_leaf(node):
                out.append(self._items[node])
                node = ROOT
        if node > ROOT:
            out.append(None)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Generation with transformers models.


@dataclass(frozen=True)
class BeamHit:
    item_id: Id
    token_ids: tuple[int, ...]
    logprob: float
    """Sum over SID tokens of log p(token), each renormalised over the tokens the trie allows at that step."""


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _last_logits_BV(model: Any, input_ids_BT: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids_BT.to(_model_device(model)))
    return out.logits[:, -1, :].float().cpu()


Beam = tuple[int, tuple[int, ...]]
"""(sample index, SID token ids chosen so far): one beam to extend."""
NextLogprobs = Callable[[list[Beam]], list[Mapping[int, float]]]
"""Per beam, token id → log-prob of the next token renormalised over the tokens the trie allows after the beam's
prefix. It must cover the beam's top `num_beams` allowed tokens (all of them will do); other entries (tokens the trie
does not allow there, non-finite values) are ignored."""


def trie_beam_search(trie: SIDTrie, num_samples: int, next_logprobs: NextLogprobs, *, num_beams: int,
                     top_k: int | None = None) -> list[list[tuple[tuple[int, ...], float]]]:
    """Per sample, its `top_k` (≤ num_beams) most likely valid SIDs as (token ids, log-prob), best first.

    Each round `next_logprobs` scores every live beam of every sample at once (one model batch); each sample keeps
    its `num_beams` best continuations, and those that complete an SID leave the search. A sample is done once its
    `top_k` best finished SIDs beat its best live beam (log-probs only fall as beams grow). With num_beams ≥ the
    number of items it is exact. Scorers: transformers (`constrained_beam_search`), vLLM
    (`rollouts.engine.RolloutWorker.beam_search_sids`).
    """
    top_k = num_beams if top_k is None else top_k
    if not 1 <= top_k <= num_beams:
        raise ValueError(f"top_k={top_k} must be between 1 and num_beams={num_beams}.")
    live: list[list[tuple[float, tuple[int, ...], int]]] = [[(0.0, (), ROOT)] for _ in range(num_samples)]
    finished: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in range(num_samples)]
    while queries := [(n, beam) for n, beams in enumerate(live) for beam in beams]:
        scored = next_logprobs([(n, seq) for n, (_, seq, _) in queries])
        if len(scored) != len(queries):
            raise ValueError(f"next_logprobs returned {len(scored)} results for {len(queries)} beams.")
        candidates: list[list[tuple[float, tuple[int, ...], int]]] = [[] for _ in range(num_samples)]
        for (n, (score, seq, node)), logprobs in zip(queries, scored, strict=True):
            for token in trie.allowed_at(node):
                lp = logprobs.get(token, float("-inf"))
                if lp > float("-inf"):
                    candidates[n].append((score + lp, (*seq, token), trie.step(node, token)))
        for n, cands in enumerate(candidates):
            cands.sort(key=lambda c: (-c[0], c[1]))  # ties broken by token ids: deterministic
            live[n] = []
            for score, seq, node in cands[:num_beams]:
                (finished[n].append((score, seq)) if trie.is_leaf(node) else live[n].append((score, seq, node)))
            finished[n].sort(key=lambda c: (-c[0], c[1]))
            if len(finished[n]) >= top_k and (not live[n] or live[n][0][0] <= finished[n][top_k - 1][0]):
                live[n] = []
    return [[(seq, score) for score, seq in done[:top_k]] for done in finished]


@torch.no_grad()
def constrained_beam_search(model: Any, prompt_ids: Sequence[int] | torch.Tensor, trie: SIDTrie, *, num_beams: int,
                            top_k: int | None = None) -> list[BeamHit]:
    """The `top_k` (≤ num_beams) most likely items under `model` after `prompt_ids`, searching only valid SIDs
    (`trie_beam_search` scored by the model's log-softmax over the allowed tokens, what masking the logits to the trie
    gives). Put the model in eval mode."""
    prompt_P = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()

    def next_logprobs(beams: list[Beam]) -> list[Mapping[int, float]]:
        suffix_BT = torch.tensor([seq for _, seq in beams], dtype=torch.long).reshape(len(beams), -1)
        logits_BV = _last_logits_BV(model, torch.cat([prompt_P.expand(len(beams), -1), suffix_BT], dim=1))
        out = []
        for b, (_, seq) in enumerate(beams):
            allowed = trie.allowed_tensor(trie.node_for(seq))
            out.append(dict(zip(allowed.tolist(), torch.log_softmax(logits_BV[b, allowed], dim=-1).tolist(),
                                strict=True)))
        return out

    (hits,) = trie_beam_search(trie, 1, next_logprobs, num_beams=num_beams, top_k=top_k)
    return [BeamHit(item_id=trie.item_for(seq), token_ids=seq, logprob=score) for seq, score in hits]


def constrained_greedy(model: Any, prompt_ids: Sequence[int] | torch.Tensor, trie: SIDTrie) -> BeamHit:
    """The greedy valid SID: at each step the most likely token the trie allows."""
    return constrained_beam_search(model, prompt_ids, trie, num_beams=1, top_k=1)[0]


@torch.no_grad()
def sample_sids(model: Any, prompt_ids: Sequence[int] | torch.Tensor, *, num_samples: int, trie: SIDTrie | None = None,
                num_tokens: int | None = None, allowed_ids: Sequence[int] | None = None, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
    """`num_samples` token sequences sampled after `prompt_ids`, constrained to valid SIDs when `trie` is given.

    With a trie, every sample stops at the end of a valid SID (at most `trie.max_depth` tokens). Without one,
    `num_tokens` tokens are sampled freely, or from `allowed_ids` only (e.g. all SID tokens: right token kinds, no
    guarantee that the combination names an item); that is the baseline that shows the trie doing the work.
    """
    if trie is None and num_tokens is None:
        raise ValueError("sample_sids without a trie needs num_tokens.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use constrained_greedy for greedy decoding).")
    steps = trie.max_depth if trie is not None and num_tokens is None else num_tokens
    prompt_P = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    input_ST = prompt_P.expand(num_samples, -1).clone()
    nodes = [ROOT] * num_samples
    outputs: list[list[int]] = [[] for _ in range(num_samples)]
    fixed_mask_V = None
    for _ in range(steps):
        logits_SV = _last_logits_BV(model, input_ST) / temperature
        if trie is not None:
            mask_SV = torch.full_like(logits_SV, float("-inf"))
            for s, node in enumerate(nodes):
                allowed = trie.allowed_tensor(node) if not trie.is_leaf(node) else torch.tensor([0])
                mask_SV[s, allowed] = 0.0  # finished samples draw a dummy token that is dropped below
            logits_SV = logits_SV + mask_SV
        elif allowed_ids is not None:
            if fixed_mask_V is None:
                fixed_mask_V = torch.full((logits_SV.shape[1],), float("-inf"))
                fixed_mask_V[torch.as_tensor(list(allowed_ids), dtype=torch.long)] = 0.0
            logits_SV = logits_SV + fixed_mask_V
        tokens_S = torch.multinomial(torch.softmax(logits_SV, dim=-1), 1, generator=generator).squeeze(1)
        for s, token in enumerate(tokens_S.tolist()):
            if trie is None:
                outputs[s].append(token)
            elif not trie.is_leaf(nodes[s]):
                outputs[s].append(token)
                nodes[s] = trie.step(nodes[s], token)
        input_ST = torch.cat([input_ST, tokens_S[:, None]], dim=1)
        if trie is not None and all(trie.is_leaf(n) for n in nodes):
            break
    return [tuple(o) for o in outputs]
