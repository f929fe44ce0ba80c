"""`ecpm`: business value of the recommended item, eCPM = 1000 · bid · pCTR (· pCVR), normalised per request group.

- pCTR comes from a compact DeepFM (Guo et al. 2017: a first-order linear term, a factorisation-machine second-order
  term and an MLP, all over shared field embeddings) over seven fields: user id, age bucket, gender, occupation,
  item id, release-year decade, and genres (multi-valued, mean-pooled). It is trained by
  `python -m rewards.train ctr` on MovieLens-100K (rating >= 4 is the click proxy, negatives are sampled unseen
  items, time-based split; see rewards/train.py) and saved as an artifact directory: `model.pt` (state dict) and
  `vocab.json` (feature vocabularies, the user/item feature tables, model hyper-parameters and held-out metrics), so
  the reward needs no dataset at scoring time. Default location: `$RECFORGE_HOME/artifacts/ctr`.
- bids: a user-supplied table (`bids=` a CSV `item_id,bid` or a JSON object `{"<item id>": bid}`), in currency units
  per click. Without one, `synthetic_bid` gives every catalogue item a deterministic bid in [0.10, 2.00) derived from
  sha256 of its id and genres. These bids are SYNTHETIC, made up for the demo data: MovieLens has no ads or bids.
- pCVR (optional): a table like the bids (`pcvr=` path), a conversion probability per item; absent = factor 1.

Normalisation (`normalize=`): the score is computed over the rollouts of one request group (same `sample_id`) in the
call. "minmax" (default): (e − min) / (max − min) ∈ [0, 1], and 0 for every rollout of a group whose eCPMs are all
equal; "zscore": (e − mean) / std (population std), 0 if std is 0; "none": the raw eCPM. The service keeps groups
together in a micro-batch when `batch_size` >= the group size; a group split across calls is normalised per part.
Because the score depends on the other rollouts of the group, the reward is registered deterministic=False (a cached
score would be relative to another group).

An unparsable completion (see rewards/items.py) recommends nothing, so it earns nothing: raw eCPM 0, which enters
the group's normalisation (it is the group minimum), `details["parsed"] = False` with the reason, and component
`parsed` = 0. Missing `user_id` metadata, a missing artifact or a bid table without the item are errors.

Shape legend: B = (user, item) pairs scored together, F = single-valued fields (6), K = genres per item (padded),
D = embedding size. This module imports neither ray, vllm nor deepspeed.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.api import reward
from rewards.items import (
    ITEM_ID_PATTERN,
    ITEM_PARSERS,
    ItemInfo,
    UserInfo,
    generated_item,
    metadata_value,
    sid_index_for,
    title_index,
)
from rl import assets
from rl.types import RewardResult, Rollout

SPARSE_FIELDS: tuple[str, ...] = ("user_id", "age_bucket", "gender", "occupation", "item_id", "year_bucket")
"""The single-valued fields, in column order of `sparse_BF`; the multi-valued `genre` field is `genres_BK`."""
AGE_BUCKETS: tuple[tuple[int, str], ...] = (
    (0, "<18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"),
)
"""(lower bound, label): MovieLens-1M's age groups, applied to MovieLens-100K's exact ages."""
NORMALIZE_MODES: tuple[str, ...] = ("minmax", "zscore", "none")
VOCAB_VERSION = 1


class ArtifactError(ValueError):
    """A model artifact is missing or unreadable; the message says which path and how to produce it."""


def age_bucket(age: int | None) -> str:
    """The `AGE_BUCKETS` label of an age; "" (the unknown index) for None."""
    return "" if age is None else [label for low, label in AGE_BUCKETS if age >= low][-1]


def year_bucket(year: str) -> str:
    """Release decade ("1990s"), "<1940" before 1940, "unknown" for a missing year."""
    if not str(year).strip().isdigit():
        return "unknown"
    y = int(year)
    return "<1940" if y < 1940 else f"{y // 10 * 10}s"


def ecpm(bid: float, pctr: float, pcvr: float = 1.0) -> float:
    """eCPM = 1000 · bid · pCTR · pCVR: expected revenue per thousand impressions at cost-per-click `bid`."""
    return 1000.0 * bid * pctr * pcvr


def synthetic_bid(item_id: int, genres: Sequence[str]) -> float:
    """SYNTHETIC demo bid in [0.10, 2.00): 0.10 + 1.90 · u, u = first 8 bytes of sha256("<id>|<genres>") / 2^64."""
    digest = hashlib.sha256(f"{item_id}|{'|'.join(sorted(genres))}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return round(0.10 + 1.90 * u, 4)


def load_value_table(path: str | Path, *, what: str = "bid") -> dict[int, float]:
    """item id → non-negative finite value, from a CSV (first two columns: item id, value; a header row is allowed)
    or a JSON object {"<item id>": value}. Errors name the file and the row."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"The {what} table {path} does not exist.")
    rows: list[tuple[str, Any, str]] = []
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{\"<item id>\": {what}}}, got {type(data).__name__}.")
        rows = [(k, v, f"key {k!r}") for k, v in data.items()]
    else:
        with path.open(newline="") as handle:
            for line_no, cols in enumerate(csv.reader(handle), start=1):
                if not cols or (line_no == 1 and not cols[0].strip().isdigit()):
                    continue  # blank line or header
                if len(cols) < 2:
                    raise ValueError(f"{path}:{line_no}: expected 'item_id,{what}', got {cols!r}.")
                rows.append((cols[0], cols[1], f"line {line_no}"))
    table = {}
    for key, value, where in rows:
        try:
            item_id, number = int(str(key).strip()), float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} {where}: item id {key!r} / {what} {value!r} is not a number.") from err
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{path} {where}: {what} {number} for item {item_id} must be finite and >= 0.")
        table[item_id] = number
    return table


