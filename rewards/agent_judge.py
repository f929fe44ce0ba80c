"""`agent_judge`: Agent-as-a-Judge (RecGPT-V2): one sub-evaluator per dimension, a senior-review rule, a grade → score.

Sub-evaluators. For every rollout and every configured dimension (default relevance, factuality, diversity,
personalisation; `dimensions` takes names from `DEFAULT_DIMENSIONS` or a mapping name → question of your own) the
judge model (rewards/judge.py) sees the request the policy answered (the user message of the rollout's prompt), the
policy's answer and one yes/no question, and replies on one line

    PASS: <short reason>        or        FAIL: <short reason>

With `structured=True` (default) vLLM's structured outputs hold the reply to the regex `(PASS|FAIL): [^\\n]+`;
`parse_verdict` reads it either way. An unparsable reply is asked again with a reminder (`retries` times), then fails
the call naming the rollout (`on_unparsable="error"`, default) or, under "report", marks the rollout `judged=False`
(score `unjudged_score`) with the raw replies in the details. Never a silent zero.

Senior review (`senior_review`), with n dimensions, p of them passed, share = p / n:
- B if any *critical* dimension failed;
- S if share >= τ (`tau`, default 1.0: every dimension passed);
- A otherwise: every critical dimension passed, but fewer than τ·n dimensions did (a non-critical one failed).
The issue's rule "B if any dimension fails" is `critical="all"`; then A cannot occur (no critical failure means
share = 1 >= τ), so the default declares only relevance and factuality critical: a wrong or invented answer is B, a
correct but generic or repetitive one is A, one that passes everything is S. τ < 1 lets S tolerate non-critical fails.
The grade becomes the score through `grade_scores` (default S 1.0, A 0.5, B 0.0).

Results: components `judged`, `pass_share` and 1.0/0.0 per dimension (so `reward/agent_judge/<dimension>` is that
dimension's pass rate); details `grade`, `verdicts` {dimension: {pass, reason, attempts}}, `critical`, `tau`.
Verdicts are cached per process by (engine, dimension, question, request, answer), and decoding is greedy, so the
reward is registered deterministic (the service may cache it per (sample, completion)).

This module imports neither ray, vllm nor deepspeed (the engine is loaded on the first call).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rewards.api import reward
from rewards.judge import (
    ON_UNPARSABLE,
    Answer,
    JudgeCache,
    JudgeOutputError,
    JudgeRequest,
    TextGenerator,
    ask,
    clip,
    engine_spec,
    judge_cache,
    judge_engine,
    remember,
    split_cached,
    text_key,
    user_turn,
)
from rl.types import RewardResult, Rollout

DEFAULT_DIMENSIONS: Mapping[str, str] = {
    "relevance": "Does the answer do what the request asks (give the rating or the recommendation it asks for)?",
    "factuality": "Is everything the answer says about the movies and the user's ratings true to the request "
                  "(nothing invented)?",
    "diversity": "Does the answer go beyond repeating the user's history (it brings in something the user has not "
                 "already rated)?",
    "personalisation": "Is the answer's reasoning specific to this user's history rather than generic?",
}
DEFAULT_CRITICAL: tuple[str, ...] = ("relevance", "factuality")
DEFAULT_GRADE_SCORES: Mapping[str, float] = {"S": 1.0, "A": 0.5, "B": 0.0}
GRADES: tuple[str, ...] = ("S", "A", "B")
VERDICT_REGEX = r"(PASS|FAIL): [^\n]+"
PROMPT_VERSION = 1

_VERDICT = re.compile(r"^[\s*\"'`]*(PASS|FAIL)[\s*\"'`]*(?:[:\-–—]\s*(?P<reason>.*))?$", re.IGNORECASE)
_SYSTEM = "You are a strict reviewer of a movie recommender's answers. You check one thing only."


@dataclass(frozen=True, kw_only=True)
class Verdict:
    passed: bool
    reason: str


def parse_verdict(text: str) -> Verdict | None:
    """`PASS: reason` / `FAIL - reason` / a bare `PASS` on the first non-empty line (any case, markdown bold or quotes
    around the word allowed); None for anything else."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    match = _VERDICT.match(lines[0]) if lines else None
    if match is None:
        return None
    return Verdict(passed=match.group(1).upper() == "PASS", reason=(match.group("reason") or "").strip())


def senior_review(passed: Mapping[str, bool], *, critical: Collection[str], tau: float) -> str:
    """S/A/B from per-dimension pass/fail (see the module doc for the rule)."""
    if not passed:
        raise ValueError("senior_review needs at least one dimension verdict.")
    if any(not passed[d] for d in critical):
        return "B"
    share = sum(passed.values()) / len(passed)
    return "S" if share >= tau - 1e-12 else "A"


