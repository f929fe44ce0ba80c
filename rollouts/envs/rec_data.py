"""The recommendation data model: users, items, timestamped interactions, splits and candidate sampling.

Everything here is plain Python over already-loaded records (file formats live in `rec_formats.py`). Ids are `Id`
(int or str): a token that is a canonical decimal integer ("42", not "042") becomes an int, anything else ("B00XYZ")
stays a string, so the same id read from a CSV, a JSON key or a JSON number is one value (`parse_id`).

Splits never copy interactions: a target is `(user_id, position)` into `RecData.by_user[user_id]`, the user's
interactions sorted by (timestamp, item id), and its history is the `n` interactions just before that position.

- `leave_last_out`: per user, the last `num_test` interactions are test targets, the `num_valid` before them are
  validation targets, the rest are training targets (the usual leave-one-out protocol of SASRec/TIGER-style papers).
- `time_split`: global time cutoffs; an interaction at or after `test_start` is a test target, one in
  [`valid_start`, `test_start`) a validation target. The history of any target is everything the user did before it,
  so later targets see earlier ones (no future leaks into a history; `time_cutoffs` picks cutoffs by fraction).

Only targets with at least `min_history` earlier interactions are kept (a model needs something to condition on).
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Id = int | str

_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and line (or the record) and the problem."""


def parse_id(raw: object) -> Id:
    """The canonical form of a user or item id: canonical decimal integers become int, other tokens stay str."""
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"an id must be an integer or a string, got {type(raw).__name__} {raw!r}")
    if isinstance(raw, int):
        return raw
    if raw.isdigit() and (raw[0] != "0" or raw == "0"):  # the common case, without the regex
        return int(raw)
    token = raw.strip()
    if not token:
        raise ValueError("an id must not be empty")
    return int(token) if _CANONICAL_INT.fullmatch(token) else token


def id_sort_key(item_id: Id) -> tuple[int, int | str]:
    """Orders ints numerically before strings (ids of one dataset are usually all one kind)."""
    return (0, item_id) if isinstance(item_id, int) else (1, item_id)


@dataclass(frozen=True, kw_only=True)
class User:
    """A user and the side features public datasets carry (MovieLens: age, gender, occupation, zip code)."""

    user_id: Id
    age: int | None = None
    gender: str = ""
    """As given by the dataset ("M"/"F" in MovieLens); empty when unknown."""
    occupation: str = ""
    zip_code: str = ""

    def describe(self) -> str:
        """A short phrase for prompts, e.g. "a 24-year-old man, technician"; "a user" when nothing is known."""
        who = {"m": "man", "male": "man", "f": "woman", "female": "woman"}.get(self.gender.lower(), "person")
        age = f"{self.age}-year-old " if self.age is not None else ""
        job = f", {self.occupation}" if self.occupation and self.occupation.lower() not in ("none", "other") else ""
        if not age and who == "person" and not job:
            return "a user"
        return f"a {age}{who}{job}"


@dataclass(frozen=True, kw_only=True)
class Item:
    """An item's metadata. `year` is kept as text ("1995", or "" when unknown); `text` is free description."""

    item_id: Id
    title: str
    year: str = ""
    genres: tuple[str, ...] = ()
    text: str = ""

    def describe(self) -> str:
        """One line for prompts: "Toy Story (1995) [Animation, Children's, Comedy]"."""
        genres = ", ".join(self.genres) if self.genres else "unknown genre"
        year = f" ({self.year})" if self.year else ""
        return f"{self.title}{year} [{genres}]"

    def embedding_text(self) -> str:
        """The text embedded for semantic IDs: title, year, genres and description."""
        parts = [f"{self.title} ({self.year})" if self.year else self.title]
        if self.genres:
            parts.append("Genres: " + ", ".join(self.genres))
        if self.text:
            parts.append(self.text)
        return ". ".join(parts)


@dataclass(frozen=True, kw_only=True)
class Interaction:
    user_id: Id
    item_id: Id
    rating: float
    """As given (an int when integral: MovieLens 1..5); 1 for implicit-feedback data without ratings."""
    timestamp: int
    """Unix seconds (or the row order when a file has no time column)."""


Target = tuple[Id, int]
"""(user_id, position in `RecData.by_user[user_id]`)."""


