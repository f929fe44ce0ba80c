"""Rollout files: the JSONL the runtime writes for every step, and what `recforge reward test` reads.

Format version 1 (`rl.types.ROLLOUT_FORMAT_VERSION`): UTF-8, one JSON object per line, one line per rollout; blank
lines are skipped. Fields:

    field                  type            required    meaning
    format_version         int             yes         1; a reader refuses versions newer than its own
    rollout_id             str             yes         "{sample_id}/{index}", unique within a step
    sample_id              str             yes         the prompt's id; rollouts sharing it form a group
    prompt                 str             yes         prompt text as given to the tokenizer (chat template applied)
    completion             str             yes         decoded completion text
    index                  int             no, 0       position within the group
    metadata               object          no, {}      the sample's metadata (rewards' ground truth: rating, ...)
    num_prompt_tokens      int             no, 0       prompt length in tokens
    num_completion_tokens  int             no, 0       completion length in tokens
    finish_reason          str             no, "stop"  "stop" or "length"
    policy_version         int             no, 0       learner step whose weights sampled it
    step                   int | null      no, null    training step that wrote it
    reward                 float | null    no, null    combined reward (null: not scored)
    rewards                object          no, {}      {reward name: {"score": float, "components": {str: float},
                                                                      "details": {...}}}
    prompt_token_ids       [int]           no          only written with include_token_ids=True
    completion_token_ids   [int]           no          (with logprobs, same length)
    logprobs               [float]         no          sampler log-prob of each completion token
    action_mask            [int]           no          multi-turn: 1 on sampled, 0 on observation tokens (with ids)
    reward_hint            float           no          multi-turn: the environment's return (written when set)
    info                   object          no          multi-turn: trajectory facts for rewards (written when set)
    allowed_token_ids      [[int]]         no          constrained decoding: per completion token the ids the sampler's
                                                       mask allowed ([] = any); written with token ids when set

Unknown fields are an error (a typo in a hand-written file must not pass unnoticed). Without token ids, a read
`Rollout` has empty token tuples; the counts live in `RolloutRecord`. Example line:

    {"format_version": 1, "rollout_id": "u7-i50-t12/0", "sample_id": "u7-i50-t12", "index": 0, "prompt": "...",
     "completion": "... Rating: 4", "metadata": {"rating": 5, "liked": true}, "num_prompt_tokens": 212,
     "num_completion_tokens": 41, "finish_reason": "stop", "policy_version": 3, "step": 3, "reward": 1.25,
     "rewards": {"format": {"score": 1.0, "components": {}, "details": {"parsed": true}}}}
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.types import ROLLOUT_FORMAT_VERSION, RewardResult, Rollout, Sample, ScoredRollout

_MISSING = object()
FIELDS = (
    "format_version", "rollout_id", "sample_id", "index", "prompt", "completion", "metadata", "num_prompt_tokens",
    "num_completion_tokens", "finish_reason", "policy_version", "step", "reward", "rewards", "prompt_token_ids",
    "completion_token_ids", "logprobs",
)
"""The fields of single-turn lines, in the order the writer emits them."""
MULTI_TURN_FIELDS = ("action_mask", "reward_hint", "info")
"""Fields multi-turn rollouts add after those (action_mask only with token ids); older files simply lack them."""
CONSTRAINT_FIELDS = ("allowed_token_ids",)
"""Constrained-decoding rollouts add this (with token ids only); older files simply lack it."""


class RolloutFileError(ValueError):
    """A rollout file line is malformed; the message starts with `file:line`."""


@dataclass(frozen=True, kw_only=True)
class RolloutRecord:
    """One line of a rollout file."""

    rollout: Rollout
    num_prompt_tokens: int
    num_completion_tokens: int
    step: int | None = None
    reward: float | None = None
    """Combined reward when the line was written by a scored step, else None."""
    rewards: dict[str, RewardResult]
    """Each reward's result when scored, else empty."""