@dataclass(frozen=True, kw_only=True)
class AgentOptions:
    """The judge's knobs (the reward's kwargs, checked); see `agent_judge`."""

    dimensions: Mapping[str, str]
    critical: tuple[str, ...]
    tau: float = 1.0
    grade_scores: Mapping[str, float]
    structured: bool = True
    retries: int = 2
    on_unparsable: str = "error"
    unjudged_score: float = 0.0
    max_request_chars: int = 2000
    max_answer_chars: int = 1000
    max_new_tokens: int = 48
    engine_id: str = ""

    @classmethod
    def build(cls, *, dimensions: Sequence[str] | Mapping[str, str] | None, critical: Sequence[str] | str,
              grade_scores: Mapping[str, float] | None, **kwargs: Any) -> AgentOptions:
        if dimensions is None:
            dims = dict(DEFAULT_DIMENSIONS)
        elif isinstance(dimensions, Mapping):
            dims = {str(k): str(v) for k, v in dimensions.items()}
        else:
            unknown = [d for d in dimensions if d not in DEFAULT_DIMENSIONS]
            if unknown:
                raise ValueError(f"dimensions {unknown} have no built-in question (built in: "
                                 f"{', '.join(DEFAULT_DIMENSIONS)}); give them as a mapping name → question.")
            dims = {d: DEFAULT_DIMENSIONS[d] for d in dimensions}
        if not dims:
            raise ValueError("dimensions is empty: the agent judge needs at least one dimension.")
        crit = tuple(dims) if critical == "all" else tuple(critical)
        if isinstance(critical, str) and critical != "all" or not set(crit) <= set(dims):
            raise ValueError(f"critical={critical!r} must be 'all' or a list of configured dimensions "
                             f"({', '.join(dims)}).")
        scores = dict(DEFAULT_GRADE_SCORES if grade_scores is None else grade_scores)
        if set(scores) != set(GRADES) or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                 for v in scores.values()):
            raise ValueError(f"grade_scores={grade_scores!r} must map exactly S, A and B to finite numbers.")
        return cls(dimensions=dims, critical=crit, grade_scores={g: float(scores[g]) for g in GRADES}, **kwargs)

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau={self.tau} is the share of passed dimensions that earns S; use (0, 1].")
        if self.on_unparsable not in ON_UNPARSABLE:
            raise ValueError(f"on_unparsable={self.on_unparsable!r} is not one of {ON_UNPARSABLE}.")
        if self.retries < 0 or self.max_new_tokens < 8 or min(self.max_request_chars, self.max_answer_chars) < 100:
            raise ValueError(f"need retries >= 0, max_new_tokens >= 8, max_request_chars and max_answer_chars >= 100; "
                             f"got {self.retries}, {self.max_new_tokens}, {self.max_request_chars}, "
                             f"{self.max_answer_chars}.")


def _clip_middle(text: str, max_chars: int) -> str:
    """Keep the head (history) and the tail (the question) of a long request."""
    if len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    return text[:head].rstrip() + "\n…\n" + text[-(max_chars - head):].lstrip()


def dimension_request(rollout: Rollout, name: str, question: str, opts: AgentOptions) -> JudgeRequest:
    request = _clip_middle(user_turn(rollout.sample.prompt), opts.max_request_chars)
    answer = clip(rollout.text.strip(), opts.max_answer_chars) or "(empty)"
    user = (f"Request to the recommender:\n{request}\n\nThe recommender's answer:\n{answer}\n\n"
            f"Check ({name}): {question}\nReply PASS or FAIL, a colon, and a short reason.")
    return JudgeRequest(system=_SYSTEM, user=user, max_new_tokens=opts.max_new_tokens,
                        regex=VERDICT_REGEX if opts.structured else None)


AgentKey = tuple[Any, ...]
VERDICT_REMINDER = "Reply with one line: PASS or FAIL, a colon, and a short reason."


def agent_plan(rollouts: Sequence[Rollout], opts: AgentOptions
               ) -> tuple[list[dict[str, AgentKey]], dict[AgentKey, JudgeRequest]]:
    """Every dimension of every rollout as a judge request: (per rollout, dimension -> cache key), and the distinct
    requests by key (identical questions are asked once)."""
    keys: list[dict[str, AgentKey]] = []
    requests: dict[AgentKey, JudgeRequest] = {}
    for r in rollouts:
        per_dim = {}
        for name, question in opts.dimensions.items():
            request = dimension_request(r, name, question, opts)
            key = (PROMPT_VERSION, opts.engine_id, opts.structured, name, text_key(request.system, request.user))
            per_dim[name] = key
            requests.setdefault(key, request)
        keys.append(per_dim)
    return keys, requests