@dataclass(frozen=True, kw_only=True)
class RecData:
    items: dict[Id, Item]
    by_user: dict[Id, list[Interaction]]
    """Each user's interactions sorted by (timestamp, item_id)."""
    users: dict[Id, User] = field(default_factory=dict)
    """Side features of the users that have them (MovieLens: all); missing users get `User(user_id=...)`."""

    @classmethod
    def build(cls, items: Mapping[Id, Item], interactions: Iterable[Interaction],
              users: Mapping[Id, User] | None = None) -> RecData:
        """Group interactions by user, sort them by (timestamp, item id) and check that every item is known."""
        by_user: dict[Id, list[Interaction]] = {}
        for inter in interactions:
            if inter.item_id not in items:
                raise DataError(f"Interaction of user {inter.user_id!r} names item {inter.item_id!r}, which has no "
                                "metadata. Add it to the item file or load with drop_unknown_items=True.")
            by_user.setdefault(inter.user_id, []).append(inter)
        for seq in by_user.values():
            seq.sort(key=lambda x: (x.timestamp, id_sort_key(x.item_id)))
        return cls(items=dict(sorted(items.items(), key=lambda kv: id_sort_key(kv[0]))),
                   by_user=dict(sorted(by_user.items(), key=lambda kv: id_sort_key(kv[0]))),
                   users=dict(users or {}))

    @classmethod
    def load_movielens(cls, directory) -> RecData:
        """MovieLens-100K as prepared by `recforge prepare data` (RecBole atomic files ml-100k.{inter,item,user})."""
        from rollouts.envs.rec_formats import load_movielens

        return load_movielens(directory)

    @property
    def num_interactions(self) -> int:
        return sum(len(seq) for seq in self.by_user.values())

    def user(self, user_id: Id) -> User:
        return self.users.get(user_id) or User(user_id=user_id)

    def item_ids(self) -> list[Id]:
        return list(self.items)

    def popularity(self) -> Counter:
        """Interactions per item (items never interacted with are absent)."""
        return Counter(x.item_id for seq in self.by_user.values() for x in seq)

    def history(self, target: Target, length: int) -> list[Interaction]:
        """The `length` interactions (or fewer) just before `target`, oldest first."""
        user, pos = target
        return self.by_user[user][max(0, pos - length): pos]

    def interaction(self, target: Target) -> Interaction:
        user, pos = target
        return self.by_user[user][pos]

    def seen_items(self, user_id: Id) -> set[Id]:
        return {x.item_id for x in self.by_user[user_id]}


# ---------------------------------------------------------------------------------------------------------------------
# Splits.


@dataclass(frozen=True, kw_only=True)
class Split:
    """Training, validation and test targets as (user_id, position) pairs, in user then time order."""

    train: tuple[Target, ...]
    valid: tuple[Target, ...]
    test: tuple[Target, ...]

    def part(self, name: str) -> tuple[Target, ...]:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"Unknown split part {name!r}; choose train, valid or test.")
        return getattr(self, name)


def leave_last_out(data: RecData, *, num_valid: int = 1, num_test: int = 1, min_history: int = 1) -> Split:
    """Per user: last `num_test` positions → test, the `num_valid` before → valid, the rest → train."""
    if num_valid < 0 or num_test < 0 or min_history < 0:
        raise ValueError(f"num_valid={num_valid}, num_test={num_test}, min_history={min_history} must be >= 0.")
    train, valid, test = [], [], []
    for user, seq in data.by_user.items():
        n = len(seq)
        for pos in range(min_history, n):
            part = test if pos >= n - num_test else valid if pos >= n - num_test - num_valid else train
            part.append((user, pos))
    return Split(train=tuple(train), valid=tuple(valid), test=tuple(test))


def time_split(data: RecData, *, valid_start: int, test_start: int, min_history: int = 1) -> Split:
    """Global cutoffs: timestamp >= test_start → test, in [valid_start, test_start) → valid, earlier → train."""
    if valid_start > test_start:
        raise ValueError(f"valid_start={valid_start} is after test_start={test_start}; validation must come first "
                         "(use valid_start == test_start for no validation part).")
    train, valid, test = [], [], []
    for user, seq in data.by_user.items():
        for pos in range(min_history, len(seq)):
            ts = seq[pos].timestamp
            part = test if ts >= test_start else valid if ts >= valid_start else train
            part.append((user, pos))
    return Split(train=tuple(train), valid=tuple(valid), test=tuple(test))