def normalise_in_groups(values: Sequence[float], group_ids: Sequence[str], mode: str) -> list[float]:
    """Normalise `values` within each group of equal `group_ids` ("minmax", "zscore" or "none"; see module doc)."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize={mode!r} is not one of {NORMALIZE_MODES}.")
    if mode == "none":
        return [float(v) for v in values]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(values)
    for idx in members.values():
        group = [float(values[i]) for i in idx]
        if mode == "minmax":
            low, span = min(group), max(group) - min(group)
            normed = [(v - low) / span if span > 0 else 0.0 for v in group]
        else:
            mean = sum(group) / len(group)
            std = math.sqrt(sum((v - mean) ** 2 for v in group) / len(group))
            normed = [(v - mean) / std if std > 1e-12 else 0.0 for v in group]
        for i, v in zip(idx, normed, strict=True):
            out[i] = v
    return out


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting 1/2
    (Mann-Whitney U with average ranks)."""
    pairs = sorted(zip(scores, labels, strict=True), key=lambda x: x[0])
    num_pos = sum(1 for _, y in pairs if y)
    num_neg = len(pairs) - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"AUC needs both classes; got {num_pos} positives and {num_neg} negatives.")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based average rank of the tie block
        rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


# ---------------------------------------------------------------------------------------------------------------------
# Features and the DeepFM model.


