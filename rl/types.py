"""Data that crosses actor boundaries: frozen dataclasses with documented shapes and dtypes.

Everything a rollout worker, a reward service or a learner hands to another process is one of these types. They are
plain Python (tuples of ints/floats) so they pickle cheaply through Ray and serialise to JSONL for rollout files;
tensors appear only in `TrainBatch`, which is built on the driver and sent to learners.

Shape legend used across RecForge: B = sequences in a batch, T = tokens per (padded) sequence, N = flattened rows,
G = samples in one group (same prompt), V = vocabulary, H = hidden size, L = semantic-ID levels.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ROLLOUT_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One prompt drawn from a dataset or environment; a group of G rollouts is sampled from it."""

    sample_id: str
    """Stable id (dataset index or user/item key); rollout ids derive from it."""
    prompt: str
    """The prompt text exactly as given to the tokenizer (chat template already applied)."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """JSON-serialisable task data rewards need: user id, item id, held-out rating, positives, candidates, ..."""


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One sampled completion. `logprobs` are the sampler's log-probs of each completion token."""

    rollout_id: str
    """`"{sample_id}/{index}"`: unique within a step, used to detect lost or duplicated rollouts."""
    sample: Sample
    index: int
    """Position within its group, 0 <= index < G."""
    prompt_token_ids: tuple[int, ...]
    completion_token_ids: tuple[int, ...]
    text: str
    """Decoded completion (no prompt)."""
    logprobs: tuple[float, ...]
    """Sampler log-prob of each completion token, len == len(completion_token_ids)."""
    finish_reason: str
    """"stop" (EOS or stop string) or "length" (hit max tokens)."""
    policy_version: int
    """Learner step whose weights produced this rollout (0 = initial weights)."""
    action_mask: tuple[int, ...] | None = None
    """Multi-turn rollouts: 1 on completion tokens the policy sampled (actions), 0 on tokens the environment inserted
    (observations, tool output), len == len(completion_token_ids); observation tokens carry log-prob 0 and never
    enter the loss. None = every completion token is an action (single-turn)."""
    reward_hint: float | None = None
    """Multi-turn rollouts: the environment's own return for the trajectory (e.g. task success), for rewards that
    read it; None for single-turn."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """JSON-serialisable extras from multi-turn rollouts (turns, parse errors, milestones); empty for single-turn."""
    allowed_token_ids: tuple[tuple[int, ...], ...] | None = None
    """Constrained decoding (semantic IDs): per completion token, the token ids the sampler's logits mask allowed
    there (() = the whole vocabulary at that position), len == len(completion_token_ids). `logprobs` are then those
    of the masked distribution, and the learner renormalises over the same sets. None = unconstrained."""

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.completion_token_ids):
            raise ValueError(
                f"Rollout {self.rollout_id}: {len(self.logprobs)} log-probs for "
                f"{len(self.completion_token_ids)} completion tokens; they must be equal."
            )
        if self.action_mask is not None and len(self.action_mask) != len(self.completion_token_ids):
            raise ValueError(
                f"Rollout {self.rollout_id}: action_mask has {len(self.action_mask)} entries for "
                f"{len(self.completion_token_ids)} completion tokens; they must be equal."
            )
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) != len(self.completion_token_ids):
                raise ValueError(
                    f"Rollout {self.rollout_id}: allowed_token_ids has {len(self.allowed_token_ids)} entries for "
                    f"{len(self.completion_token_ids)} completion tokens; they must be equal."
                )
            for position, (token, allowed) in enumerate(zip(self.completion_token_ids, self.allowed_token_ids,
                                                            strict=True)):
                if allowed and token not in allowed:
                    raise ValueError(
                        f"Rollout {self.rollout_id}: completion token {position} (id {token}) is not among the "
                        f"{len(allowed)} ids allowed there; the constraint and the sampled tokens disagree."
                    )

    @property
    def completion_hash(self) -> str:
        """sha1 of the completion text: part of the reward cache key."""
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class SIDBeam:
    """One result of trie-constrained beam search: a complete semantic ID and its log-probability."""

    token_ids: tuple[int, ...]
    text: str
    """The decoded SID tokens (what `SIDIndex.parse` reads)."""
    logprob: float
    """Sum over its tokens of log p(token), each renormalised over the tokens the trie allowed there."""


@dataclass(frozen=True, kw_only=True)
class RewardResult:
    """A reward's verdict on one rollout: a finite scalar score plus named components and free-form details."""

    score: float
    components: Mapping[str, float] = field(default_factory=dict)
    """Named sub-scores, logged as `reward/<reward>/<component>`."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Anything for inspection (parsed answer, judge verdicts); JSON-serialisable."""

    @property
    def is_finite(self) -> bool:
        return math.isfinite(self.score) and all(math.isfinite(v) for v in self.components.values())


