"""`semantic_judge`: the Personalized Semantic Judge of S-GRec, stage 1 (an LLM grades aspects) + stage 2 (w(x)).

Stage 1. An LLM (rewards/judge.py: any vLLM chat model, the embedded SmolLM2-135M-Instruct by default) is shown the
user's history and the recommended item and answers one line

    profile_fit=N future_interest=N novelty=N context=N          (N a level in 1..num_levels, default 1..5)

With `structured=True` (default) vLLM's structured outputs hold the answer to exactly that regex, so it always
parses unless cut off; otherwise `parse_levels` reads it (each aspect exactly once, `name=N` or `name: N`, in range).
An unparsable answer is asked again with a reminder (`retries` times), then, under `on_unparsable="error"`
(default), fails the call with a `JudgeOutputError` naming the rollout and the answers; under "report" the rollout
gets `judged=False` with `details["judge_parsed"] = False` and the answers. Never a silent zero.

Stage 2. r(x, a) = w(x)ᵀ s(x, a) with s = (level − 1) / (num_levels − 1) ∈ [0, 1]^4 and w(x) on the simplex from the
aggregator artifact (rewards/aggregator.py, `python -m rewards.train aggregator`), so r ∈ [0, 1].

Where x and a come from. The user's history is read from the rollout's prompt, the request the policy answered:
lines `- <item>: rated N/5` (rollouts/envs/rec.py `reasoning_prompt`) or `K. <item>` / `K. <item> (rated N/5)`
(`next_item_prompt`), where <item> is `Title (Year) [Genre, ...]`; the last `max_history` are shown to the judge and
featurised for w(x) (a line without a rating counts as liked, rating 4: the user chose to watch it). A prompt without
such lines is an error (a judge without the history is not personalised). The user id is metadata `user_id`; the item
is chosen by `item_parser` as in rewards/items.py: "metadata" (default) reads metadata `item_key` (default
"item_id") and describes it by the prompt's `Candidate: <item>` line, or by the MovieLens catalogue when the prompt
has none; "item_id"/"title" parse the completion and describe the item from the catalogue. A completion that names no
known item is the policy's fault: score `unparsed_score` (default 0, the bottom of r's range), component `parsed` 0.

`sample_fraction` < 1 judges only part of the rollouts: rollout r is judged iff
u = sha256(f"{seed}:{r.policy_version}:{r.rollout_id}") / 2^64 < sample_fraction — deterministic, independent of
batching, about `sample_fraction` of the rollouts (not exactly round(f·N)); the policy version changes the pick
every step, so the same prompt positions are not judged every epoch. An unjudged rollout gets score `unjudged_score`
(default 0), component `judged` 0 and `details["judged"] = False`.

For A2PO (rl/advantages.py `a2po_advantages`): semantic_N = the semantic_judge score, has_semantic_N =
`components["judged"] == 1.0`; A2PO then uses A = A_biz for the others, so `unjudged_score` never enters an
advantage. Do not put a partially judged semantic_judge into a weighted sum: unjudged rollouts would count as 0.

Cache: verdicts (levels) are kept per process per (user, item), keyed also by a digest of the judge prompt (history and
item text, levels, format) and the engine, so a changed history is judged again and identical inputs never are.
Under the Ray service the cache lives in the reward actor and survives across steps. The reward is registered
deterministic=False (the pick depends on the rollout id, which the service's (sample, completion) cache does not see).

This module imports neither ray, vllm nor deepspeed (the engine is loaded on the first judged rollout).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.aggregator import ASPECTS, AspectAggregator, HistoryItem, aspect_scores_from_levels, load_aggregator
from rewards.api import reward
from rewards.items import ITEM_ID_PATTERN, ITEM_PARSERS, generated_item, metadata_value, sid_index_for, title_index
from rewards.judge import (
    ON_UNPARSABLE,
    Answer,
    JudgeCache,
    JudgeOutputError,
    JudgeRequest,
    TextGenerator,
    ask,
    engine_spec,
    judge_cache,
    judge_engine,
    remember,
    split_cached,
    text_key,
    user_turn,
)
from rl import assets
from rl.types import RewardResult, Rollout

ASPECT_QUESTIONS: Mapping[str, str] = {
    "profile_fit": "does it match the user's overall taste?",
    "future_interest": "will the user want to watch it soon?",
    "novelty": "is it new to the user, unlike what they already watched?",
    "context": "does it suit the movies the user watched most recently?",
}
WATCHED_RATING = 4
"""Rating given to a history line without one (next-item prompts list what the user watched)."""
PROMPT_VERSION = 1
"""Part of the cache key: bump when the judge prompt changes."""

_ITEM = re.compile(r"^(?P<title>.+?)(?:\s+\((?P<year>\d{4})\))?\s+\[(?P<genres>[^\]]*)\]$")
_RATED_LINE = re.compile(r"(?m)^[ \t]*-[ \t]+(?P<item>.+?):[ \t]*rated[ \t]+(?P<rating>\d+)/5[ \t]*$")
_NUMBERED_LINE = re.compile(r"(?m)^[ \t]*\d+\.[ \t]+(?P<item>.+?)(?:[ \t]+\(rated[ \t]+(?P<rating>\d+)/5\))?[ \t]*$")
_CANDIDATE_LINE = re.compile(r"(?m)^[ \t]*Candidate:[ \t]*(?P<item>.+?)[ \t]*$")


@dataclass(frozen=True, kw_only=True)
class HistoryLine:
    """One item of the user's history as the prompt wrote it."""

    text: str
    """`Title (Year) [Genres]` (or whatever the prompt wrote for the item)."""
    rating: int | None
    item: HistoryItem
    """For w(x): genres, rating (WATCHED_RATING when the prompt gave none), year."""


