"""Stage 2 of the Personalized Semantic Judge: the user-conditional aspect aggregator w(x), and its training pieces.

The judge (stage 1, an LLM served by vLLM; not in this module) grades a candidate item a for user x on four aspects,
`ASPECTS` = (profile fit, future interest, novelty, context), as discrete levels; `aspect_scores_from_levels` maps
levels 1..L to s(x, a) ∈ [0, 1]^4. The reward is

    r(x, a) = w(x)ᵀ s(x, a),    w(x) = softmax(MLP(features(x))) ∈ Δ³ (the probability simplex over the 4 aspects),

so r ∈ [0, 1]. w is learned from logged pairwise preferences (user x rated a above b) with a Bradley-Terry loss

    P(a ≻ b | x) = σ(β · w(x)ᵀ (s(x, a) − s(x, b))),    loss = −log P, averaged over pairs,

where β = exp(log_beta) > 0 is a learned scale (w·Δs lies in [−1, 1], too flat a logit on its own); β changes no
ranking and is not part of the reward.

User features x (`user_features_BF`, layout in `FeatureLayout`): one-hot age bucket, gender and occupation
(all zero for an unknown user), the genre profile of the items in the history rated >= 4 (genre counts / number of
such items), and log1p(history length) / log1p(1000).

Training labels: an LLM judge on CPU is far too slow to grade the thousands of (user, item) pairs that training
needs, so training uses cheap proxy aspect scores computed from MovieLens (`proxy_aspect_scores_N4`), all in [0, 1]:
- profile fit (long-term content taste): (1 + cos(g_a, t)) / 2, g_a the item's genre multi-hot and
  t = Σ_h (r_h − r̄) g_h over the history (genres of items rated above the user's mean minus those rated below);
- future interest (where the user is heading): the mean item-item co-rating cosine (`co_rating_cosine_II`, over the
  training histories of all users) between the item and the user's 10 most recent history items rated >= 4;
- novelty: 1 − the item's popularity percentile (share of items with fewer ratings in the training histories);
- context: exp(−|item year − median year of the history| / 10), 0.5 when either year is unknown (a stand-in for
  situational context, which MovieLens does not log).
The judge's levels replace these proxies at serving time; w(x) transfers insofar as the judge's aspects resemble them.

Shape legend: B = users (or pairs) in a batch, F = user features, G = genres, N = candidate items, P = pairs,
4 = aspects. This module imports neither ray, vllm nor deepspeed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.ecpm import AGE_BUCKETS, ArtifactError, age_bucket
from rewards.items import MOVIELENS_GENRES, UserInfo
from rl import assets

ASPECTS: tuple[str, ...] = ("profile_fit", "future_interest", "novelty", "context")
NUM_ASPECTS = len(ASPECTS)
RECENT_ITEMS = 10
"""How many of the most recent history items define "future interest"."""
LIKED_RATING = 4
CONFIG_VERSION = 1


def aspect_scores_from_levels(levels: Sequence[Sequence[int]], num_levels: int) -> torch.Tensor:
    """float32 [B, 4]: the judge's discrete levels 1..num_levels mapped linearly to [0, 1] ((level − 1) / (L − 1))."""
    levels_B4 = torch.tensor(levels, dtype=torch.float32).reshape(-1, NUM_ASPECTS)
    if num_levels < 2 or levels_B4.numel() and not bool(((levels_B4 >= 1) & (levels_B4 <= num_levels)).all()):
        raise ValueError(f"aspect levels must lie in 1..{num_levels} (num_levels >= 2), got {levels}.")
    return (levels_B4 - 1.0) / (num_levels - 1)


def aggregate(weights_B4: torch.Tensor, aspects_B4: torch.Tensor) -> torch.Tensor:
    """rewards_B = Σ_k w_k(x) · s_k(x, a)."""
    return (weights_B4 * aspects_B4).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# User features and proxy aspect scores.


@dataclass(frozen=True, kw_only=True)
class HistoryItem:
    """One rated item of a user's history (oldest first in a history)."""

    genres: tuple[str, ...]
    rating: int
    year: str = ""


@dataclass(frozen=True, kw_only=True)
class FeatureLayout:
    """The vocabularies behind `user_features_BF`; saved in the artifact so serving builds the same x."""

    age_buckets: tuple[str, ...] = tuple(label for _, label in AGE_BUCKETS)
    genders: tuple[str, ...] = ("F", "M")
    occupations: tuple[str, ...] = ()
    genres: tuple[str, ...] = MOVIELENS_GENRES

    @property
    def num_features(self) -> int:
        return len(self.age_buckets) + len(self.genders) + len(self.occupations) + len(self.genres) + 1


def genre_counts_G(histories: Sequence[Sequence[str]], genres: Sequence[str]) -> torch.Tensor:
    """float32 [G]: how many of the given items carry each genre."""
    position = {g: i for i, g in enumerate(genres)}
    counts_G = torch.zeros(len(genres))
    for item_genres in histories:
        for g in item_genres:
            if g in position:
                counts_G[position[g]] += 1.0
    return counts_G


