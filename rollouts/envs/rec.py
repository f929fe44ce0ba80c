"""Recommendation data: MovieLens-100K users, items and timestamped ratings, splits, and reasoning prompts.

The prepared files (`recforge prepare data`) are RecBole's atomic files: tab-separated with a typed header
(`user_id:token  item_id:token  rating:float  timestamp:float`). Malformed rows fail with file and line.

Split (leave-last-out by time): per user, interactions sorted by timestamp; the last `num_eval_holdout` go to
evaluation, the rest are training targets, each predicted from the `history_len` interactions before it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rl.types import Sample


class DataError(ValueError):
    """A data file is malformed; the message names the file and line."""


@dataclass(frozen=True, kw_only=True)
class Item:
    item_id: int
    title: str
    year: str
    genres: tuple[str, ...]

    def describe(self) -> str:
        genres = ", ".join(self.genres) if self.genres else "unknown genre"
        year = f" ({self.year})" if self.year else ""
        return f"{self.title}{year} [{genres}]"


@dataclass(frozen=True, kw_only=True)
class Interaction:
    user_id: int
    item_id: int
    rating: int
    timestamp: int


def _rows(path: Path, expected_columns: int) -> Iterator[tuple[int, list[str]]]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if len(header) < expected_columns:
            raise DataError(f"{path}:1: header has {len(header)} columns, expected at least {expected_columns}.")
        for line_no, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < expected_columns:
                raise DataError(f"{path}:{line_no}: {len(cols)} columns, expected {expected_columns}: {line!r}")
            yield line_no, cols


def load_items(path: Path) -> dict[int, Item]:
    items = {}
    for line_no, cols in _rows(path, 4):
        try:
            item_id = int(cols[0])
        except ValueError as err:
            raise DataError(f"{path}:{line_no}: item id {cols[0]!r} is not an integer.") from err
        items[item_id] = Item(item_id=item_id, title=cols[1].strip(), year=cols[2].strip(),
                              genres=tuple(cols[3].split()))
    return items


def load_interactions(path: Path) -> list[Interaction]:
    out = []
    for line_no, cols in _rows(path, 4):
        try:
            out.append(Interaction(user_id=int(cols[0]), item_id=int(cols[1]), rating=int(float(cols[2])),
                                   timestamp=int(float(cols[3]))))
        except ValueError as err:
            raise DataError(f"{path}:{line_no}: expected user, item, rating, timestamp numbers: {cols!r}") from err
    return out


@dataclass(frozen=True, kw_only=True)
class RecData:
    items: dict[int, Item]
    by_user: dict[int, list[Interaction]]
    """Each user's interactions sorted by (timestamp, item_id)."""

    @classmethod
    def load_movielens(cls, directory: Path) -> RecData:
        items = load_items(directory / "ml-100k.item")
        by_user: dict[int, list[Interaction]] = {}
        for inter in load_interactions(directory / "ml-100k.inter"):
            if inter.item_id not in items:
                raise DataError(f"{directory / 'ml-100k.inter'}: item {inter.item_id} is not in ml-100k.item.")
            by_user.setdefault(inter.user_id, []).append(inter)
        for seq in by_user.values():
            seq.sort(key=lambda x: (x.timestamp, x.item_id))
        return cls(items=items, by_user=dict(sorted(by_user.items())))


SYSTEM_PROMPT = (
    "You are a movie recommender. Think briefly about the user's taste, then give your prediction on the last "
    "line exactly as 'Rating: N' with N from 1 to 5."
)


def reasoning_prompt(data: RecData, history: list[Interaction], candidate: int) -> list[dict[str, str]]:
    """Chat messages asking how much the user with `history` (oldest first) will like `candidate`."""
    lines = [f"- {data.items[x.item_id].describe()}: rated {x.rating}/5" for x in history]
    user = (
        "Movies this user rated, oldest first:\n" + "\n".join(lines)
        + f"\n\nCandidate: {data.items[candidate].describe()}\nHow will this user rate the candidate?"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class RecReasoningTask:
    """Training and evaluation samples for pointwise reasoning-to-rank on MovieLens.

    `render` turns chat messages into the prompt text (the tokenizer's chat template, applied once here so the
    rollout worker and the learner see identical tokens).
    """

    def __init__(self, data: RecData, render, *, history_len: int, num_eval_holdout: int = 1,
                 max_train_users: int = 0) -> None:
        self.data = data
        self.render = render
        self.history_len = history_len
        self.train_targets: list[tuple[int, int]] = []  # (user_id, index of the target interaction)
        users = list(data.by_user)
        if max_train_users:
            users = users[:max_train_users]
        for user in users:
            seq = data.by_user[user]
            for idx in range(history_len, len(seq) - num_eval_holdout):
                self.train_targets.append((user, idx))
        self.num_eval_holdout = num_eval_holdout

    def __len__(self) -> int:
        return len(self.train_targets)

    def train_sample(self, position: int) -> Sample:
        user, idx = self.train_targets[position]
        seq = self.data.by_user[user]
        target = seq[idx]
        history = seq[idx - self.history_len: idx]
        return Sample(
            sample_id=f"u{user}-i{target.item_id}-t{idx}",
            prompt=self.render(reasoning_prompt(self.data, history, target.item_id)),
            metadata={"user_id": user, "item_id": target.item_id, "rating": target.rating,
                      "liked": target.rating >= 4},
        )

    def eval_samples(self, *, num_users: int, num_candidates: int, seed: int) -> list[Sample]:
        """Per user: the held-out interactions plus sampled unseen items (negatives, rating 0), one sample each."""
        rng = random.Random(seed)
        users = sorted(self.data.by_user)
        rng.shuffle(users)
        all_items = sorted(self.data.items)
        samples = []
        for user in users[:num_users]:
            seq = self.data.by_user[user]
            held = seq[len(seq) - self.num_eval_holdout:]
            history = seq[len(seq) - self.num_eval_holdout - self.history_len: len(seq) - self.num_eval_holdout]
            seen = {x.item_id for x in seq}
            negatives = []
            while len(negatives) < num_candidates - len(held):
                item = rng.choice(all_items)
                if item not in seen and item not in negatives:
                    negatives.append(item)
            cands = [(x.item_id, x.rating) for x in held] + [(i, 0) for i in negatives]
            for item, rating in cands:
                samples.append(Sample(
                    sample_id=f"eval-u{user}-i{item}",
                    prompt=self.render(reasoning_prompt(self.data, history, item)),
                    metadata={"user_id": user, "item_id": item, "rating": rating, "liked": rating >= 4},
                ))
        return samples