def make_rollout(text: str, *, sample_id: str = "s0", index: int = 0, prompt: str = "",
                 metadata: dict[str, Any] | None = None, policy_version: int = 0,
                 finish_reason: str = "stop") -> Rollout:
    """A Rollout from text alone (no token ids), for reward tests and hand-written examples."""
    return Rollout(
        rollout_id=f"{sample_id}/{index}", sample=Sample(sample_id=sample_id, prompt=prompt, metadata=metadata or {}),
        index=index, prompt_token_ids=(), completion_token_ids=(), text=text, logprobs=(),
        finish_reason=finish_reason, policy_version=policy_version,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Writing.


def _result_to_json(result: RewardResult) -> dict[str, Any]:
    return {"score": result.score, "components": dict(result.components), "details": dict(result.details)}


def rollout_to_json(item: Rollout | ScoredRollout, *, step: int | None = None,
                    include_token_ids: bool = False) -> dict[str, Any]:
    """The line for one rollout (scored or not) as a dict, in the documented field order."""
    r = item.rollout if isinstance(item, ScoredRollout) else item
    record: dict[str, Any] = {
        "format_version": ROLLOUT_FORMAT_VERSION, "rollout_id": r.rollout_id, "sample_id": r.sample.sample_id,
        "index": r.index, "prompt": r.sample.prompt, "completion": r.text, "metadata": dict(r.sample.metadata),
        "num_prompt_tokens": len(r.prompt_token_ids), "num_completion_tokens": len(r.completion_token_ids),
        "finish_reason": r.finish_reason, "policy_version": r.policy_version, "step": step,
        "reward": item.reward if isinstance(item, ScoredRollout) else None,
        "rewards": {k: _result_to_json(v) for k, v in item.results.items()} if isinstance(item, ScoredRollout) else {},
    }
    if include_token_ids:
        record |= {"prompt_token_ids": list(r.prompt_token_ids), "completion_token_ids": list(r.completion_token_ids),
                   "logprobs": list(r.logprobs)}
        if r.action_mask is not None:
            record["action_mask"] = list(r.action_mask)
        if r.allowed_token_ids is not None:
            record["allowed_token_ids"] = [list(ids) for ids in r.allowed_token_ids]
    if r.reward_hint is not None:  # multi-turn fields only when set: single-turn lines stay as they were
        record["reward_hint"] = r.reward_hint
    if r.info:
        record["info"] = dict(r.info)
    return record


def write_rollouts(path: str | Path, items: Iterable[Rollout | ScoredRollout], *, step: int | None = None,
                   include_token_ids: bool = False, append: bool = False) -> int:
    """Write (or append) rollouts as JSONL; returns the number of lines written. Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("a" if append else "w", encoding="utf-8") as handle:
        for item in items:
            record = rollout_to_json(item, step=step, include_token_ids=include_token_ids)
            try:
                line = json.dumps(record, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"Rollout {record['rollout_id']} cannot be written to {path}: its metadata or reward "
                                 f"details are not JSON-serialisable ({err}). Keep them to str/number/bool/list/dict."
                                 ) from err
            handle.write(line + "\n")
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Reading.


def _get(data: dict[str, Any], name: str, kinds: type | tuple[type, ...], where: str, default: Any = _MISSING) -> Any:
    if name not in data:
        if default is _MISSING:
            raise RolloutFileError(f"{where}: required field '{name}' is missing.")
        return default
    value = data[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if value is None and type(None) in kinds:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise RolloutFileError(f"{where}: field '{name}' must be {names}, got {type(value).__name__} {value!r:.60}.")
    return value


def _results_from_json(raw: dict[str, Any], where: str) -> dict[str, RewardResult]:
    out = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise RolloutFileError(f"{where}: rewards.{name} must be an object with a 'score'.")
        out[name] = RewardResult(score=_get(value, "score", float, f"{where}: rewards.{name}"),
                                 components=_get(value, "components", dict, f"{where}: rewards.{name}", {}),
                                 details=_get(value, "details", dict, f"{where}: rewards.{name}", {}))
    return out


def _check_header(data: dict[str, Any], where: str) -> None:
    version = _get(data, "format_version", int, where)
    if version > ROLLOUT_FORMAT_VERSION:
        raise RolloutFileError(f"{where}: format_version {version} is newer than this RecForge reads "
                               f"({ROLLOUT_FORMAT_VERSION}). Upgrade RecForge to read it.")
    if version < 1:
        raise RolloutFileError(f"{where}: format_version {version} is not valid (1..{ROLLOUT_FORMAT_VERSION}).")
    known = FIELDS + MULTI_TURN_FIELDS + CONSTRAINT_FIELDS
    unknown = [k for k in data if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Known fields: {', '.join(known)}."
        raise RolloutFileError(f"{where}: unknown field '{unknown[0]}'.{hint}")


def _optional_tuple(values: list[Any] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(values)


def _allowed_ids(values: list[Any] | None, where: str) -> tuple[tuple[int, ...], ...] | None:
    if values is None:
        return None
    if not all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in values):
        raise RolloutFileError(f"{where}: field 'allowed_token_ids' must be a list of lists of token ids (ints).")
    return tuple(tuple(ids) for ids in values)


def rollout_from_json(data: Any, where: str = "<record>") -> RolloutRecord:
    """Parse one line's object; errors start with `where` (the reader passes `file:line`)."""
    if not isinstance(data, dict):
        raise RolloutFileError(f"{where}: expected a JSON object per line, got {type(data).__name__}.")
    _check_header(data, where)
    prompt_ids = tuple(_get(data, "prompt_token_ids", list, where, []))
    completion_ids = tuple(_get(data, "completion_token_ids", list, where, []))
    sample = Sample(sample_id=_get(data, "sample_id", str, where), prompt=_get(data, "prompt", str, where),
                    metadata=_get(data, "metadata", dict, where, {}))
    try:
        rollout = Rollout(
            rollout_id=_get(data, "rollout_id", str, where), sample=sample, index=_get(data, "index", int, where, 0),
            prompt_token_ids=prompt_ids, completion_token_ids=completion_ids, text=_get(data, "completion", str, where),
            logprobs=tuple(_get(data, "logprobs", list, where, [])),
            finish_reason=_get(data, "finish_reason", str, where, "stop"),
            policy_version=_get(data, "policy_version", int, where, 0),
            action_mask=_optional_tuple(_get(data, "action_mask", (list, type(None)), where, None)),
            reward_hint=_get(data, "reward_hint", (float, type(None)), where, None),
            info=_get(data, "info", dict, where, {}),
            allowed_token_ids=_allowed_ids(_get(data, "allowed_token_ids", (list, type(None)), where, None), where),
        )
    except RolloutFileError:
        raise
    except ValueError as err:
        raise RolloutFileError(f"{where}: {err}") from err
    return RolloutRecord(
        rollout=rollout,
        num_prompt_tokens=_get(data, "num_prompt_tokens", int, where, len(prompt_ids)),
        num_completion_tokens=_get(data, "num_completion_tokens", int, where, len(completion_ids)),
        step=_get(data, "step", (int, type(None)), where, None),
        reward=_get(data, "reward", (float, type(None)), where, None),
        rewards=_results_from_json(_get(data, "rewards", dict, where, {}), where),
    )


def iter_rollouts(path: str | Path) -> Iterator[RolloutRecord]:
    """Records of a rollout file, lazily; a malformed line raises RolloutFileError naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise RolloutFileError(f"{path}: no such rollout file.")
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise RolloutFileError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from err
            yield rollout_from_json(data, where)


def read_rollouts(path: str | Path, *, limit: int | None = None) -> list[RolloutRecord]:
    """The first `limit` records (all when None) of a rollout file."""
    out = []
    for record in iter_rollouts(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(record)
    return out
