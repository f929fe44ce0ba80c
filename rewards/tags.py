"""Interest-tag rewards (recipes/recgpt_tags): `tag_accuracy` and `tag_diversity`, plus the tag parser they share.

A completion states its tags on a line `Tags: space opera, 90s comedies, strong heroines` (the last such line
counts; separators `,` `;` `|`; a leading `#` on a tag is dropped). Tags are compared lower-cased and
whitespace-collapsed.

- `tag_accuracy` (RecGPT-V2's accuracy term R_acc): how much of the user's *future* interest the tags name. The
  recipe puts `future_genres` in the sample metadata: the genres of the movies the user rates >= 4 next, one entry
  per (movie, genre). A genre is covered when some tag contains one of its keywords (`GENRE_KEYWORDS`: "sci-fi",
  "science fiction", "space", "futur*" → Sci-Fi; "war" but not "warm" → War). Score = covered entries / all
  entries, in [0, 1].
- `tag_diversity`: distinct tags / tags, times min(1, tags / min_tags), times min(1, max_tags / tags) — a list
  that repeats itself, is too short or is a wall of tags scores low.

No `Tags:` line: score 0 with `details["parsed"] = False` and component `parsed` = 0 (never an unexplained zero).
Imports neither ray, vllm nor deepspeed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rewards.api import reward
from rl.types import RewardResult, Rollout

TAGS_LINE = re.compile(r"(?im)^[ \t]*\**tags\**[ \t]*:[ \t]*(.+)$")
GENRE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "Action": ("action", "fight*", "martial"), "Adventure": ("adventur*", "quest", "explor*"),
    "Animation": ("animat*", "cartoon", "pixar", "disney"), "Children's": ("children*", "kid", "family"),
    "Comedy": ("comed*", "comic", "funny", "humor*", "humour*", "laugh*"), "Crime": ("crime", "gangster", "heist",
                                                                                      "mob"),
    "Documentary": ("documentar*",), "Drama": ("drama*",), "Fantasy": ("fantas*", "magic*", "fairy"),
    "Film-Noir": ("noir",), "Horror": ("horror", "scary", "slasher", "monster"), "Musical": ("musical", "music"),
    "Mystery": ("myster*", "whodunit", "detective"), "Romance": ("roman*", "love"),
    "Sci-Fi": ("sci-fi", "scifi", "science fiction", "space", "futur*", "alien"),
    "Thriller": ("thrill*", "suspense*"), "War": ("war", "military", "soldier"), "Western": ("western", "cowboy"),
}
"""Words (an optional plural s) or, ending in `*`, word prefixes that name each MovieLens genre in a free-text tag."""


def parse_tags(text: str) -> list[str] | None:
    """The tags of the last `Tags:` line (lower-cased, whitespace-collapsed, empties dropped); None without one."""
    lines = TAGS_LINE.findall(text)
    if not lines:
        return None
    parts = re.split(r"[,;|]", lines[-1])
    tags = [" ".join(p.strip().strip("*#.\"'`").split()).lower() for p in parts]
    return [t for t in tags if t]


def covered_genres(tags: Sequence[str]) -> set[str]:
    """The MovieLens genres some tag names (see `GENRE_KEYWORDS`)."""
    text = " | ".join(tags)
    return {genre for genre, keys in GENRE_KEYWORDS.items()
            if any(re.search(_keyword_regex(key), text) for key in keys)}


def _keyword_regex(key: str) -> str:
    return rf"\b{re.escape(key[:-1])}" if key.endswith("*") else rf"\b{re.escape(key)}s?\b"


def _unparsed() -> RewardResult:
    return RewardResult(score=0.0, components={"parsed": 0.0}, details={"parsed": False, "reason": "no 'Tags:' line"})


@reward("tag_accuracy", deterministic=True)
def tag_accuracy(rollouts: Sequence[Rollout], *, key: str = "future_genres") -> list[RewardResult]:
    """Share of the user's future-liked (movie, genre) entries whose genre a tag names (see the module doc)."""
    out = []
    for r in rollouts:
        future = r.sample.metadata.get(key)
        if not isinstance(future, list):
            raise KeyError(f"sample metadata of rollout '{r.rollout_id}' has no list '{key}' (the genres of the "
                           f"user's future liked movies; it has: {', '.join(sorted(r.sample.metadata))})")
        tags = parse_tags(r.text)
        if tags is None:
            out.append(_unparsed())
            continue
        covered = covered_genres(tags)
        score = sum(1 for g in future if g in covered) / len(future) if future else 0.0
        out.append(RewardResult(score=score, components={"parsed": 1.0, "num_tags": float(len(tags))},
                                details={"parsed": True, "tags": tags, "covered": sorted(covered)}))
    return out


@reward("tag_diversity", deterministic=True)
def tag_diversity(rollouts: Sequence[Rollout], *, min_tags: int = 3, max_tags: int = 8) -> list[RewardResult]:
    """distinct/total × min(1, total/min_tags) × min(1, max_tags/total) over the parsed tags (see the module doc)."""
    if not 1 <= min_tags <= max_tags:
        raise ValueError(f"need 1 <= min_tags <= max_tags, got min_tags={min_tags}, max_tags={max_tags}.")
    out = []
    for r in rollouts:
        tags = parse_tags(r.text)
        if not tags:
            out.append(_unparsed())
            continue
        total, distinct = len(tags), len(set(tags))
        score = distinct / total * min(1.0, total / min_tags) * min(1.0, max_tags / total)
        out.append(RewardResult(score=score, components={"parsed": 1.0, "distinct": float(distinct)},
                                details={"parsed": True, "tags": tags}))
    return out