@dataclass(frozen=True, kw_only=True)
class CtrVocab:
    """Feature vocabularies (index 0 = unknown in every field; 0 = padding for genres) and the feature tables."""

    values: Mapping[str, tuple[str, ...]]
    """field → its known values; value v of field f has index values[f].index(v) + 1."""
    genres: tuple[str, ...]
    users: Mapping[int, UserInfo]
    items: Mapping[int, ItemInfo]

    @classmethod
    def build(cls, users: Mapping[int, UserInfo], items: Mapping[int, ItemInfo]) -> CtrVocab:
        values = {
            "user_id": tuple(str(u) for u in sorted(users)),
            "age_bucket": tuple(label for _, label in AGE_BUCKETS),
            "gender": tuple(sorted({u.gender for u in users.values()})),
            "occupation": tuple(sorted({u.occupation for u in users.values()})),
            "item_id": tuple(str(i) for i in sorted(items)),
            "year_bucket": tuple(sorted({year_bucket(i.year) for i in items.values()})),
        }
        genres = tuple(sorted({g for i in items.values() for g in i.genres}))
        return cls(values=values, genres=genres, users=dict(users), items=dict(items))

    @functools.cached_property
    def _index(self) -> dict[str, dict[str, int]]:
        return {f: {v: i + 1 for i, v in enumerate(vals)} for f, vals in self.values.items()}

    @property
    def field_sizes(self) -> list[int]:
        return [len(self.values[f]) + 1 for f in SPARSE_FIELDS]

    @property
    def max_genres(self) -> int:
        return max((len(i.genres) for i in self.items.values()), default=1) or 1

    def encode(self, user_ids: Sequence[int], item_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse_BF int64, genres_BK int64) for B (user, item) pairs; unknown users/items get index 0."""
        idx, genre_idx = self._index, {g: i + 1 for i, g in enumerate(self.genres)}
        sparse, genres = [], []
        for user_id, item_id in zip(user_ids, item_ids, strict=True):
            user, item = self.users.get(user_id), self.items.get(item_id)
            row = {
                "user_id": str(user_id), "item_id": str(item_id),
                "age_bucket": age_bucket(user.age) if user else "", "gender": user.gender if user else "",
                "occupation": user.occupation if user else "", "year_bucket": year_bucket(item.year) if item else "",
            }
            sparse.append([idx[f].get(row[f], 0) for f in SPARSE_FIELDS])
            g = [genre_idx[x] for x in (item.genres if item else ()) if x in genre_idx][: self.max_genres]
            genres.append(g + [0] * (self.max_genres - len(g)))
        return torch.tensor(sparse, dtype=torch.int64), torch.tensor(genres, dtype=torch.int64)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VOCAB_VERSION, "values": {f: list(v) for f, v in self.values.items()},
            "genres": list(self.genres),
            "users": {str(k): [u.age, u.gender, u.occupation] for k, u in sorted(self.users.items())},
            "items": {str(k): [i.title, i.year, list(i.genres)] for k, i in sorted(self.items.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CtrVocab:
        if data.get("version") != VOCAB_VERSION:
            raise ArtifactError(f"vocab.json version {data.get('version')!r}, this code reads {VOCAB_VERSION}.")
        return cls(
            values={f: tuple(v) for f, v in data["values"].items()}, genres=tuple(data["genres"]),
            users={int(k): UserInfo(age=a, gender=g, occupation=o) for k, (a, g, o) in data["users"].items()},
            items={int(k): ItemInfo(title=t, year=y, genres=tuple(gs)) for k, (t, y, gs) in data["items"].items()},
        )


class DeepFM(nn.Module):
    """logit = bias + Σ_f w_f + FM(e_1..e_7) + MLP([e_1; ...; e_7]); the genre field's e and w are mean-pooled."""

    def __init__(self, field_sizes: Sequence[int], num_genres: int, *, embed_dim: int = 16,
                 hidden: Sequence[int] = (64, 32), dropout: float = 0.1) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, embed_dim) for n in field_sizes)
        self.linears = nn.ModuleList(nn.Embedding(n, 1) for n in field_sizes)
        self.genre_embed = nn.Embedding(num_genres + 1, embed_dim, padding_idx=0)
        self.genre_linear = nn.Embedding(num_genres + 1, 1, padding_idx=0)
        layers: list[nn.Module] = []
        width = embed_dim * (len(field_sizes) + 1)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        self.bias = nn.Parameter(torch.zeros(()))
        for emb in [*self.embeds, self.genre_embed, *self.linears, self.genre_linear]:
            nn.init.normal_(emb.weight, std=0.01)
        with torch.no_grad():
            self.genre_embed.weight[0].zero_()
            self.genre_linear.weight[0].zero_()

    def forward(self, sparse_BF: torch.Tensor, genres_BK: torch.Tensor) -> torch.Tensor:
        """Click logits_B."""
        mask_BK1 = (genres_BK > 0).unsqueeze(-1).float()
        count_B1 = mask_BK1.sum(1).clamp(min=1.0)
        genre_BD = (self.genre_embed(genres_BK) * mask_BK1).sum(1) / count_B1
        fields_BFD = torch.stack([emb(sparse_BF[:, f]) for f, emb in enumerate(self.embeds)] + [genre_BD], dim=1)
        first_B = sum(lin(sparse_BF[:, f]).squeeze(-1) for f, lin in enumerate(self.linears))
        first_B = first_B + ((self.genre_linear(genres_BK) * mask_BK1).sum(1) / count_B1).squeeze(-1)
        # FM second order: Σ_{i<j} <e_i, e_j> = ½ (‖Σ e‖² − Σ ‖e‖²)
        fm_B = 0.5 * (fields_BFD.sum(1).pow(2) - fields_BFD.pow(2).sum(1)).sum(-1)
        deep_B = self.mlp(fields_BFD.flatten(1)).squeeze(-1)
        return self.bias + first_B + fm_B + deep_B