def judge_agent(rollouts: Sequence[Rollout], *, generate: TextGenerator, cache: JudgeCache, opts: AgentOptions
                ) -> list[RewardResult]:
    """Every dimension of every rollout in one batch of judge requests (`agent_plan`; cached verdicts are not asked
    again), then the senior review (`agent_results`)."""
    keys, requests = agent_plan(rollouts, opts)
    hits, todo = split_cached(requests, cache)
    asked = ask(generate, list(todo.values()), parse_verdict, retries=opts.retries, reminder=VERDICT_REMINDER)
    return agent_results(rollouts, keys, {**hits, **remember(cache, todo, asked)}, opts)


def agent_results(rollouts: Sequence[Rollout], keys: Sequence[Mapping[str, AgentKey]],
                  answers: Mapping[AgentKey, Answer[Verdict]], opts: AgentOptions) -> list[RewardResult]:
    """The senior review of each rollout's verdicts; an unparsable one fails the batch naming the rollout, or under
    on_unparsable="report" gives judged=False with the replies."""
    results = []
    for r, per_dim in zip(rollouts, keys, strict=True):
        got = {name: answers[key] for name, key in per_dim.items()}
        unparsed = {name: list(a.outputs) for name, a in got.items() if a.value is None}
        if unparsed and opts.on_unparsable == "error":
            raise JudgeOutputError(
                f"the agent judge's replies for rollout '{r.rollout_id}' stayed unparsable after {opts.retries + 1} "
                f"attempt(s) on {', '.join(unparsed)}: {unparsed}. Use structured=True (vLLM structured outputs), a "
                "stronger judge model, or on_unparsable='report' to mark such rollouts judged=False instead.")
        results.append(_result(got, unparsed, opts))
    return results


def _result(got: Mapping[str, Answer[Verdict]], unparsed: Mapping[str, list[str]], opts: AgentOptions
            ) -> RewardResult:
    verdicts = {name: {"pass": a.value.passed, "reason": a.value.reason, "attempts": a.attempts}
                for name, a in got.items() if a.value is not None}
    if unparsed:
        return RewardResult(score=opts.unjudged_score, components={"judged": 0.0},
                            details={"judged": False, "reason": "judge replies unparsable", "unparsed": dict(unparsed),
                                     "verdicts": verdicts})
    passed = {name: bool(v["pass"]) for name, v in verdicts.items()}
    grade = senior_review(passed, critical=opts.critical, tau=opts.tau)
    components = {"judged": 1.0, "pass_share": sum(passed.values()) / len(passed),
                  **{name: float(p) for name, p in passed.items()}}
    details = {"judged": True, "grade": grade, "verdicts": verdicts, "critical": list(opts.critical),
               "tau": opts.tau}
    return RewardResult(score=opts.grade_scores[grade], components=components, details=details)


@reward("agent_judge", deterministic=True)
def agent_judge(
    rollouts: Sequence[Rollout],
    *,
    dimensions: Sequence[str] | Mapping[str, str] | None = None,
    critical: Sequence[str] | str = DEFAULT_CRITICAL,
    tau: float = 1.0,
    grade_scores: Mapping[str, float] | None = None,
    structured: bool = True,
    retries: int = 2,
    on_unparsable: str = "error",
    unjudged_score: float = 0.0,
    max_request_chars: int = 2000,
    max_answer_chars: int = 1000,
    max_new_tokens: int = 48,
    cache_size: int = 100_000,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_model_len: int = 2048,
    kv_cache_gib: float = 1.0,
    gpu_memory_utilization: float = 0.3,
    enforce_eager: bool = True,
) -> list[RewardResult]:
    """Agent-as-a-Judge: PASS/FAIL per dimension, senior review S/A/B, grade → score (see the module doc).

    dimensions: names from DEFAULT_DIMENSIONS, or a mapping name → question (None = all four defaults).
    critical: dimensions whose failure means B ("all" = every dimension). tau: pass share that earns S.
    grade_scores: {"S": .., "A": .., "B": ..} (default 1.0 / 0.5 / 0.0).
    structured / retries / on_unparsable / unjudged_score: answer format and what happens when it is unreadable.
    max_request_chars / max_answer_chars / max_new_tokens: prompt and reply budgets.
    cache_size: verdicts kept per process. model ... enforce_eager: the judge engine (rewards/judge.py).
    """
    spec = engine_spec(model=model, device=device, dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
    opts = AgentOptions.build(
        dimensions=dimensions, critical=critical, grade_scores=grade_scores, tau=tau, structured=structured,
        retries=retries, on_unparsable=on_unparsable, unjudged_score=unjudged_score,
        max_request_chars=max_request_chars, max_answer_chars=max_answer_chars, max_new_tokens=max_new_tokens,
        engine_id=spec.model)
    return judge_agent(rollouts, generate=judge_engine(spec), cache=judge_cache("agent_judge", cache_size), opts=opts)
