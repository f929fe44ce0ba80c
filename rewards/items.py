"""Which item a rollout recommends, and the item features the model-based rewards share (genres, titles).

The model-based rewards (`ecpm`, `negative_feedback`, and later `semantic_judge`) score one generated item per
rollout. Where it comes from is chosen by the reward's `item_parser` kwarg:

- "metadata" (default): `rollout.sample.metadata[item_key]` (default key "candidate_item_id"), an int item id put
  there by the recipe (pointwise tasks, or a recipe that already decoded the completion). Missing or malformed
  metadata is an error naming the key: scoring it would train the policy on a bug.
- "item_id": the last line of the completion matching `ITEM_ID_PATTERN` (`Item: 123`, `item_id = 123`,
  `Recommendation: #123`).
- "title": the text after the last `Recommendation:` in the completion, up to the end of that line, looked up as a
  catalogue title (case-insensitive; "The Usual Suspects" and MovieLens' "Usual Suspects, The" both match; a
  trailing "(1995)" picks among equal titles by year, else the smallest item id wins).
- "sid": the completion is one semantic ID ("<a_12><b_7><c_3>", whitespace ignored), looked up in the index JSON
  given as the reward's `sid_index` kwarg (rollouts/sid.py); no SID, an unknown or unfinished one, or several SIDs
  are unparsable. With trie-constrained decoding (rollouts/engine.py) every completion parses.

An unparsable completion, or an id/title not in the catalogue, is the reward's verdict on the policy's output, not an
error: `GeneratedItem.item_id is None` with the reason, and each reward reports it as `details["parsed"] = False` plus
a `parsed` component of 0 (so it is counted in `reward/<name>/parsed`), never as an unexplained zero.

This module imports neither ray, vllm nor deepspeed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from rl.types import Rollout

if TYPE_CHECKING:
    from rollouts.sid import SIDIndex

ItemParser = Literal["metadata", "item_id", "title", "sid"]
ITEM_PARSERS: tuple[str, ...] = ("metadata", "item_id", "title", "sid")

MOVIELENS_GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "unknown",
)
"""The 19 genre tokens of MovieLens-100K's `class` column, in a fixed order (the genre multi-hot layout)."""

ITEM_ID_PATTERN = r"(?im)^[ \t]*\**(?:item(?:[ _]id)?|recommendation)\**[ \t]*[:=][ \t]*\**[ \t]*#?(\d+)\b"
"""A line `Item: 123` / `item_id = 123` / `Recommendation: #123` (case-insensitive, optional markdown bold)."""
RECOMMENDATION_MARKER = r"(?i)\brecommendation\**\s*:"
"""Where the title answer starts in "title" mode: after the last `Recommendation:`."""

_ARTICLE_SUFFIX = re.compile(r"^(.*), (the|a|an|la|le|les|il|el|das|der|die)$", re.IGNORECASE)
_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")


class ItemMetadataError(KeyError):
    """The sample metadata lacks what the reward needs (the message names the key and what is there)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, kw_only=True)
class GeneratedItem:
    """The item a rollout recommends, or why there is none."""

    item_id: int | None
    """Catalogue item id; None when the completion has no parsable, known item."""
    reason: str = ""
    """Why `item_id` is None ("no 'Item: <id>' line", "item 99999 is not in the catalogue", ...)."""
    raw: str | None = None
    """What the parser read (the id or title text), for inspection."""


@dataclass(frozen=True, kw_only=True)
class UserInfo:
    """A user's demographics (MovieLens `ml-100k.user`)."""

    age: int | None
    """None when unknown."""
    gender: str
    occupation: str


@dataclass(frozen=True, kw_only=True)
class ItemInfo:
    """What the rewards know about an item; `year` is "" when unknown."""

    title: str
    year: str
    genres: tuple[str, ...]


def metadata_value(rollout: Rollout, key: str, kind: type | tuple[type, ...]) -> Any:
    """`rollout.sample.metadata[key]`, checked to be of `kind` (bool is not an int); errors name the key."""
    meta = rollout.sample.metadata
    if key not in meta:
        raise ItemMetadataError(
            f"sample metadata of rollout '{rollout.rollout_id}' has no '{key}' "
            f"(it has: {', '.join(sorted(meta)) or 'nothing'})"
        )
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(
            f"sample metadata '{key}' of rollout '{rollout.rollout_id}' is {type(value).__name__} {value!r}, "
            f"expected {kind}"
        )
    return value


def normalise_title(title: str) -> str:
    """Lower-case, whitespace-collapsed, with MovieLens' trailing article moved to the front ("usual suspects, the"
    → "the usual suspects") and surrounding quotes/markdown removed."""
    text = " ".join(title.strip().strip("*_\"'`").split()).lower()
    match = _ARTICLE_SUFFIX.match(text)
    return f"{match.group(2)} {match.group(1)}" if match else text


def title_index(items: Mapping[int, Any]) -> dict[str, list[tuple[int, str]]]:
    """normalised title → [(item id, year)] sorted by id, from a catalogue of objects with `.title` and `.year`."""
    index: dict[str, list[tuple[int, str]]] = {}
    for item_id in sorted(items):
        item = items[item_id]
        index.setdefault(normalise_title(item.title), []).append((item_id, str(item.year)))
    return index


