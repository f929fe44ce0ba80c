"""HEPO's level coder: generated semantic IDs read as per-level codes, with the trie's legal codes at each level and
the codes of the user's positive items (`rl.types.SIDLevels`, consumed by rl/hepo.py).

Level l's codes are numbered 0..V_l-1 in token order ("<a_0>", "<a_1>", ... as `SIDIndex.tokens` sorts them), and
V = max_l V_l. The legal codes at level l are the children of the chosen prefix z_<l in the index's trie — exactly
the choices trie-constrained decoding offered. A sample's positive items come from its metadata (`positives_key`,
a list of item ids; items without a SID are skipped).

Shape legend: N rollouts, L levels, V codes per level, P positive items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rl.types import ScoredRollout, SIDLevels
from rollouts.sid import SIDIndex, SIDIndexError


class SIDLevelCoder:
    """`LevelCoder` over one `SIDIndex` whose SIDs all have the same length L (residual k-means indexes do)."""

    def __init__(self, index: SIDIndex, token_to_id: Mapping[str, int], *,
                 positives_key: str = "positive_items") -> None:
        lengths = sorted({len(sid) for sid in index.sids.values()})
        if len(lengths) != 1:
            raise SIDIndexError(f"HEPO scores each semantic-ID level, so every SID must have the same length; this "
                                f"index has lengths {lengths}. Rebuild it with rollouts.sid.build_sid_index (its "
                                "collision level gives every item one length).")
        self.num_levels = lengths[0]
        ordered = index.tokens()  # by level prefix, then code number
        level_sets = [{sid[lv] for sid in index.sids.values()} for lv in range(self.num_levels)]
        level_tokens = [[t for t in ordered if t in level_set] for level_set in level_sets]
        self.num_codes = max(len(tokens) for tokens in level_tokens)
        code_of = [{token: code for code, token in enumerate(tokens)} for tokens in level_tokens]
        missing = [t for tokens in level_tokens for t in tokens if t not in token_to_id]
        if missing:
            raise SIDIndexError(f"{len(missing)} SID tokens (first: {missing[:3]}) are not in the tokenizer; add them "
                                "with rollouts.sid.add_sid_tokens.")
        # token id -> (level, code); a token may appear at one level only in the <x_n> scheme, but be general
        self._code_at: dict[tuple[int, int], int] = {
            (lv, token_to_id[token]): code for lv, codes in enumerate(code_of) for token, code in codes.items()}
        self.item_codes: dict = {item: tuple(code_of[lv][t] for lv, t in enumerate(sid))
                                 for item, sid in index.sids.items()}
        self._children: dict[tuple[int, ...], set[int]] = {}
        for codes in self.item_codes.values():
            for lv in range(self.num_levels):
                self._children.setdefault(codes[:lv], set()).add(codes[lv])
        self.positives_key = positives_key

    def codes(self, token_ids: Sequence[int], rollout_id: str = "") -> tuple[int, ...]:
        """The L codes of a completion's first L tokens; a ValueError when they are not a valid SID prefix."""
        out: list[int] = []
        for lv, token_id in enumerate(token_ids[: self.num_levels]):
            code = self._code_at.get((lv, int(token_id)))
            if code is None or code not in self._children.get(tuple(out), ()):
                raise ValueError(f"Rollout {rollout_id}: completion token {lv + 1} (id {token_id}) is not a valid "
                                 f"level-{lv + 1} semantic-ID code after {out}; HEPO needs trie-constrained "
                                 "rollouts (rollout.sid_index).")
            out.append(code)
        if len(out) < self.num_levels:
            raise ValueError(f"Rollout {rollout_id}: {len(out)} tokens, fewer than the {self.num_levels} SID levels.")
        return tuple(out)

    def legal(self, codes: Sequence[int]) -> torch.Tensor:
        """bool (L, V): the codes the trie allowed at each level after the prefix of `codes`."""
        legal_LV = torch.zeros(self.num_levels, self.num_codes, dtype=torch.bool)
        for lv in range(self.num_levels):
            legal_LV[lv, sorted(self._children[tuple(codes[:lv])])] = True
        return legal_LV

    def positive_codes(self, items: Sequence) -> torch.Tensor:
        """int64 (P, L): codes of the given items that have a SID."""
        rows = [self.item_codes[item] for item in items if item in self.item_codes]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.num_levels)

    def __call__(self, scored: Sequence[ScoredRollout]) -> SIDLevels:
        codes = [self.codes(s.rollout.completion_token_ids, s.rollout.rollout_id) for s in scored]
        by_sample: dict[str, torch.Tensor] = {}
        positives = []
        for s in scored:
            sample = s.rollout.sample
            if sample.sample_id not in by_sample:
                if self.positives_key not in sample.metadata:
                    raise KeyError(f"Sample {sample.sample_id} has no metadata[{self.positives_key!r}] (the user's "
                                   "positive items, whose codes give HEPO's process rewards).")
                by_sample[sample.sample_id] = self.positive_codes(sample.metadata[self.positives_key])
            positives.append(by_sample[sample.sample_id])
        return SIDLevels(codes_NL=torch.tensor(codes, dtype=torch.int64).reshape(len(codes), self.num_levels),
                         legal_NLV=torch.stack([self.legal(c) for c in codes]) if codes else
                         torch.zeros(0, self.num_levels, self.num_codes, dtype=torch.bool),
                         positive_codes=tuple(positives))