def fit_ctr(model: DeepFM, sparse_NF: torch.Tensor, genres_NK: torch.Tensor, labels_N: torch.Tensor, *,
            epochs: int = 3, batch_size: int = 1024, lr: float = 2e-3, weight_decay: float = 1e-6,
            oov_rate: float = 0.05, seed: int = 0, progress: Callable[[int], Any] | None = None) -> list[float]:
    """Train with binary cross-entropy (Adam); returns the mean loss per epoch.

    oov_rate: each step replaces that share of user and item ids by the unknown index 0, so index 0 learns an
    average user/item and users or items first seen after training (cold start, the time split's test period, users
    outside MovieLens) get a sensible pCTR from their other features. `progress(num_rows)` is called per batch.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    id_cols = [SPARSE_FIELDS.index("user_id"), SPARSE_FIELDS.index("item_id")]
    losses = []
    model.train()
    for _ in range(epochs):
        order_N = torch.randperm(len(labels_N), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order_N), batch_size):
            rows = order_N[start:start + batch_size]
            sparse_BF = sparse_NF[rows].clone()
            drop_B2 = torch.rand(len(rows), len(id_cols), generator=gen) < oov_rate
            sparse_BF[:, id_cols] = sparse_BF[:, id_cols].masked_fill(drop_B2, 0)
            loss = nn.functional.binary_cross_entropy_with_logits(model(sparse_BF, genres_NK[rows]), labels_N[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(rows), count + len(rows)
            if progress is not None:
                progress(len(rows))
        losses.append(total / max(count, 1))
    model.eval()
    return losses


@torch.no_grad()
def predict_ctr(model: DeepFM, sparse_NF: torch.Tensor, genres_NK: torch.Tensor, *, batch_size: int = 8192
                ) -> torch.Tensor:
    """Click probabilities_N (eval mode)."""
    model.eval()
    parts = [torch.sigmoid(model(sparse_NF[s:s + batch_size], genres_NK[s:s + batch_size]))
             for s in range(0, len(sparse_NF), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


# ---------------------------------------------------------------------------------------------------------------------
# Artifacts.


def default_ctr_dir() -> Path:
    return assets.home() / "artifacts" / "ctr"


@dataclass(frozen=True, kw_only=True)
class CtrArtifact:
    """A trained CTR model with its vocabulary; `pctr(users, items)` scores pairs."""

    model: DeepFM
    vocab: CtrVocab
    config: Mapping[str, Any]
    metrics: Mapping[str, Any]

    def pctr(self, user_ids: Sequence[int], item_ids: Sequence[int]) -> list[float]:
        sparse_BF, genres_BK = self.vocab.encode(user_ids, item_ids)
        return predict_ctr(self.model, sparse_BF, genres_BK).tolist()


def save_ctr(directory: Path, model: DeepFM, vocab: CtrVocab, *, config: Mapping[str, Any],
             metrics: Mapping[str, Any]) -> Path:
    """Write `model.pt` and `vocab.json` into `directory` (created); vocab.json last, so its presence means done."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "model.pt")
    payload = {**vocab.to_json(), "model": dict(config), "metrics": dict(metrics)}
    tmp = directory / "vocab.json.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, directory / "vocab.json")
    return directory


