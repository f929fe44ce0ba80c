"""Rule rewards: `format` (the answer parses), `ranking` (NDCG/HR of a ranking, yes/no, rating), `length` (word band).

All three are deterministic and cheap; they read only the completion text and the sample's metadata. For the
rec_reasoning recipe (pointwise user-item reasoning on MovieLens) the prompt asks the model to reason and end with a
line `Rating: N`, N in 1..5; sample metadata holds `rating` (the held-out true rating, int 1..5) and `liked`
(bool, rating >= 4). An unparsable answer scores 0 with `details["parsed"] = False`: that is the reward's verdict,
recorded as such, not an error. Missing metadata is an error (it names the key), because scoring it 0 would train the
policy on a bug.

This module imports neither ray, vllm nor deepspeed (a test checks `sys.modules`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rewards.api import reward
from rl.types import RewardResult, Rollout

RATING_PATTERN = r"(?im)^[ \t]*\**rating\**[ \t]*:[ \t]*\**[ \t]*([1-5])[ \t]*\**[ \t]*\Z"
"""The final answer of rec_reasoning: the completion's last line is `Rating: N`, N in 1..5 (case-insensitive,
optional markdown bold). Matched against the stripped completion; group 1 is the answer."""
YES_NO_PATTERN = r"(?im)^[ \t]*\**answer\**[ \t]*:[ \t]*\**[ \t]*(yes|no)\b[^\n]*\Z"
"""Pointwise like/dislike: the last line is `Answer: yes` or `Answer: no`."""
RANKING_MARKER = r"(?i)\branking\s*:"
"""Where the ranking starts in `ranking` mode "ndcg": after the last `Ranking:`; the whole completion if absent."""


def _compile(pattern: str, kwarg: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"kwargs.{kwarg}={pattern!r} is not a valid regular expression: {err}.") from err


def parse_final_answer(text: str, pattern: str | re.Pattern[str] = RATING_PATTERN) -> str | None:
    """The answer `pattern` captures (group 1, else the whole match) in the stripped completion; the last match wins."""
    regex = pattern if isinstance(pattern, re.Pattern) else _compile(pattern, "pattern")
    matches = list(regex.finditer(text.strip()))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if regex.groups else last.group(0)


def _metadata(rollout: Rollout, key: str, kind: type | tuple[type, ...]) -> Any:
    meta = rollout.sample.metadata
    if key not in meta:
        raise KeyError(f"sample metadata has no '{key}' (it has: {', '.join(sorted(meta)) or 'nothing'})")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TypeError(f"sample metadata '{key}' is {type(value).__name__} {value!r}, expected {kind}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# format


@reward("format", deterministic=True)
def format_reward(rollouts: Sequence[Rollout], *, pattern: str = RATING_PATTERN) -> list[RewardResult]:
    """1.0 if the completion ends in a parsable final answer (default `Rating: N`, N in 1..5), else 0.0."""
    regex = _compile(pattern, "pattern")
    out = []
    for r in rollouts:
        answer = parse_final_answer(r.text, regex)
        details = {"parsed": answer is not None} | ({"answer": answer} if answer is not None else {})
        out.append(RewardResult(score=1.0 if answer is not None else 0.0, details=details))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ranking


def dcg(relevance: Sequence[float], k: int) -> float:
    """DCG@k = Σ_{i=1..k} rel_i / log2(i + 1) (binary relevance here)."""
    return sum(rel / math.log2(i + 2) for i, rel in enumerate(relevance[:k]))


def ndcg_at_k(ranking: Sequence[str], positives: set[str], k: int) -> float:
    """NDCG@k with binary relevance: DCG@k / IDCG@k, IDCG putting min(k, |positives|) positives first."""
    ideal = dcg([1.0] * min(k, len(positives)), k)
    return dcg([1.0 if x in positives else 0.0 for x in ranking], k) / ideal if ideal > 0 else 0.0


def hit_at_k(ranking: Sequence[str], positives: set[str], k: int) -> float:
    return 1.0 if any(x in positives for x in ranking[:k]) else 0.0


def parse_ranking(text: str, candidates: Sequence[str]) -> list[str]:
    """Candidates in the order the completion first mentions them, after its last `Ranking:` (if any).

    Ids match as whole words (`12` does not match inside `112`), titles case-insensitively. Candidates never
    mentioned are left out: an incomplete ranking ranks them below everything (relevance 0 at those positions).
    """
    markers = list(re.finditer(RANKING_MARKER, text))
    answer = text[markers[-1].end():] if markers else text
    positions = []
    for cand in candidates:
        match = re.search(rf"(?<![\w]){re.escape(cand)}(?![\w])", answer, flags=re.IGNORECASE)
        if match is not None:
            positions.append((match.start(), -len(cand), cand))  # at one position, the longer candidate wins
    ranked, seen_at = [], set()
    for start, _, cand in sorted(positions):
        if start not in seen_at:
            ranked.append(cand)
            seen_at.add(start)
    return ranked


def _ranking_ndcg(rollout: Rollout, *, k: int, pattern: str | None) -> RewardResult:
    candidates = [str(c) for c in _metadata(rollout, "candidates", (list, tuple))]
    positives = {str(p) for p in _metadata(rollout, "positives", (list, tuple))}
    ranking = parse_ranking(rollout.text, candidates)
    ndcg, hit = ndcg_at_k(ranking, positives, k), hit_at_k(ranking, positives, k)
    return RewardResult(score=ndcg, components={f"ndcg@{k}": ndcg, f"hr@{k}": hit},
                        details={"parsed": bool(ranking), "ranking": ranking[:k]})


def _ranking_yes_no(rollout: Rollout, *, k: int, pattern: str | None) -> RewardResult:
    liked = _metadata(rollout, "liked", bool)
    answer = parse_final_answer(rollout.text, pattern or YES_NO_PATTERN)
    if answer is None:
        return RewardResult(score=0.0, components={"parsed": 0.0}, details={"parsed": False, "liked": liked})
    said_yes = answer.strip().lower() == "yes"
    return RewardResult(score=1.0 if said_yes == liked else 0.0, components={"parsed": 1.0},
                        details={"parsed": True, "answer": said_yes, "liked": liked})


def _ranking_rating(rollout: Rollout, *, k: int, pattern: str | None) -> RewardResult:
    true = _metadata(rollout, "rating", int)
    if not 1 <= true <= 5:
        raise ValueError(f"sample metadata 'rating'={true} is outside 1..5 (unrated items have no rating to match)")
    answer = parse_final_answer(rollout.text, pattern or RATING_PATTERN)
    pred = int(answer) if answer is not None and answer.strip().isdigit() else None
    if pred is None or not 1 <= pred <= 5:
        return RewardResult(score=0.0, components={"parsed": 0.0, "exact": 0.0},
                            details={"parsed": False, "rating": true})
    score = 1.0 - abs(pred - true) / 4.0  # 1 for the exact rating, 0 for the opposite end of the 1..5 scale
    return RewardResult(score=score, components={"parsed": 1.0, "exact": float(pred == true)},
                        details={"parsed": True, "predicted": pred, "rating": true})


RANKING_MODES: Mapping[str, Callable[..., RewardResult]] = {
    "ndcg": _ranking_ndcg,
    "yes_no": _ranking_yes_no,
    "rating": _ranking_rating,
}


@reward("ranking", deterministic=True)
def ranking_reward(
    rollouts: Sequence[Rollout], *, mode: str = "rating", k: int = 10, pattern: str | None = None
) -> list[RewardResult]:
    """Recommendation accuracy: mode "ndcg" (NDCG@k, HR@k of a ranking), "yes_no" (vs liked) or "rating" (1-|Δ|/4).

    ndcg: metadata `candidates` (ids or titles) and `positives`; the ranking is parsed with `parse_ranking`.
    yes_no: metadata `liked`; the answer is the last line `Answer: yes|no` (or `pattern`).
    rating: metadata `rating`; the answer is the last line `Rating: N` (or `pattern`); score 1 − |pred − true| / 4.
    """
    if mode not in RANKING_MODES:
        close = difflib.get_close_matches(mode, list(RANKING_MODES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"kwargs.mode={mode!r} is not one of {', '.join(RANKING_MODES)}.{hint}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"kwargs.k={k!r} must be an integer >= 1.")
    if pattern is not None:
        _compile(pattern, "pattern")
    score_one = RANKING_MODES[mode]
    return [score_one(r, k=k, pattern=pattern) for r in rollouts]


# ---------------------------------------------------------------------------------------------------------------------
# length


def length_band(num_words: int, lo: int, hi: int, margin: int) -> float:
    """RecGPT-V2's band reward: 1 inside [lo, hi], 0.5 within `margin` words outside the band, 0 beyond."""
    if lo <= num_words <= hi:
        return 1.0
    if lo - margin <= num_words <= hi + margin:
        return 0.5
    return 0.0


@reward("length", deterministic=True)
def length_reward(rollouts: Sequence[Rollout], *, lo: int = 20, hi: int = 120, margin: int = 20) -> list[RewardResult]:
    """Band on the completion's word count: 1.0 in [lo, hi], 0.5 within `margin` words outside, 0.0 beyond."""
    if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(margin, int)) or not 0 <= lo <= hi:
        raise ValueError(f"kwargs lo={lo!r}, hi={hi!r} must be integers with 0 <= lo <= hi.")
    if margin < 0:
        raise ValueError(f"kwargs.margin={margin!r} must be >= 0.")
    out = []
    for r in rollouts:
        words = len(r.text.split())
        out.append(RewardResult(score=length_band(words, lo, hi, margin), details={"words": words}))
    return out