def parse_item_text(text: str, rating: int | None) -> HistoryLine:
    match = _ITEM.match(text.strip())
    genres: tuple[str, ...] = ()
    year = ""
    if match:
        year = match.group("year") or ""
        names = (g.strip() for g in match.group("genres").split(","))
        genres = tuple(g for g in names if g and g != "unknown genre")
    item = HistoryItem(genres=genres, rating=rating if rating is not None else WATCHED_RATING, year=year)
    return HistoryLine(text=text.strip(), rating=rating, item=item)


def parse_history(request: str) -> list[HistoryLine]:
    """The history lines of a rec prompt's user message, in prompt order (oldest first); see the module doc."""
    rated = [(m.start(), m.group("item"), int(m.group("rating"))) for m in _RATED_LINE.finditer(request)]
    numbered = [(m.start(), m.group("item"), int(m.group("rating")) if m.group("rating") else None)
                for m in _NUMBERED_LINE.finditer(request)]
    return [parse_item_text(text, rating) for _, text, rating in sorted(rated + numbered)]


def parse_candidate(request: str) -> str | None:
    """The item of the last `Candidate: <item>` line of a rec prompt, or None."""
    found = _CANDIDATE_LINE.findall(request)
    return found[-1] if found else None


def levels_regex(num_levels: int) -> str:
    """The structured-output regex of the judge's answer line."""
    return " ".join(f"{aspect}=[1-{num_levels}]" for aspect in ASPECTS)


def parse_levels(text: str, num_levels: int) -> tuple[int, ...] | None:
    """Levels in `ASPECTS` order from `profile_fit=4 future_interest=3 novelty=2 context=5` (also `name: N`, any case,
    spaces for underscores, any order, any surrounding text); None unless every aspect appears with one value in
    1..num_levels."""
    levels = []
    for aspect in ASPECTS:
        name = r"[ _]".join(aspect.split("_"))
        values = {int(v) for v in re.findall(rf"(?i)\b{name}\**\s*[=:]\s*\**\s*(\d+)\b", text)}
        if len(values) != 1 or not 1 <= next(iter(values)) <= num_levels:
            return None
        levels.append(values.pop())
    return tuple(levels)


def judge_prompt(history: Sequence[HistoryLine], candidate: str, *, num_levels: int) -> tuple[str, str]:
    """(system, user) messages of the stage-1 judge."""
    system = (f"You judge how well a movie suits a user. You give each aspect a level from 1 (very poor) to "
              f"{num_levels} (excellent).")
    rated = all(h.rating is not None for h in history)
    header = ("The user rated these movies (1 = hated, 5 = loved), oldest first:" if rated
              else "The user watched these movies, oldest first:")
    lines = [f"- {h.text}: {h.rating}" if h.rating is not None else f"- {h.text}" for h in history]
    questions = "\n".join(f"{aspect}: {question}" for aspect, question in ASPECT_QUESTIONS.items())
    answer = " ".join(f"{aspect}=N" for aspect in ASPECTS)
    user = (f"{header}\n" + "\n".join(lines) + f"\n\nCandidate: {candidate}\n\nRate the candidate on four aspects:\n"
            f"{questions}\nReply on one line as: {answer}")
    return system, user


