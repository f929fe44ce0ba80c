"""`negative_feedback`: multi-day negative-feedback reward, and the FHR@K metric.

For a prompt of user u at time t0 (sample metadata "user_id" and "timestamp", unix seconds) and the recommended
item a, with the logged feedback of the window (t0, t0 + D days]:

    N  = items u rated <= 2 in the window                          (the user's own future negative feedback)
    C  = items rated <= 2 up to t0 + D days by u's k nearest neighbours, minus items u rated >= 4 by then
         (collaborative negatives; neighbours by Jaccard similarity between u's items rated up to t0 and each other
         user's items rated up to t0 + D days)
    P  = items u rated >= 4 in the window                          (future positives)

    penalty(a) = max( maxsim(a, N), λ · maxsim(a, C) ) − γ · maxsim(a, P)
    score(a)   = −penalty(a)

maxsim(a, S) = max over s in S of cos(v_a, v_s), 0 for an empty S. With λ = 1 the first term is maxsim over N ∪ C;
λ < 1 trusts other users' dislikes less than the user's own. The item vectors v come from an embedding file
(`embeddings=`: MiniLM item-text embeddings or any other, see `ItemSpace.load`) or, by default, the items' genre
multi-hot vectors (then all cosines lie in [0, 1]).

Sign: `penalty` is the quantity of the issue — maximal (1 − γ · maxsim(a, P)) for an item identical to a future
negative — and is reported as a component; the reward's `score` is −penalty so that, like every other reward, higher
is better and it can enter the weighted-sum combiner with a positive weight. With genre vectors the score lies in
[−1, γ]. `direction="predict"` is the other task (recipes/negfeedback_pgrpo): the policy predicts the item the user
will give negative feedback to, so score = +penalty (in [−γ, 1] with genre vectors) — near a future negative is good,
near a future positive is bad. An unparsable completion (rewards/items.py) gets `unparsed_score` (default −1, the
lowest score in either direction), `details["parsed"] = False` and component `parsed` = 0. A prompt without future
feedback scores 0 with `details["num_negatives"] == 0` and so on. A user who is not in the log, or missing
metadata, is an error.

FHR@K (Future Hit Rate on negatives, lower is better): 1 if any of the top-K recommended items is in N, else 0;
`fhr_at_k` for one list, averaged over prompts by the caller.

Shape legend: U = users, I = items in the log, H = embedding size. Imports neither ray, vllm nor deepspeed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rewards.api import reward
from rewards.ecpm import ArtifactError
from rewards.items import ITEM_ID_PATTERN, ITEM_PARSERS, generated_item, genre_multi_hot_NG, metadata_value, title_index
from rl import assets
from rl.types import RewardResult, Rollout

SECONDS_PER_DAY = 86_400
NEGATIVE_MAX_RATING = 2
"""A rating <= 2 is negative feedback (MovieLens)."""
POSITIVE_MIN_RATING = 4
"""A rating >= 4 is positive feedback."""


class Feedback(NamedTuple):
    item_id: int
    rating: int
    timestamp: int


def fhr_at_k(ranking: Sequence[int], negatives: set[int] | frozenset[int], k: int) -> float:
    """FHR@K: 1.0 if any of the first k recommended items is a future negative, else 0.0."""
    return 1.0 if any(item in negatives for item in ranking[:k]) else 0.0


def negative_feedback_penalty(sim_negative: float, sim_collaborative: float, sim_positive: float, *,
                              collab_weight: float, gamma: float) -> float:
    """max(maxsim(a, N), λ · maxsim(a, C)) − γ · maxsim(a, P) (see the module doc)."""
    return max(sim_negative, collab_weight * sim_collaborative) - gamma * sim_positive


@dataclass(frozen=True, kw_only=True)
class ItemSpace:
    """Unit-normalised item vectors; cos(a, b) is a dot product."""

    row_of: Mapping[int, int]
    vectors_NH: torch.Tensor
    source: str

    @classmethod
    def from_matrix(cls, item_ids: Sequence[int], vectors_NH: torch.Tensor, *, source: str = "matrix") -> ItemSpace:
        if vectors_NH.ndim != 2 or vectors_NH.shape[0] != len(item_ids):
            raise ValueError(f"item vectors have shape {tuple(vectors_NH.shape)}; expected [{len(item_ids)}, H], "
                             "one row per item id.")
        unit_NH = torch.nn.functional.normalize(vectors_NH.to(torch.float32), dim=-1)
        return cls(row_of={int(i): n for n, i in enumerate(item_ids)}, vectors_NH=unit_NH, source=source)

    @classmethod
    def from_genres(cls, genres_by_item: Mapping[int, Sequence[str]]) -> ItemSpace:
        ids = sorted(genres_by_item)
        return cls.from_matrix(ids, genre_multi_hot_NG([genres_by_item[i] for i in ids]), source="genres")

    @classmethod
    def load(cls, path: str | Path) -> ItemSpace:
        """Item embeddings from a file: the `.safetensors` cache of rollouts/embed.py (tensor "embeddings", metadata
        "item_ids"); a `.pt` file holding {"item_ids": [N], "embeddings": [N, H]}; or a `.pt` [max id + 1, H] tensor
        whose row i is item i (all-zero rows = no item)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ArtifactError(f"Item embedding file {path} does not exist.")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                ids = [int(i) for i in json.loads((handle.metadata() or {}).get("item_ids", "null") or "[]")]
                return cls.from_matrix(ids, handle.get_tensor("embeddings"), source=str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and {"item_ids", "embeddings"} <= set(obj):
            return cls.from_matrix([int(i) for i in obj["item_ids"]], torch.as_tensor(obj["embeddings"]),
                                   source=str(path))
        if isinstance(obj, torch.Tensor) and obj.ndim == 2:
            ids = [i for i in range(obj.shape[0]) if bool(obj[i].abs().sum() > 0)]
            return cls.from_matrix(ids, obj[ids], source=str(path))
        raise ArtifactError(f"{path}: expected a dict with 'item_ids' and 'embeddings' or a 2-D tensor, got "
                            f"{type(obj).__name__}.")

    def max_similarity(self, item_id: int, others: Sequence[int]) -> float:
        """max cos(item, o) over `others`; 0.0 when `others` is empty."""
        if not others:
            return 0.0
        missing = [i for i in [item_id, *others] if i not in self.row_of]
        if missing:
            raise KeyError(f"items {sorted(set(missing))[:10]} have no vector in the item space ({self.source})")
        rows = torch.tensor([self.row_of[i] for i in others])
        return float((self.vectors_NH[rows] @ self.vectors_NH[self.row_of[item_id]]).max())


@dataclass(frozen=True, kw_only=True)
class FeedbackSets:
    """The feedback of one prompt (user, t0, D): see the module doc."""

    negatives: frozenset[int]
    positives: frozenset[int]
    collaborative: frozenset[int]
    num_neighbours: int


class FeedbackLog:
    """Timestamped ratings of all users, indexed for window look-ups and Jaccard neighbours."""

    def __init__(self, by_user: Mapping[int, Sequence[Feedback]]) -> None:
        self.by_user = {u: sorted(seq, key=lambda f: f.timestamp) for u, seq in by_user.items()}
        self.users = sorted(self.by_user)
        self._urow = {u: n for n, u in enumerate(self.users)}
        self.item_ids = sorted({f.item_id for seq in self.by_user.values() for f in seq})
        col = {i: n for n, i in enumerate(self.item_ids)}
        self._time_UI = torch.full((len(self.users), len(self.item_ids)), float("inf"), dtype=torch.float64)
        self._rating_UI = torch.zeros(len(self.users), len(self.item_ids), dtype=torch.int8)
        for u, seq in self.by_user.items():
            for f in seq:
                self._time_UI[self._urow[u], col[f.item_id]] = float(f.timestamp)
                self._rating_UI[self._urow[u], col[f.item_id]] = f.rating

    def feedback(self, user_id: int, t0: float, *, days: float, num_neighbours: int) -> FeedbackSets:
        """N, P and C for a prompt of `user_id` at time `t0` with a window of `days` days."""
        if user_id not in self._urow:
            raise KeyError(f"user {user_id} is not in the feedback log ({len(self.users)} users); "
                           "the reward needs the user's logged future feedback")
        end = t0 + days * SECONDS_PER_DAY
        window = [f for f in self.by_user[user_id] if t0 < f.timestamp <= end]
        u = self._urow[user_id]
        history_I = (self._time_UI[u] <= t0).to(torch.float32)
        known_UI = (self._time_UI <= end).to(torch.float32)
        inter_U = known_UI @ history_I
        union_U = known_UI.sum(1) + history_I.sum() - inter_U
        jaccard_U = torch.where(union_U > 0, inter_U / union_U.clamp(min=1.0), torch.zeros_like(union_U))
        jaccard_U[u] = 0.0
        top = torch.topk(jaccard_U, min(num_neighbours, len(self.users))).indices
        top = top[jaccard_U[top] > 0]
        disliked_I = ((self._rating_UI[top] <= NEGATIVE_MAX_RATING) & (self._rating_UI[top] > 0)
                      & (known_UI[top] > 0)).any(0)
        liked_by_user_I = (self._rating_UI[u] >= POSITIVE_MIN_RATING) & (self._time_UI[u] <= end)
        collab = {self.item_ids[i] for i in torch.nonzero(disliked_I & ~liked_by_user_I).flatten().tolist()}
        return FeedbackSets(
            negatives=frozenset(f.item_id for f in window if f.rating <= NEGATIVE_MAX_RATING),
            positives=frozenset(f.item_id for f in window if f.rating >= POSITIVE_MIN_RATING),
            collaborative=frozenset(collab), num_neighbours=len(top),
        )


def score_item(space: ItemSpace, item_id: int, sets: FeedbackSets, *, collab_weight: float, gamma: float
               ) -> RewardResult:
    """The reward of recommending `item_id` given a prompt's feedback sets (see the module doc)."""
    sim_n = space.max_similarity(item_id, sorted(sets.negatives))
    sim_c = space.max_similarity(item_id, sorted(sets.collaborative))
    sim_p = space.max_similarity(item_id, sorted(sets.positives))
    penalty = negative_feedback_penalty(sim_n, sim_c, sim_p, collab_weight=collab_weight, gamma=gamma)
    components = {"penalty": penalty, "sim_negative": sim_n, "sim_collaborative": sim_c, "sim_positive": sim_p,
                  "hit_negative": float(item_id in sets.negatives), "parsed": 1.0}
    details = {"parsed": True, "item_id": item_id, "num_negatives": len(sets.negatives),
               "num_positives": len(sets.positives), "num_collaborative": len(sets.collaborative),
               "num_neighbours": sets.num_neighbours}
    return RewardResult(score=-penalty, components=components, details=details)


@functools.lru_cache(maxsize=2)
def _movielens(data_dir: str) -> tuple[FeedbackLog, dict[int, Any]]:
    from rollouts.envs.rec import RecData  # the loader other parts of RecForge use

    data = RecData.load_movielens(Path(data_dir))
    by_user = {u: [Feedback(x.item_id, x.rating, x.timestamp) for x in seq] for u, seq in data.by_user.items()}
    return FeedbackLog(by_user), data.items


@functools.lru_cache(maxsize=4)
def _space(embeddings: str | None, data_dir: str) -> ItemSpace:
    if embeddings:
        return ItemSpace.load(embeddings)
    return ItemSpace.from_genres({i: x.genres for i, x in _movielens(data_dir)[1].items()})


@reward("negative_feedback", deterministic=True)
def negative_feedback_reward(
    rollouts: Sequence[Rollout],
    *,
    days: float = 7.0,
    gamma: float = 0.5,
    collab_weight: float = 0.5,
    num_neighbours: int = 20,
    embeddings: str | None = None,
    data_dir: str | None = None,
    unparsed_score: float = -1.0,
    item_parser: str = "metadata",
    item_key: str = "candidate_item_id",
    item_pattern: str = ITEM_ID_PATTERN,
    direction: str = "avoid",
) -> list[RewardResult]:
    """−(max sim to future negatives (own, or λ · collaborative) − γ · max sim to future positives); higher = better.

    days: window D after the prompt's "timestamp"; gamma: γ; collab_weight: λ; num_neighbours: k.
    embeddings: item embedding file (see `ItemSpace.load`; e.g. rollouts/embed.py's MiniLM cache
        `$RECFORGE_HOME/embeddings/ml-100k-minilm.safetensors`); None = genre multi-hot vectors.
    data_dir: MovieLens directory (default: the prepared data asset).
    unparsed_score: score of a completion with no parsable, known item (default −1, as bad as a future negative).
    item_parser / item_key / item_pattern: where the item comes from (rewards/items.py).
    direction: "avoid" (a recommender that should stay away from future negatives: score = −penalty) or "predict"
        (a model that predicts the next negative feedback: score = +penalty).
    """
    if direction not in ("avoid", "predict"):
        raise ValueError(f"direction={direction!r} must be 'avoid' (score = −penalty) or 'predict' (score = +penalty).")
    if item_parser not in ITEM_PARSERS:
        raise ValueError(f"item_parser={item_parser!r} is not one of {ITEM_PARSERS}.")
    if days <= 0 or gamma < 0 or collab_weight < 0 or num_neighbours < 0:
        raise ValueError(f"need days > 0, gamma >= 0, collab_weight >= 0, num_neighbours >= 0; got days={days}, "
                         f"gamma={gamma}, collab_weight={collab_weight}, num_neighbours={num_neighbours}.")
    directory = str(Path(data_dir).expanduser().resolve()) if data_dir else str(assets.require("data"))
    log, items = _movielens(directory)
    space = _space(str(Path(embeddings).expanduser().resolve()) if embeddings else None, directory)
    titles = title_index(items) if item_parser == "title" else None
    sets_cache: dict[tuple[int, float], FeedbackSets] = {}
    out = []
    for r in rollouts:
        user_id = metadata_value(r, "user_id", int)
        t0 = float(metadata_value(r, "timestamp", (int, float)))
        found = generated_item(r, parser=item_parser, catalogue=items, item_key=item_key, pattern=item_pattern,
                               titles=titles)
        if found.item_id is None:
            out.append(RewardResult(score=unparsed_score, components={"parsed": 0.0},
                                    details={"parsed": False, "reason": found.reason, "raw": found.raw}))
            continue
        if (user_id, t0) not in sets_cache:
            sets_cache[(user_id, t0)] = log.feedback(user_id, t0, days=days, num_neighbours=num_neighbours)
        result = score_item(space, found.item_id, sets_cache[(user_id, t0)], collab_weight=collab_weight,
                            gamma=gamma)
        if direction == "predict":
            result = dataclasses.replace(result, score=result.components["penalty"])
        out.append(result)
    return out