def user_features_BF(layout: FeatureLayout, users: Sequence[UserInfo | None],
                     histories: Sequence[Sequence[HistoryItem]]) -> torch.Tensor:
    """float32 [B, F] user features x (see the module doc for the layout)."""
    rows = []
    for user, history in zip(users, histories, strict=True):
        demo = torch.zeros(len(layout.age_buckets) + len(layout.genders) + len(layout.occupations))
        if user is not None:
            offsets = (0, len(layout.age_buckets), len(layout.age_buckets) + len(layout.genders))
            for offset, vocab, value in zip(offsets, (layout.age_buckets, layout.genders, layout.occupations),
                                            (age_bucket(user.age), user.gender, user.occupation), strict=True):
                if value in vocab:
                    demo[offset + vocab.index(value)] = 1.0
        liked = [h.genres for h in history if h.rating >= LIKED_RATING]
        profile_G = genre_counts_G(liked, layout.genres) / max(len(liked), 1)
        length_1 = torch.tensor([math.log1p(len(history)) / math.log1p(1000)])
        rows.append(torch.cat([demo, profile_G, length_1]))
    return torch.stack(rows) if rows else torch.zeros(0, layout.num_features)


def _cosine_N(items_NG: torch.Tensor, profile_G: torch.Tensor) -> torch.Tensor:
    norms_N = items_NG.norm(dim=-1) * profile_G.norm()
    return torch.where(norms_N > 0, items_NG @ profile_G / norms_N.clamp(min=1e-12), torch.zeros_like(norms_N))


def proxy_aspect_scores_N4(history: Sequence[HistoryItem], item_genres_NG: torch.Tensor, item_years_N: torch.Tensor,
                           popularity_pct_N: torch.Tensor, cf_similarity_NH: torch.Tensor,
                           genres: Sequence[str] = MOVIELENS_GENRES) -> torch.Tensor:
    """float32 [N, 4] proxy aspect scores of N candidates for a user with `history` (H items, oldest first).

    item_genres_NG: genre multi-hot of the candidates (columns in `genres` order); item_years_N: release years, NaN
    when unknown; popularity_pct_N: popularity percentile in [0, 1]; cf_similarity_NH: item-item co-rating cosine
    between each candidate and each history item (in [0, 1]). Definitions in the module doc.
    """
    mean_rating = sum(h.rating for h in history) / max(len(history), 1)
    taste_G = torch.zeros(len(genres))
    for h in history:
        taste_G += (h.rating - mean_rating) * genre_counts_G([h.genres], genres)
    profile_N = (1.0 + _cosine_N(item_genres_NG, taste_G)) / 2.0
    recent_liked = [k for k, h in enumerate(history) if h.rating >= LIKED_RATING][-RECENT_ITEMS:]
    future_N = (cf_similarity_NH[:, recent_liked].mean(-1) if recent_liked
                else torch.zeros(len(item_genres_NG)))
    years = [float(h.year) for h in history if str(h.year).isdigit()]
    median_year = statistics.median(years) if years else math.nan
    distance_N = (item_years_N - median_year).abs()
    context_N = torch.where(distance_N.isnan(), torch.full_like(distance_N, 0.5), torch.exp(-distance_N / 10.0))
    return torch.stack([profile_N, future_N, 1.0 - popularity_pct_N, context_N], dim=-1)


def co_rating_cosine_II(user_item_UI: torch.Tensor) -> torch.Tensor:
    """float32 [I, I] item-item cosine of the binary "user rated item" columns (diagonal 0; unrated items 0)."""
    norm_I = user_item_UI.norm(dim=0).clamp(min=1e-12)
    sim_II = (user_item_UI.T @ user_item_UI) / norm_I[:, None] / norm_I[None, :]
    return sim_II.fill_diagonal_(0.0)


def popularity_percentiles(counts: Mapping[int, int], item_ids: Sequence[int]) -> dict[int, float]:
    """item id → share of the other items in `item_ids` with strictly fewer ratings (ties share the lowest rank)."""
    values = sorted(counts.get(i, 0) for i in item_ids)
    denom = max(len(values) - 1, 1)
    first_rank: dict[int, int] = {}
    for rank, v in enumerate(values):
        first_rank.setdefault(v, rank)
    return {i: first_rank[counts.get(i, 0)] / denom for i in item_ids}


# ---------------------------------------------------------------------------------------------------------------------
# The model, its loss and its training loop.


class AspectWeights(nn.Module):
    """x_BF → w_B4 on the simplex: softmax of a one-hidden-layer MLP; starts at uniform weights."""

    def __init__(self, num_features: int, *, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, NUM_ASPECTS))
        self.log_beta = nn.Parameter(torch.tensor(math.log(5.0)))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features_BF: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mlp(features_BF), dim=-1)