def selected_for_judge(rollout: Rollout, *, fraction: float, seed: int) -> bool:
    """Whether `rollout` gets a judge call under `sample_fraction=fraction` (see the module doc)."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}:{rollout.policy_version}:{rollout.rollout_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclass(frozen=True, kw_only=True)
class SemanticOptions:
    """The judge's knobs (the reward's kwargs, checked); see `semantic_judge`."""

    num_levels: int = 5
    sample_fraction: float = 1.0
    seed: int = 0
    structured: bool = True
    retries: int = 2
    on_unparsable: str = "error"
    unjudged_score: float = 0.0
    unparsed_score: float = 0.0
    max_history: int = 10
    max_new_tokens: int = 32
    item_parser: str = "metadata"
    item_key: str = "item_id"
    item_pattern: str = ITEM_ID_PATTERN
    sid_index: str | None = None
    """Index JSON of item_parser "sid" (the completion is a semantic ID)."""
    engine_id: str = ""
    """Identifies the judge model in cache keys."""

    def __post_init__(self) -> None:
        if not 2 <= self.num_levels <= 9:
            raise ValueError(f"num_levels={self.num_levels} must lie in 2..9 (one digit per level).")
        if not 0.0 <= self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction={self.sample_fraction} is the share of rollouts judged; use [0, 1].")
        if self.on_unparsable not in ON_UNPARSABLE:
            raise ValueError(f"on_unparsable={self.on_unparsable!r} is not one of {ON_UNPARSABLE}.")
        if self.item_parser not in ITEM_PARSERS:
            raise ValueError(f"item_parser={self.item_parser!r} is not one of {ITEM_PARSERS}.")
        if self.max_history < 1 or self.retries < 0 or self.max_new_tokens < 8:
            raise ValueError(f"need max_history >= 1, retries >= 0, max_new_tokens >= 8; got {self.max_history}, "
                             f"{self.retries}, {self.max_new_tokens}.")


@dataclass(frozen=True, kw_only=True)
class _Case:
    """A judged rollout before its verdict: who, what, and the question to the judge."""

    index: int
    user_id: int
    item_id: int
    history: list[HistoryLine]
    request: JudgeRequest
    key: tuple[Any, ...]


Catalogue = Callable[[], Mapping[int, Any]]


def _case(i: int, r: Rollout, opts: SemanticOptions, catalogue: Catalogue) -> _Case | RewardResult:
    """The judge request of rollout `r`, or its result when its completion names no known item."""
    user_id = metadata_value(r, "user_id", int)
    request = user_turn(r.sample.prompt)
    history = parse_history(request)[-opts.max_history:]
    if not history:
        raise ValueError(f"rollout '{r.rollout_id}': no user history in its prompt (expected lines '- Title (Year) "
                         "[Genres]: rated N/5' or 'K. Title (Year) [Genres]', as rollouts/envs/rec.py writes them); "
                         "the semantic judge needs the history to personalise its verdict.")
    candidate = parse_candidate(request) if opts.item_parser == "metadata" else None
    if candidate is not None:
        item_id = metadata_value(r, opts.item_key, int)
    else:
        items = catalogue()
        titles = title_index(items) if opts.item_parser == "title" else None
        found = generated_item(r, parser=opts.item_parser, catalogue=items, item_key=opts.item_key,
                               pattern=opts.item_pattern, titles=titles,
                               sid_index=sid_index_for(opts.item_parser, opts.sid_index))
        if found.item_id is None:
            return RewardResult(score=opts.unparsed_score, components={"judged": 1.0, "parsed": 0.0},
                                details={"judged": True, "parsed": False, "reason": found.reason, "raw": found.raw})
        item_id, candidate = found.item_id, items[found.item_id].describe()
    system, user = judge_prompt(history, candidate, num_levels=opts.num_levels)
    judge_request = JudgeRequest(system=system, user=user, max_new_tokens=opts.max_new_tokens,
                                 regex=levels_regex(opts.num_levels) if opts.structured else None)
    key = (PROMPT_VERSION, opts.engine_id, opts.num_levels, opts.structured, user_id, item_id, text_key(system, user))
    return _Case(index=i, user_id=user_id, item_id=item_id, history=history, request=judge_request, key=key)


@dataclass(frozen=True, kw_only=True)
class SemanticPlan:
    """Stage 1 before the judge model: the results decided without it (None where a case waits for a verdict) and
    the cases to judge; `requests` are the distinct judge requests by cache key."""

    results: list[RewardResult | None]
    cases: list[_Case]

    @property
    def requests(self) -> dict[tuple[Any, ...], JudgeRequest]:
        return {case.key: case.request for case in self.cases}


def semantic_plan(rollouts: Sequence[Rollout], *, opts: SemanticOptions, catalogue: Catalogue) -> SemanticPlan:
    """Which rollouts the judge is asked about and how; not-picked ones (`sample_fraction`) and completions naming
    no known item get their result here."""
    results: list[RewardResult | None] = [None] * len(rollouts)
    cases = []
    for i, r in enumerate(rollouts):
        if not selected_for_judge(r, fraction=opts.sample_fraction, seed=opts.seed):
            results[i] = RewardResult(score=opts.unjudged_score, components={"judged": 0.0},
                                      details={"judged": False, "reason": f"not picked (sample_fraction="
                                               f"{opts.sample_fraction:g}, seed={opts.seed})"})
            continue
        case = _case(i, r, opts, catalogue)
        if isinstance(case, RewardResult):
            results[i] = case
        else:
            cases.append(case)
    return SemanticPlan(results=results, cases=cases)


def levels_reminder(num_levels: int) -> str:
    """What an unparsable answer is re-asked with."""
    answer = " ".join(f"{a}=N" for a in ASPECTS)
    return f"Reply with exactly one line: {answer}, N from 1 to {num_levels}."


def judge_semantic(rollouts: Sequence[Rollout], *, generate: TextGenerator, aggregator: AspectAggregator,
                   cache: JudgeCache, opts: SemanticOptions, catalogue: Catalogue) -> list[RewardResult]:
    """Stage 1 + stage 2 on a batch (the reward without engine, artifact and data loading): `semantic_plan`, the
    cached verdicts, the judge model (`generate`) for the others, then `semantic_results`."""
    plan = semantic_plan(rollouts, opts=opts, catalogue=catalogue)
    hits, todo = split_cached(plan.requests, cache)
    asked = ask(generate, list(todo.values()), functools.partial(parse_levels, num_levels=opts.num_levels),
                retries=opts.retries, reminder=levels_reminder(opts.num_levels))
    verdicts = {**hits, **remember(cache, todo, asked)}
    return semantic_results(rollouts, plan, verdicts, cached=set(hits), aggregator=aggregator, opts=opts)


def semantic_results(rollouts: Sequence[Rollout], plan: SemanticPlan,
                     verdicts: Mapping[tuple[Any, ...], Answer[tuple[int, ...]]], *,
                     cached: Collection[tuple[Any, ...]], aggregator: AspectAggregator,
                     opts: SemanticOptions) -> list[RewardResult]:
    """Stage 2: every rollout's result from the judge's verdict on its case (`cached`: keys whose verdict came from
    the cache). An unparsable verdict fails the batch naming the rollout, or under on_unparsable="report" gives
    judged=False with the judge's answers."""
    results = list(plan.results)
    failed = [(c, verdicts[c.key]) for c in plan.cases if verdicts[c.key].value is None]
    if failed and opts.on_unparsable == "error":
        c, answer = failed[0]
        raise JudgeOutputError(
            f"the judge's answer for rollout '{rollouts[c.index].rollout_id}' stayed unparsable after "
            f"{answer.attempts} attempt(s): {[a[:120] for a in answer.outputs]}"
            + (f" ({len(failed) - 1} more rollout(s) too)" if len(failed) > 1 else "")
            + ". Use structured=True (vLLM structured outputs), a stronger judge model, or on_unparsable='report' "
              "to mark such rollouts judged=False instead.")
    parsed = [c for c in plan.cases if verdicts[c.key].value is not None]
    if parsed:
        levels_B4 = [verdicts[c.key].value for c in parsed]
        aspects_B4 = aspect_scores_from_levels(levels_B4, opts.num_levels)
        weights_B4 = aggregator.weights_B4([c.user_id for c in parsed], [[h.item for h in c.history] for c in parsed])
        scores_B = (weights_B4 * aspects_B4).sum(-1).tolist()
        for c, score, w_4 in zip(parsed, scores_B, weights_B4.tolist(), strict=True):
            results[c.index] = _judged(c, (verdicts[c.key], c.key in cached), score, w_4)
    for c, answer in failed:
        results[c.index] = RewardResult(
            score=opts.unjudged_score, components={"judged": 0.0, "parsed": 1.0},
            details={"judged": False, "judge_parsed": False, "user_id": c.user_id, "item_id": c.item_id,
                     "judge_outputs": list(answer.outputs), "reason": "judge answer unparsable"})
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _judged(case: _Case, verdict: tuple[Answer[tuple[int, ...]], bool], score: float, weights: Sequence[float]
            ) -> RewardResult:
    answer, cached = verdict
    levels = dict(zip(ASPECTS, answer.value or (), strict=True))
    components = {"judged": 1.0, "parsed": 1.0, **{a: float(v) for a, v in levels.items()}}
    details = {"judged": True, "parsed": True, "levels": levels, "weights": dict(zip(ASPECTS, weights, strict=True)),
               "user_id": case.user_id, "item_id": case.item_id, "history_len": len(case.history),
               "judge_output": answer.outputs[-1], "attempts": answer.attempts, "cached": cached}
    return RewardResult(score=score, components=components, details=details)