def time_cutoffs(data: RecData, *, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(valid_start, test_start) leaving about these fractions of all interactions after each cutoff.

    Cutoffs are timestamps that occur in the data, so ties keep the split from being exact.
    """
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction}: each must be >= 0 and "
                         "their sum < 1 (something must be left to train on).")
    stamps = sorted(x.timestamp for seq in data.by_user.values() for x in seq)
    if not stamps:
        raise ValueError("No interactions to split.")
    n = len(stamps)
    test_start = stamps[min(n - 1, math.floor(n * (1 - test_fraction)))] if test_fraction else stamps[-1] + 1
    valid_pos = math.floor(n * (1 - test_fraction - valid_fraction))
    valid_start = stamps[min(n - 1, valid_pos)] if valid_fraction else test_start
    return min(valid_start, test_start), test_start


# ---------------------------------------------------------------------------------------------------------------------
# Candidate sampling: one positive plus K negatives the user has not interacted with.


@dataclass(frozen=True, kw_only=True)
class Candidates:
    item_ids: tuple[Id, ...]
    """1 + K distinct items in random order."""
    positive_index: int
    """Where the positive sits in `item_ids`."""

    @property
    def positive(self) -> Id:
        return self.item_ids[self.positive_index]


class NegativeSampler:
    """Draws distinct negatives from `item_ids`, uniformly or ∝ popularity^alpha, excluding a given set.

    Rejection sampling while the exclusion set is small; otherwise an exact draw over the allowed items, so a user
    who saw most of the catalogue costs O(items) instead of looping.
    """

    def __init__(self, item_ids: Sequence[Id], *, popularity: Mapping[Id, int] | None = None,
                 alpha: float = 0.0) -> None:
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0 (0 = uniform, 1 = proportional to popularity).")
        self.item_ids = list(item_ids)
        self._item_set = set(self.item_ids)
        self.weights: list[float] | None = None
        self._cum_weights: list[float] | None = None
        if alpha > 0:
            if popularity is None:
                raise ValueError("alpha > 0 needs popularity counts (RecData.popularity()).")
            # +1 smoothing so never-seen items can still be drawn.
            self.weights = [(popularity.get(i, 0) + 1.0) ** alpha for i in self.item_ids]
            self._cum_weights = list(_accumulate(self.weights))

    def sample(self, num: int, *, exclude: Collection[Id], rng: random.Random) -> list[Id]:
        """`num` distinct items not in `exclude`, in draw order."""
        num_allowed = len(self.item_ids) - sum(1 for i in set(exclude) if i in self._item_set)
        if num > num_allowed:
            raise ValueError(f"Cannot sample {num} negatives: only {num_allowed} of {len(self.item_ids)} items are "
                             "not excluded for this user. Lower the number of negatives.")
        if len(exclude) <= len(self.item_ids) // 2:
            return self._rejection(num, exclude, rng)
        return self._exact(num, exclude, rng)

    def _draw(self, rng: random.Random) -> Id:
        if self._cum_weights is None:
            return self.item_ids[rng.randrange(len(self.item_ids))]
        u = rng.random() * self._cum_weights[-1]
        return self.item_ids[min(bisect.bisect_right(self._cum_weights, u), len(self.item_ids) - 1)]

    def _rejection(self, num: int, exclude: Collection[Id], rng: random.Random) -> list[Id]:
        out: list[Id] = []
        taken = set(exclude)
        while len(out) < num:
            item = self._draw(rng)
            if item not in taken:
                taken.add(item)
                out.append(item)
        return out

    def _exact(self, num: int, exclude: Collection[Id], rng: random.Random) -> list[Id]:
        excluded = set(exclude)
        allowed = [k for k, i in enumerate(self.item_ids) if i not in excluded]
        if self.weights is None:
            return [self.item_ids[k] for k in rng.sample(allowed, num)]
        # Efraimidis-Spirakis: the num largest u^(1/w) are a weighted draw without replacement.
        keys = sorted(allowed, key=lambda k: rng.random() ** (1.0 / self.weights[k]), reverse=True)
        return [self.item_ids[k] for k in keys[:num]]


def _accumulate(values: Iterable[float]) -> Iterable[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def sample_candidates(positive: Id, *, num_negatives: int, exclude: Collection[Id], sampler: NegativeSampler,
                      rng: random.Random, shuffle: bool = True) -> Candidates:
    """The positive plus `num_negatives` items outside `exclude` (and never the positive), shuffled by `rng`."""
    negatives = sampler.sample(num_negatives, exclude={*exclude, positive}, rng=rng)
    items = [positive, *negatives]
    if shuffle:
        rng.shuffle(items)
    return Candidates(item_ids=tuple(items), positive_index=items.index(positive))


def user_rng(seed: int, user_id: Id, salt: str = "") -> random.Random:
    """A per-user generator: the same (seed, user) gives the same draws however users are ordered or sharded."""
    return random.Random(f"{seed}/{salt}/{user_id}")  # str seeds hash with sha512: stable across processes