@dataclass(frozen=True, kw_only=True)
class ScoredRollout:
    """A rollout with its combined reward and each reward's result, keyed by reward name."""

    rollout: Rollout
    reward: float
    results: Mapping[str, RewardResult]


@dataclass(frozen=True, kw_only=True)
class TrainBatch:
    """A padded batch for the learner, right-padded. All tensors on CPU; learners move them to their device.

    input_ids_BT: int64, prompt + completion tokens.
    attention_mask_BT: int64, 1 on real tokens.
    loss_mask_BT: float32, 1 on completion tokens that enter the loss (aligned with input_ids: position t is the
        token predicted from position t-1).
    old_logprobs_BT: float32, sampler log-probs at completion positions, 0 elsewhere.
    advantages_BT: float32, per-token advantages (group advantages broadcast over completion tokens).
    group_ids_B: int64, which group each sequence belongs to.
    level_positions_BL: int64 or None. HEPO (per-level actions, rl/hepo.py): position in input_ids of the token chosen
        at each of the L semantic-ID levels; the value head reads the hidden state one position earlier (the state
        before the choice). None for token-level algorithms.
    returns_BL: float32 or None. HEPO: the value head's regression targets (GAE returns) per level.
    allowed_positions_BC: int64 or None. Constrained decoding (`Rollout.allowed_token_ids`): position in input_ids
        of each constrained completion token, -1 padding. None = no sequence was constrained.
    allowed_ids_BCA: int64 or None. The token ids allowed at each of those positions, -1 padding; the learner's
        log-prob and entropy there are over these ids only (the distribution the sampler drew from).
"""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor
    group_ids_B: torch.Tensor
    level_positions_BL: torch.Tensor | None = None
    returns_BL: torch.Tensor | None = None
    allowed_positions_BC: torch.Tensor | None = None
    allowed_ids_BCA: torch.Tensor | None = None

    def rows(self, lo: int, hi: int, *, width: int | None = None) -> TrainBatch:
        """Sequences lo..hi-1 (and the first `width` columns when given), per-level and constraint fields included."""
        cols = slice(None) if width is None else slice(0, width)
        levels = lambda t: None if t is None else t[lo:hi]  # noqa: E731
        return TrainBatch(
            input_ids_BT=self.input_ids_BT[lo:hi, cols], attention_mask_BT=self.attention_mask_BT[lo:hi, cols],
            loss_mask_BT=self.loss_mask_BT[lo:hi, cols], old_logprobs_BT=self.old_logprobs_BT[lo:hi, cols],
            advantages_BT=self.advantages_BT[lo:hi, cols], group_ids_B=self.group_ids_B[lo:hi],
            level_positions_BL=levels(self.level_positions_BL), returns_BL=levels(self.returns_BL),
            allowed_positions_BC=levels(self.allowed_positions_BC), allowed_ids_BCA=levels(self.allowed_ids_BCA),
        )

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids_BT.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask_BT.sum().item())


@dataclass(frozen=True, kw_only=True)
class SIDLevels:
    """HEPO's view of N generated semantic IDs (rl/hepo.py), built on the driver by the recipe's level coder.

    codes_NL: int64 (N, L), the code chosen at each level (0..V-1 in the level's own numbering).
    legal_NLV: bool (N, L, V), the codes the trie allowed at level l after the chosen prefix (what the decoder could
        pick), V = the most codes any level has.
    positive_codes: N int64 tensors (P_n, L), the codes of the sample's user's positive items (P_n may be 0); the
        user's code popularity P_l(t) comes from them (`rl.advantages.code_popularity`).
    """

    codes_NL: torch.Tensor
    legal_NLV: torch.Tensor
    positive_codes: tuple[torch.Tensor, ...]

    @property
    def num_levels(self) -> int:
        return int(self.codes_NL.shape[1])

    @property
    def num_codes(self) -> int:
        return int(self.legal_NLV.shape[2])


@dataclass(frozen=True, kw_only=True)
class TokenCompletion:
    """One completion of `rollouts.engine.RolloutWorker.generate_tokens` (multi-turn rollouts): the sampled ids
    exactly as vLLM produced them."""

    token_ids: tuple[int, ...]
    """Sampled token ids, EOS included when the model stopped on it."""
    logprobs: tuple[float, ...]
    """Processed (tempered, top-p) sampler log-prob of each sampled id; zeros for greedy (temperature 0) requests."""
    text: str
    """vLLM's decoded text of the completion (special tokens skipped), what the environment executes."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (hit max_new_tokens)."""