@functools.lru_cache(maxsize=2)
def _movielens_items(data_dir: str) -> Mapping[int, Any]:
    from rollouts.envs.rec import RecData

    return RecData.load_movielens(Path(data_dir)).items


def _load_aggregator(aggregator: str | None) -> AspectAggregator:
    return AspectAggregator.uniform() if aggregator == "uniform" else load_aggregator(aggregator)


@reward("semantic_judge", deterministic=False)
def semantic_judge(
    rollouts: Sequence[Rollout],
    *,
    aggregator: str | None = None,
    num_levels: int = 5,
    sample_fraction: float = 1.0,
    seed: int = 0,
    structured: bool = True,
    retries: int = 2,
    on_unparsable: str = "error",
    unjudged_score: float = 0.0,
    unparsed_score: float = 0.0,
    max_history: int = 10,
    max_new_tokens: int = 32,
    item_parser: str = "metadata",
    item_key: str = "item_id",
    item_pattern: str = ITEM_ID_PATTERN,
    sid_index: str | None = None,
    data_dir: str | None = None,
    cache_size: int = 100_000,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int = 2048,
    kv_cache_gib: float = 1.0,
    gpu_memory_utilization: float = 0.3,
    enforce_eager: bool = True,
) -> list[RewardResult]:
    """Personalized Semantic Judge: LLM aspect levels s(x, a), reward w(x)ᵀ s(x, a) ∈ [0, 1] (see the module doc).

    aggregator: w(x) artifact directory (None = `$RECFORGE_HOME/artifacts/aggregator`), or "uniform" for w = ¼.
    num_levels: levels per aspect (2..9). sample_fraction / seed: which rollouts are judged (judged=False otherwise).
    structured: constrain answers with vLLM structured outputs. retries: re-asks of an unparsable answer.
    on_unparsable: "error" (fail naming the rollout) or "report" (judged=False, judge_parsed=False).
    unjudged_score / unparsed_score: score without a verdict / for a completion naming no known item.
    max_history: history lines shown to the judge. max_new_tokens: answer budget.
    item_parser / item_key / item_pattern / sid_index / data_dir: which item is judged (rewards/items.py; MovieLens
    catalogue; sid_index is the index JSON of item_parser "sid").
    cache_size: verdicts kept per process. model ... enforce_eager: the judge engine (rewards/judge.py).
    """
    spec = engine_spec(model=model, device=device, dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
    opts = SemanticOptions(
        num_levels=num_levels, sample_fraction=sample_fraction, seed=seed, structured=structured, retries=retries,
        on_unparsable=on_unparsable, unjudged_score=unjudged_score, unparsed_score=unparsed_score,
        max_history=max_history, max_new_tokens=max_new_tokens, item_parser=item_parser, item_key=item_key,
        item_pattern=item_pattern, sid_index=sid_index, engine_id=spec.model)
    directory = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    catalogue = functools.partial(_movielens_items, directory) if directory else (
        lambda: _movielens_items(str(assets.require("data"))))
    return judge_semantic(rollouts, generate=judge_engine(spec), aggregator=_load_aggregator(aggregator),
                          cache=judge_cache("semantic_judge", cache_size), opts=opts, catalogue=catalogue)