def load_ctr(directory: str | Path | None = None) -> CtrArtifact:
    """Load a CTR artifact (default `$RECFORGE_HOME/artifacts/ctr`); cached per (path, modification time)."""
    path = Path(directory).expanduser() if directory else default_ctr_dir()
    vocab_file = path / "vocab.json"
    if not vocab_file.is_file() or not (path / "model.pt").is_file():
        raise ArtifactError(f"No CTR model at {path} (expected model.pt and vocab.json). Train one with "
                            f"`python -m rewards.train ctr --out {path}`, or pass ctr_model=<artifact dir>.")
    return _load_ctr_cached(str(path.resolve()), vocab_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_ctr_cached(path: str, mtime_ns: int) -> CtrArtifact:
    data = json.loads((Path(path) / "vocab.json").read_text())
    vocab, config = CtrVocab.from_json(data), data["model"]
    model = DeepFM(vocab.field_sizes, len(vocab.genres), embed_dim=config["embed_dim"],
                   hidden=config["hidden"], dropout=config["dropout"])
    model.load_state_dict(torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    return CtrArtifact(model=model, vocab=vocab, config=config, metrics=data.get("metrics", {}))


@functools.lru_cache(maxsize=8)
def _table(path: str, what: str) -> dict[int, float]:
    return load_value_table(path, what=what)


# ---------------------------------------------------------------------------------------------------------------------
# The reward.


@reward("ecpm", deterministic=False)  # group-normalised: a rollout's score depends on the rest of its group
def ecpm_reward(
    rollouts: Sequence[Rollout],
    *,
    ctr_model: str | None = None,
    bids: str | None = None,
    pcvr: str | None = None,
    missing_bid: float | None = None,
    item_parser: str = "metadata",
    item_key: str = "candidate_item_id",
    item_pattern: str = ITEM_ID_PATTERN,
    sid_index: str | None = None,
    normalize: str = "minmax",
) -> list[RewardResult]:
    """eCPM = 1000 · bid · pCTR (· pCVR) of the recommended item, normalised per request group (default min-max).

    ctr_model: CTR artifact directory (default `$RECFORGE_HOME/artifacts/ctr`, from `python -m rewards.train ctr`).
    bids: item → bid table (CSV/JSON); None = the SYNTHETIC demo bids of `synthetic_bid`.
    pcvr: item → pCVR table (CSV/JSON); None = no conversion factor.
    missing_bid: bid for items absent from the `bids` table (None = such an item is an error).
    item_parser / item_key / item_pattern / sid_index: where the item comes from (rewards/items.py; sid_index is the
    index JSON of item_parser "sid").
    normalize: "minmax", "zscore" or "none" within each group of the same sample_id.
    """
    if item_parser not in ITEM_PARSERS:
        raise ValueError(f"item_parser={item_parser!r} is not one of {ITEM_PARSERS}.")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize={normalize!r} is not one of {NORMALIZE_MODES}.")
    art = load_ctr(ctr_model)
    bid_table = _table(str(Path(bids).expanduser().resolve()), "bid") if bids else None
    pcvr_table = _table(str(Path(pcvr).expanduser().resolve()), "pcvr") if pcvr else None
    titles = title_index(art.vocab.items) if item_parser == "title" else None
    sids = sid_index_for(item_parser, sid_index)
    users = [metadata_value(r, "user_id", int) for r in rollouts]
    found = [generated_item(r, parser=item_parser, catalogue=art.vocab.items, item_key=item_key,
                            pattern=item_pattern, titles=titles, sid_index=sids) for r in rollouts]
    parsed = [i for i, g in enumerate(found) if g.item_id is not None]
    pctrs = dict(zip(parsed, art.pctr([users[i] for i in parsed], [found[i].item_id for i in parsed]), strict=True))
    raw, parts = [0.0] * len(rollouts), [{} for _ in rollouts]
    for i in parsed:
        item_id = found[i].item_id
        bid = _lookup(bid_table, item_id, "bid", missing_bid) if bid_table is not None else synthetic_bid(
            item_id, art.vocab.items[item_id].genres)
        cvr = _lookup(pcvr_table, item_id, "pcvr", None) if pcvr_table is not None else 1.0
        raw[i] = ecpm(bid, pctrs[i], cvr)
        parts[i] = {"pctr": pctrs[i], "bid": bid} | ({"pcvr": cvr} if pcvr_table is not None else {})
    scores = normalise_in_groups(raw, [r.sample.sample_id for r in rollouts], normalize)
    out = []
    for i, g in enumerate(found):
        ok = g.item_id is not None
        details: dict[str, Any] = {"parsed": ok, "item_id": g.item_id, "ecpm": raw[i], "normalize": normalize}
        if not ok:
            details |= {"reason": g.reason, "raw": g.raw}
        out.append(RewardResult(score=scores[i], components={"ecpm": raw[i], "parsed": float(ok), **parts[i]},
                                details=details))
    return out


def _lookup(table: Mapping[int, float], item_id: int, what: str, default: float | None) -> float:
    if item_id in table:
        return table[item_id]
    if default is None:
        raise KeyError(f"item {item_id} has no {what} in the {what} table ({len(table)} items)"
                       + ("; set kwargs.missing_bid to give unlisted items a bid" if what == "bid" else ""))
    return float(default)
