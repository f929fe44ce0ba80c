"""Loaders for recommendation data in the common public formats; every malformed row is reported as `file:line`.

Record files, chosen by suffix (a trailing `.gz` is read through gzip):

- `.csv`, `.tsv`, `.txt`, and RecBole atomic files (`.inter`, `.item`, `.user`): a header row, then one record per
  row. The delimiter is a tab when the header has one, else a comma. RecBole's typed headers (`item_id:token`,
  `class:token_seq`) are understood: the type suffix is dropped and `token_seq` fields split on spaces.
- `.jsonl` / `.ndjson`: one JSON object per line (Amazon-reviews style).
- `.json`: a list of objects, or an object keyed by id (`{"B00X": {"title": ...}}`); line numbers point at each
  entry's first character.

Columns are matched by name, ignoring case and underscores, against the aliases below (MovieLens `userId`/`movieId`,
Amazon `reviewerID`/`asin`/`overall`/`unixReviewTime`, RecBole `user_id`/`item_id`, ...); `columns={"user": "uid"}`
names a column explicitly. Interactions need user and item; without a rating column every interaction counts as
rating 1 (implicit feedback), without a time column the row order is the time. Timestamps are unix seconds or
ISO-8601 dates. Genres may be a list, or text separated by `|` or `,`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rollouts.envs.rec_data import DataError, Id, Interaction, Item, RecData, User, parse_id

log = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, ...]] = {
    "user": ("userid", "user", "reviewerid", "uid"),
    "item": ("itemid", "item", "movieid", "asin", "parentasin", "iid", "productid"),
    "rating": ("rating", "overall", "score", "stars"),
    "timestamp": ("timestamp", "time", "unixreviewtime", "ts", "datetime", "date"),
    "title": ("title", "movietitle", "name"),
    "year": ("year", "releaseyear", "releasedate"),
    "genres": ("genres", "genre", "class", "categories", "category", "tags"),
    "text": ("text", "description", "overview", "plot", "summary"),
    "age": ("age",),
    "gender": ("gender", "sex"),
    "occupation": ("occupation", "job"),
    "zip_code": ("zipcode", "zip", "postcode"),
}
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".inter", ".item", ".user")
_TITLE_YEAR = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")
_YEAR = re.compile(r"(\d{4})")


def _norm(name: str) -> str:
    return name.lstrip("\ufeff").split(":", 1)[0].strip().lower().replace("_", "").replace(" ", "")


# ---------------------------------------------------------------------------------------------------------------------
# Raw records with their line numbers.


def _open_text(path: Path, encoding: str):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return path.open(encoding=encoding, newline="")


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def read_records(path: Path | str, *, encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every record of a table, JSONL or JSON file; blank lines are skipped.

    Table records map each header name (type suffix kept, e.g. `class:token_seq`) to its text field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    suffix = _base_suffix(path)
    try:
        if suffix in (".jsonl", ".ndjson"):
            yield from _read_jsonl(path, encoding)
        elif suffix == ".json":
            yield from _read_json_records(path, encoding)
        elif suffix in TABLE_SUFFIXES:
            yield from _read_table(path, encoding)
        else:
            raise DataError(f"{path}: unknown format {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}, "
                            ".jsonl, .ndjson, .json (optionally .gz).")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid {encoding} ({err.reason} at byte {err.start}); pass the file's "
                        "encoding, e.g. encoding='latin-1' for the original GroupLens u.item.") from err


def _read_table(path: Path, encoding: str) -> Iterator[tuple[int, dict[str, str]]]:
    with _open_text(path, encoding) as handle:
        first = handle.readline()
        if not first.strip():
            raise DataError(f"{path}:1: expected a header row naming the columns, got an empty line.")
        delimiter = "\t" if "\t" in first else ","
        header = next(csv.reader([first], delimiter=delimiter))
        reader = csv.reader(handle, delimiter=delimiter)
        line_no = 1
        for cols in reader:
            row_line = line_no + 1
            line_no = reader.line_num + 1  # line_num counts lines read by this reader; the header came before
            if not cols or (len(cols) == 1 and not cols[0].strip()):
                continue
            if len(cols) != len(header):
                raise DataError(f"{path}:{row_line}: {len(cols)} fields, but the header has {len(header)} "
                                f"({delimiter!r}-separated): {delimiter.join(cols)[:200]!r}")
            yield row_line, dict(zip(header, cols, strict=True))


def _read_jsonl(path: Path, encoding: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path, encoding) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.lstrip("\ufeff") if line_no == 1 else line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno}).") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(record).__name__}.")
            yield line_no, record


def iter_json_entries(path: Path | str, *, encoding: str = "utf-8") -> Iterator[tuple[int, str | None, Any]]:
    """(line, key, value) for each entry of a top-level JSON object (key = its key) or list (key = None).

    Entries are decoded one at a time so each error can name the line where its entry starts.
    """
    path = Path(path)
    with _open_text(path, encoding) as handle:
        text = handle.read()
    if text.startswith("\ufeff"):  # a byte-order mark: blank it out, keeping positions and line numbers
        text = " " + text[1:]
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    counted = [0, 1]  # (position, line there): positions only grow, so counting newlines stays linear overall

    def line_at(pos: int) -> int:
        if pos < counted[0]:
            return text.count("\n", 0, pos) + 1
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    pos = ws.match(text, 0).end()
    if text[pos: pos + 1] not in ("[", "{"):
        raise DataError(f"{path}:{line_at(pos)}: expected a JSON object or list at the top level.")
    is_object, closer = text[pos] == "{", "}" if text[pos] == "{" else "]"
    pos = ws.match(text, pos + 1).end()
    done = text[pos: pos + 1] == closer
    if done:
        pos = ws.match(text, pos + 1).end()
    while not done:
        line, key = line_at(pos), None
        try:
            if is_object:
                key, pos = decoder.raw_decode(text, pos)
                if not isinstance(key, str):
                    raise DataError(f"{path}:{line}: object keys must be strings.")
                pos = ws.match(text, pos).end()
                if text[pos: pos + 1] != ":":
                    raise DataError(f"{path}:{line_at(pos)}: expected ':' after key {key!r}.")
                pos = ws.match(text, pos + 1).end()
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}).") from err
        yield line, key, value
        pos = ws.match(text, pos).end()
        sep = text[pos: pos + 1]
        if sep not in (",", closer):
            raise DataError(f"{path}:{line_at(pos)}: expected ',' or '{closer}' after the entry that starts on line "
                            f"{line}.")
        done = sep == closer
        pos = ws.match(text, pos + 1).end()
    if pos != len(text):
        raise DataError(f"{path}:{line_at(pos)}: unexpected text after the top-level JSON value.")


def _read_json_records(path: Path, encoding: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, key, value in iter_json_entries(path, encoding=encoding):
        if not isinstance(value, dict):
            raise DataError(f"{path}:{line}: expected each entry to be a JSON object, got {type(value).__name__}.")
        if key is not None:
            value = {"__key__": key, **value}
        yield line, value


# ---------------------------------------------------------------------------------------------------------------------
# Field access.


class _Fields:
    """Resolves logical fields ("user", "item", ...) to a record's keys; cached per distinct key set.

    JSON records may differ in their keys (an Amazon item without "description"), so resolution is per record.
    """

    def __init__(self, path: Path, explicit: Mapping[str, str] | None) -> None:
        self.path = path
        self.explicit = dict(explicit or {})
        unknown = sorted(set(self.explicit) - set(ALIASES))
        if unknown:
            raise ValueError(f"columns: unknown field(s) {unknown}; known fields: {', '.join(ALIASES)}.")
        self._cache: dict[tuple[str, ...], dict[str, str | None]] = {}

    def keys(self, record: Mapping[str, Any], line: int) -> dict[str, str | None]:
        signature = tuple(record)
        if signature not in self._cache:
            by_norm = {_norm(k): k for k in signature}
            resolved: dict[str, str | None] = {}
            for logical, aliases in ALIASES.items():
                name = self.explicit.get(logical)
                if name is not None and name not in record:
                    raise DataError(f"{self.path}:{line}: columns[{logical!r}]={name!r}, but the record has "
                                    f"{list(signature)}.")
                resolved[logical] = name or next((by_norm[a] for a in aliases if a in by_norm), None)
            if "__key__" in record:  # a JSON object keyed by id
                resolved["item"] = resolved["item"] or "__key__"
                resolved["user"] = resolved["user"] or "__key__"
            self._cache[signature] = resolved
        return self._cache[signature]

    def require(self, record: Mapping[str, Any], line: int, logical: str,
                keys: Mapping[str, str | None] | None = None) -> str:
        key = (keys or self.keys(record, line))[logical]
        if key is None:
            raise DataError(f"{self.path}:{line}: no {logical} field; looked for {', '.join(ALIASES[logical])} (any "
                            f"case, underscores ignored) among {[k for k in record if k != '__key__']}. Pass "
                            f"columns={{'{logical}': '<name>'}} to name it.")
        return key


def _field_id(path: Path, line: int, record: Mapping[str, Any], key: str, what: str) -> Id:
    try:
        return parse_id(record[key])
    except (KeyError, ValueError) as err:
        raise DataError(f"{path}:{line}: {what} id {record.get(key)!r} is not usable: {err}.") from None


def _get(record: Mapping[str, Any], keys: Mapping[str, str | None], logical: str) -> Any:
    return record.get(keys[logical]) if keys[logical] else None


def _number(path: Path, line: int, raw: Any, what: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{line}: {what} {raw!r} is not a number.") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{path}:{line}: {what} {raw!r} is not finite.")
    return int(value) if value.is_integer() else value


def _timestamp(path: Path, line: int, raw: Any) -> int:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return int(raw)
    text = str(raw).strip()
    try:
        return int(float(text))
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"{path}:{line}: timestamp {raw!r} is neither unix seconds nor an ISO-8601 date.") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return int(stamp.timestamp())


def _genres(raw: Any, key: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, list):  # Amazon nests category paths: [["Books", "Fiction"]]
        flat = [g for x in raw for g in (x if isinstance(x, list) else [x])]
        return tuple(dict.fromkeys(str(g).strip() for g in flat if str(g).strip()))
    text = str(raw).strip()
    if not text or text == "(no genres listed)":
        return ()
    if key.endswith(":token_seq"):
        parts = text.split()
    elif "|" in text:
        parts = text.split("|")
    else:
        parts = text.split(",")
    return tuple(p.strip() for p in parts if p.strip())


# ---------------------------------------------------------------------------------------------------------------------
# Loaders.


def load_interactions(path: Path | str, *, columns: Mapping[str, str] | None = None,
                      known_items: Mapping[Id, Any] | None = None, drop_unknown_items: bool = False,
                      encoding: str = "utf-8") -> list[Interaction]:
    """Interactions from a table, JSONL or JSON file, in file order (see the module docstring for the formats)."""
    path = Path(path)
    fields = _Fields(path, columns)
    out: list[Interaction] = []
    num_dropped, num_implicit, num_untimed = 0, 0, 0
    for line, record in read_records(path, encoding=encoding):
        keys = fields.keys(record, line)
        item = _field_id(path, line, record, fields.require(record, line, "item", keys), "item")
        user = _field_id(path, line, record, fields.require(record, line, "user", keys), "user")
        if known_items is not None and item not in known_items:
            if drop_unknown_items:
                num_dropped += 1
                continue
            raise DataError(f"{path}:{line}: item {item!r} is not in the item metadata. Add it there, or load with "
                            "drop_unknown_items=True to skip such interactions.")
        num_implicit += keys["rating"] is None
        num_untimed += keys["timestamp"] is None
        out.append(Interaction(
            user_id=user, item_id=item,
            rating=_number(path, line, record[keys["rating"]], "rating") if keys["rating"] else 1,
            timestamp=_timestamp(path, line, record[keys["timestamp"]]) if keys["timestamp"] else len(out),
        ))
    if num_implicit:
        log.info("%s: %d interactions have no rating; each counts as rating 1 (implicit feedback).", path, num_implicit)
    if num_untimed:
        log.info("%s: %d interactions have no time; their row order is used as time.", path, num_untimed)
    if num_dropped:
        log.warning("%s: dropped %d interactions with items that have no metadata.", path, num_dropped)
    return out


def load_items(path: Path | str, *, columns: Mapping[str, str] | None = None,
               encoding: str = "utf-8") -> dict[Id, Item]:
    """Item metadata (id, title, year, genres, text) from a table, JSONL or JSON file; duplicate ids are errors.

    A year in parentheses at the end of the title ("Toy Story (1995)", MovieLens movies.csv) moves to `year` when
    there is no year field.
    """
    path = Path(path)
    fields = _Fields(path, columns)
    items: dict[Id, Item] = {}
    lines: dict[Id, int] = {}
    bad_years: list[str] = []
    for line, record in read_records(path, encoding=encoding):
        keys = fields.keys(record, line)
        item_id = _field_id(path, line, record, fields.require(record, line, "item", keys), "item")
        if item_id in items:
            raise DataError(f"{path}:{line}: item {item_id!r} is already defined on line {lines[item_id]}.")
        title, year, raw_year = str(_get(record, keys, "title") or "").strip(), "", _get(record, keys, "year")
        if raw_year not in (None, ""):
            match = _YEAR.search(str(raw_year))
            if match is None:  # MovieLens-100K writes "unkonwn" for item 267: unknown, not malformed
                bad_years.append(f"line {line}: {raw_year!r}")
            year = match.group(1) if match else ""
        if not year and (match := _TITLE_YEAR.match(title)) is not None:
            title, year = match.group(1), match.group(2)
        text = _get(record, keys, "text") or ""
        if isinstance(text, list):  # Amazon descriptions are lists of paragraphs
            text = " ".join(str(t) for t in text)
        genres = _genres(_get(record, keys, "genres"), keys["genres"] or "")
        items[item_id] = Item(item_id=item_id, title=title or f"item {item_id}", year=year, genres=genres,
                              text=str(text).strip())
        lines[item_id] = line
    if bad_years:
        log.warning("%s: %d year fields hold no four-digit year (%s); the year is taken from the title when it ends "
                    "with one, else left unknown.", path, len(bad_years), "; ".join(bad_years[:5]))
    return items


def load_users(path: Path | str, *, columns: Mapping[str, str] | None = None,
               encoding: str = "utf-8") -> dict[Id, User]:
    """User side features (age, gender, occupation, zip code) from a table, JSONL or JSON file."""
    path = Path(path)
    fields = _Fields(path, columns)
    users: dict[Id, User] = {}
    lines: dict[Id, int] = {}
    for line, record in read_records(path, encoding=encoding):
        keys = fields.keys(record, line)
        user_id = _field_id(path, line, record, fields.require(record, line, "user", keys), "user")
        if user_id in users:
            raise DataError(f"{path}:{line}: user {user_id!r} is already defined on line {lines[user_id]}.")
        raw_age = _get(record, keys, "age")
        age = None
        if raw_age not in (None, ""):
            age = _number(path, line, raw_age, "age")
            if not isinstance(age, int) or age < 0:
                raise DataError(f"{path}:{line}: age {raw_age!r} is not a non-negative integer.")
        text = {k: str(_get(record, keys, k) or "").strip() for k in ("gender", "occupation", "zip_code")}
        users[user_id] = User(user_id=user_id, age=age, **text)
        lines[user_id] = line
    return users


def load_dataset(interactions: Path | str, items: Path | str | None = None, users: Path | str | None = None, *,
                 columns: Mapping[str, str] | None = None, drop_unknown_items: bool = False,
                 encoding: str = "utf-8") -> RecData:
    """A `RecData` from an interactions file plus optional item-metadata and user-feature files.

    `columns` applies to every file (fields a file lacks are ignored). Without an item file, items are named by id.
    """
    item_map = load_items(items, columns=_subset(columns, "item", "title", "year", "genres", "text"),
                          encoding=encoding) if items else None
    inters = load_interactions(interactions, columns=_subset(columns, "user", "item", "rating", "timestamp"),
                               known_items=item_map, drop_unknown_items=drop_unknown_items, encoding=encoding)
    if item_map is None:
        log.info("No item metadata given: items are titled by their ids, so text prompts carry no content.")
        item_map = {x.item_id: Item(item_id=x.item_id, title=f"item {x.item_id}") for x in inters}
    user_map = load_users(users, columns=_subset(columns, "user", "age", "gender", "occupation", "zip_code"),
                          encoding=encoding) if users else None
    return RecData.build(item_map, inters, user_map)


def _subset(columns: Mapping[str, str] | None, *names: str) -> dict[str, str] | None:
    return {k: v for k, v in columns.items() if k in names} if columns else None


def load_movielens(directory: Path | str) -> RecData:
    """MovieLens-100K as RecBole atomic files: `ml-100k.inter`, `ml-100k.item`, `ml-100k.user`."""
    directory = Path(directory)
    return load_dataset(directory / "ml-100k.inter", directory / "ml-100k.item", directory / "ml-100k.user")