def parse_item_id(text: str, pattern: str = ITEM_ID_PATTERN) -> int | None:
    """The item id of the last line matching `pattern` (group 1), or None."""
    matches = list(re.finditer(pattern, text))
    return int(matches[-1].group(1)) if matches else None


def parse_item_title(text: str, index: Mapping[str, Sequence[tuple[int, str]]]) -> tuple[int | None, str | None]:
    """(item id, title text read) from the line after the last `Recommendation:`; (None, text) if unknown."""
    markers = list(re.finditer(RECOMMENDATION_MARKER, text))
    if not markers:
        return None, None
    line = text[markers[-1].end():].strip().splitlines()
    raw = line[0].strip() if line else ""
    year_match = _YEAR_SUFFIX.search(raw)
    year = year_match.group(1) if year_match else None
    title = _YEAR_SUFFIX.sub("", raw).rstrip(" .!")
    found = index.get(normalise_title(title))
    if not found:
        return None, raw
    same_year = [item_id for item_id, item_year in found if year is not None and item_year == year]
    return (same_year or [found[0][0]])[0], raw


def sid_index_for(parser: str, path: str | None) -> SIDIndex | None:
    """The index the "sid" parser needs (loaded once per process and file version); None for other parsers."""
    if parser != "sid":
        return None
    if path is None:
        raise ValueError("item_parser='sid' needs kwargs.sid_index: the path of the item → semantic-ID index JSON "
                         "({item_id: [\"<a_12>\", \"<b_7>\", ...]}) the policy generates from.")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"sid_index={path}: no such index file.")
    return _load_sid_index(str(resolved), resolved.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_sid_index(path: str, mtime_ns: int) -> SIDIndex:
    from rollouts.sid import SIDIndex

    return SIDIndex.load(path)


def _sid_item(rollout: Rollout, index: SIDIndex | None) -> GeneratedItem:
    if index is None:
        raise ValueError("the 'sid' item parser needs a semantic-ID index (rewards.items.sid_index_for)")
    found = index.parse(rollout.text)
    if not found:
        return GeneratedItem(item_id=None, reason="no semantic ID in the completion")
    if len(found) > 1 or found[0] is None:
        return GeneratedItem(item_id=None, reason=f"expected exactly one valid semantic ID, read {found}",
                             raw=rollout.text[:80])
    return GeneratedItem(item_id=found[0], raw=index.sid_text(found[0]))


def generated_item(
    rollout: Rollout,
    *,
    parser: str,
    catalogue: Mapping[int, Any] | set[int],
    item_key: str = "candidate_item_id",
    pattern: str = ITEM_ID_PATTERN,
    titles: Mapping[str, Sequence[tuple[int, str]]] | None = None,
    sid_index: SIDIndex | None = None,
) -> GeneratedItem:
    """The item `rollout` recommends, read as `parser` says (see the module doc); ids outside `catalogue` → None."""
    if parser == "sid":
        found = _sid_item(rollout, sid_index)
        if found.item_id is not None and found.item_id not in catalogue:
            return GeneratedItem(item_id=None, reason=f"item {found.item_id!r} is not in the catalogue", raw=found.raw)
        return found
    if parser == "metadata":
        item_id = metadata_value(rollout, item_key, int)
        if item_id not in catalogue:
            # The recipe put it there, so an unknown id is a data/config mismatch, not a policy mistake.
            raise ValueError(f"sample metadata '{item_key}'={item_id} of rollout '{rollout.rollout_id}' is not in "
                             "the item catalogue the reward was given (wrong data_dir or artifact?)")
        return GeneratedItem(item_id=item_id, raw=str(item_id))
    if parser == "item_id":
        parsed = parse_item_id(rollout.text, pattern)
        if parsed is None:
            return GeneratedItem(item_id=None, reason="no 'Item: <id>' line in the completion")
        if parsed not in catalogue:
            return GeneratedItem(item_id=None, reason=f"item {parsed} is not in the catalogue", raw=str(parsed))
        return GeneratedItem(item_id=parsed, raw=str(parsed))
    if parser == "title":
        if titles is None:
            raise ValueError("the 'title' item parser needs a title index (rewards.items.title_index)")
        item_id, raw = parse_item_title(rollout.text, titles)
        if raw is None:
            return GeneratedItem(item_id=None, reason="no 'Recommendation: <title>' line in the completion")
        if item_id is None:
            return GeneratedItem(item_id=None, reason=f"title {raw!r} is not in the catalogue", raw=raw)
        return GeneratedItem(item_id=item_id, raw=raw)
    raise ValueError(f"item_parser={parser!r} is not one of {ITEM_PARSERS}; see rewards/items.py for what each reads.")


def genre_multi_hot_NG(genres_per_item: Sequence[Sequence[str]], vocab: Sequence[str] = MOVIELENS_GENRES
                       ) -> torch.Tensor:
    """float32 [N, len(vocab)]: 1 where item n has genre g; genres outside `vocab` are ignored."""
    position = {g: i for i, g in enumerate(vocab)}
    out_NG = torch.zeros(len(genres_per_item), len(vocab), dtype=torch.float32)
    for n, genres in enumerate(genres_per_item):
        for g in genres:
            if g in position:
                out_NG[n, position[g]] = 1.0
    return out_NG