def bradley_terry_loss(weights_P4: torch.Tensor, diff_P4: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """−mean log σ(β · w(x)ᵀ (s(x, a) − s(x, b))) over P pairs, a the preferred item."""
    return -nn.functional.logsigmoid(log_beta.exp() * (weights_P4 * diff_P4).sum(-1)).mean()


def pairwise_accuracy(weights_P4: torch.Tensor, diff_P4: torch.Tensor) -> float:
    """Share of pairs with w·(s_a − s_b) > 0, a tie (== 0) counting 1/2."""
    margin_P = (weights_P4 * diff_P4).sum(-1)
    return float(((margin_P > 0).float() + 0.5 * (margin_P == 0).float()).mean())


def fit_aggregator(model: AspectWeights, features_UF: torch.Tensor, user_idx_P: torch.Tensor, diff_P4: torch.Tensor,
                   *, epochs: int = 30, batch_size: int = 4096, lr: float = 1e-2, weight_decay: float = 1e-4,
                   seed: int = 0, progress: Callable[[int], Any] | None = None) -> list[float]:
    """Adam on the Bradley-Terry loss; pair p belongs to user row user_idx_P[p]. Returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for _ in range(epochs):
        order_P = torch.randperm(len(diff_P4), generator=gen)
        total = 0.0
        for start in range(0, len(order_P), batch_size):
            rows = order_P[start:start + batch_size]
            loss = bradley_terry_loss(model(features_UF[user_idx_P[rows]]), diff_P4[rows], model.log_beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / max(len(order_P), 1))
        if progress is not None:
            progress(1)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# Artifact and the serving-side object the judge calls.


def default_aggregator_dir() -> Path:
    return assets.home() / "artifacts" / "aggregator"


@dataclass(frozen=True, kw_only=True)
class AspectAggregator:
    """w(x) ready to serve. The semantic judge calls `weights_B4(users, histories)` then `aggregate(w, s)`."""

    model: AspectWeights | None
    """None = uniform weights (`AspectAggregator.uniform()`)."""
    layout: FeatureLayout
    users: Mapping[int, UserInfo] = field(default_factory=dict)
    """Known users' demographics; other user ids are featurised from their history only."""
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls) -> AspectAggregator:
        """w(x) = (¼, ¼, ¼, ¼) for every user: the explicit no-artifact choice, never a silent fallback."""
        return cls(model=None, layout=FeatureLayout())

    @torch.no_grad()
    def weights_B4(self, user_ids: Sequence[int], histories: Sequence[Sequence[HistoryItem]]) -> torch.Tensor:
        if self.model is None:
            return torch.full((len(user_ids), NUM_ASPECTS), 1.0 / NUM_ASPECTS)
        features_BF = user_features_BF(self.layout, [self.users.get(u) for u in user_ids], histories)
        return self.model(features_BF)

    def score(self, user_ids: Sequence[int], histories: Sequence[Sequence[HistoryItem]],
              aspects_B4: torch.Tensor) -> list[float]:
        """r = w(x)ᵀ s(x, a) per row."""
        return aggregate(self.weights_B4(user_ids, histories), aspects_B4).tolist()


def save_aggregator(directory: Path, model: AspectWeights, layout: FeatureLayout, users: Mapping[int, UserInfo], *,
                    hidden: int, metrics: Mapping[str, Any]) -> Path:
    """Write `model.pt` and `config.json` (layout, users, metrics) into `directory`; config.json last."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model.pt")
    payload = {
        "version": CONFIG_VERSION, "aspects": list(ASPECTS), "hidden": hidden,
        "layout": {k: list(getattr(layout, k)) for k in ("age_buckets", "genders", "occupations", "genres")},
        "users": {str(k): [u.age, u.gender, u.occupation] for k, u in sorted(users.items())},
        "metrics": dict(metrics),
    }
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, directory / "config.json")
    return directory


def load_aggregator(directory: str | Path | None = None) -> AspectAggregator:
    """Load w(x) (default `$RECFORGE_HOME/artifacts/aggregator`); cached per (path, modification time)."""
    path = Path(directory).expanduser() if directory else default_aggregator_dir()
    if not (path / "config.json").is_file() or not (path / "model.pt").is_file():
        raise ArtifactError(f"No aspect aggregator at {path} (expected model.pt and config.json). Train one with "
                            f"`python -m rewards.train aggregator --out {path}`, or use AspectAggregator.uniform() "
                            "explicitly.")
    return _load_cached(str(path.resolve()), (path / "config.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> AspectAggregator:
    data = json.loads((Path(path) / "config.json").read_text())
    if data.get("version") != CONFIG_VERSION or tuple(data.get("aspects", ())) != ASPECTS:
        raise ArtifactError(f"{path}/config.json: version {data.get('version')!r} with aspects {data.get('aspects')}; "
                            f"this code reads version {CONFIG_VERSION} with aspects {ASPECTS}. Retrain it.")
    layout = FeatureLayout(**{k: tuple(v) for k, v in data["layout"].items()})
    model = AspectWeights(layout.num_features, hidden=data["hidden"])
    model.load_state_dict(torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    users = {int(k): UserInfo(age=a, gender=g, occupation=o) for k, (a, g, o) in data["users"].items()}
    return AspectAggregator(model=model, layout=layout, users=users, metrics=data.get("metrics", {}))
