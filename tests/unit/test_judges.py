"""LLM judges without an LLM: answer parsers, the senior-review grade rule, w(x)ᵀ s by hand, retries, caches,
sample_fraction picks, and the engine handle's batching. A fake text generator stands in for the judge model (the
real vLLM engine is exercised in tests/integration/test_judges.py)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from rewards.agent_judge import (
    DEFAULT_DIMENSIONS,
    VERDICT_REGEX,
    AgentOptions,
    judge_agent,
    parse_verdict,
    senior_review,
)
from rewards.aggregator import ASPECTS, AspectAggregator, AspectWeights, FeatureLayout, load_aggregator, save_aggregator
from rewards.api import resolve_reward
from rewards.judge import (
    EngineSpec,
    JudgeCache,
    JudgeEngine,
    JudgeOutputError,
    JudgeRequest,
    ask,
    judge_engine,
    user_turn,
)
from rewards.semantic_judge import (
    SemanticOptions,
    judge_prompt,
    judge_semantic,
    levels_regex,
    parse_candidate,
    parse_history,
    parse_levels,
    selected_for_judge,
)
from rl.advantages import a2po_advantages
from rl.rollout_io import make_rollout, read_rollouts

SAMPLE = Path(__file__).resolve().parents[2] / "rewards" / "data" / "sample_rollouts.jsonl"
HISTORY = ("Movies this user rated, oldest first:\n"
           "- Star Wars (1977) [Action, Adventure, Sci-Fi]: rated 5/5\n"
           "- Sleepless in Seattle (1993) [Comedy, Romance]: rated 2/5\n")


def chatml(user: str, system: str = "You are a movie recommender.") -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def rec_rollout(candidate: str = "Alien (1979) [Horror, Sci-Fi]", *, sample_id: str = "u1-i10", index: int = 0,
                user_id: int = 1, item_id: int = 10, text: str = "Rating: 4", policy_version: int = 0):
    prompt = chatml(HISTORY + f"\nCandidate: {candidate}\nHow will this user rate the candidate?")
    return make_rollout(text, sample_id=sample_id, index=index, prompt=prompt, policy_version=policy_version,
                        metadata={"user_id": user_id, "item_id": item_id})


class FakeJudge:
    """Answers each request from a function of its user message; records every batch it was sent."""

    def __init__(self, answer):
        self.answer = answer
        self.batches: list[list[JudgeRequest]] = []

    def __call__(self, requests):
        self.batches.append(list(requests))
        return [self.answer(r.user) for r in requests]

    @property
    def num_requests(self) -> int:
        return sum(len(b) for b in self.batches)


def levels_for(user: str) -> str:
    """Alien → 5 3 1 4; anything else → 1 1 1 1."""
    return ("profile_fit=5 future_interest=3 novelty=1 context=4" if "Candidate: Alien" in user
            else "profile_fit=1 future_interest=1 novelty=1 context=1")


def opts(**kw) -> SemanticOptions:
    return SemanticOptions(**kw)


def no_catalogue():
    raise AssertionError("the catalogue must not be loaded when the prompt names the candidate")


class FixedWeights:
    """An aggregator stand-in with w(x) = (0.4, 0.3, 0.2, 0.1) for every user."""

    def weights_B4(self, user_ids, histories):
        return torch.tensor([[0.4, 0.3, 0.2, 0.1]] * len(user_ids))


# ---------------------------------------------------------------------------------------------------------------------
# Semantic judge: parsing.


def test_levels_parse_from_the_strict_line_and_tolerated_variants():
    assert parse_levels("profile_fit=4 future_interest=3 novelty=2 context=5", 5) == (4, 3, 2, 5)
    assert parse_levels("Profile fit: 4\nFuture interest: 3\n**Novelty**: 2\ncontext = 5", 5) == (4, 3, 2, 5)
    assert parse_levels("context=1 novelty=1 future_interest=2 profile_fit=3", 5) == (3, 2, 1, 1)


@pytest.mark.parametrize("text", [
    "profile_fit=4 future_interest=3 novelty=2",                     # an aspect missing
    "profile_fit=6 future_interest=3 novelty=2 context=5",           # out of 1..5
    "profile_fit=0 future_interest=3 novelty=2 context=5",
    "profile_fit=4 profile_fit=2 future_interest=3 novelty=2 context=5",  # two values for one aspect
    "The user rated these movies (1 = hated, 5 = loved) 1.15 stars",  # what SmolLM2 says without constraints
    "",
])
def test_unparsable_levels_are_none(text):
    assert parse_levels(text, 5) is None


def test_the_structured_output_regex_admits_exactly_the_parsable_line():
    regex = levels_regex(3)
    assert re.fullmatch(regex, "profile_fit=3 future_interest=1 novelty=2 context=3")
    assert not re.fullmatch(regex, "profile_fit=4 future_interest=1 novelty=2 context=3")
    assert parse_levels("profile_fit=3 future_interest=1 novelty=2 context=3", 3) == (3, 1, 2, 3)


def test_history_and_candidate_are_read_from_a_reasoning_prompt():
    [record] = read_rollouts(SAMPLE, limit=1)
    request = user_turn(record.rollout.sample.prompt)
    history = parse_history(request)
    assert [h.text for h in history][:2] == ["Star Wars (1977) [Action, Adventure, Romance, Sci-Fi, War]",
                                             "Alien (1979) [Action, Horror, Sci-Fi, Thriller]"]
    assert [h.rating for h in history] == [5, 5, 4, 2, 4]
    assert history[3].item.genres == ("Comedy", "Romance") and history[3].item.year == "1993"
    assert parse_candidate(request) == "Terminator 2: Judgment Day (1991) [Action, Sci-Fi, Thriller]"


def test_next_item_prompt_history_counts_numbered_lines_not_candidates():
    request = ("The user is a 24-year-old man.\n\nMovies this user watched, oldest first:\n"
               "1. Toy Story (1995) [Animation, Children's, Comedy]\n2. Heat (1995) [Action, Crime] (rated 2/5)\n\n"
               "Candidates:\n- Alien (1979) [Horror, Sci-Fi]\n\nWhich candidate will the user watch next?")
    history = parse_history(request)
    assert [(h.text, h.rating, h.item.rating) for h in history] == [
        ("Toy Story (1995) [Animation, Children's, Comedy]", None, 4),  # watched, no rating: counts as liked
        ("Heat (1995) [Action, Crime]", 2, 2)]
    system, user = judge_prompt(history, "Alien (1979) [Horror, Sci-Fi]", num_levels=5)
    assert "The user watched these movies" in user and "- Heat (1995) [Action, Crime]: 2" in user


def test_user_turn_reads_chatml_llama3_and_plain_prompts():
    assert user_turn(chatml("hello\nthere")) == "hello\nthere"
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert user_turn(llama) == "hi"
    assert user_turn("<s>plain prompt</s>") == "plain prompt"


# ---------------------------------------------------------------------------------------------------------------------
# Semantic judge: stage 2, caching, retries, sample_fraction.


def test_reward_is_w_dot_s_with_uniform_and_fixed_weights():
    judge = FakeJudge(levels_for)
    [uniform] = judge_semantic([rec_rollout()], generate=judge, aggregator=AspectAggregator.uniform(),
                               cache=JudgeCache(10), opts=opts(), catalogue=no_catalogue)
    # levels (5, 3, 1, 4) on 1..5 → s = (1, 0.5, 0, 0.75); uniform w → mean = 0.5625
    assert uniform.score == pytest.approx(0.5625)
    assert dict(uniform.components) == {"judged": 1.0, "parsed": 1.0, "profile_fit": 5.0, "future_interest": 3.0,
                                        "novelty": 1.0, "context": 4.0}
    assert uniform.details["levels"] == dict(zip(ASPECTS, (5, 3, 1, 4), strict=True))
    assert uniform.details["history_len"] == 2 and uniform.details["item_id"] == 10
    [fixed] = judge_semantic([rec_rollout()], generate=FakeJudge(levels_for), aggregator=FixedWeights(),
                             cache=JudgeCache(10), opts=opts(), catalogue=no_catalogue)
    assert fixed.score == pytest.approx(0.4 * 1 + 0.3 * 0.5 + 0.2 * 0 + 0.1 * 0.75)


def test_the_trained_artifact_path_loads_and_scores(tmp_path):
    layout = FeatureLayout()
    model = AspectWeights(layout.num_features, hidden=4)  # last layer starts at zero: w = ¼ for everyone
    save_aggregator(tmp_path / "agg", model, layout, {}, hidden=4, metrics={})
    [result] = judge_semantic([rec_rollout()], generate=FakeJudge(levels_for),
                              aggregator=load_aggregator(tmp_path / "agg"), cache=JudgeCache(10), opts=opts(),
                              catalogue=no_catalogue)
    assert result.score == pytest.approx(0.5625)
    assert result.details["weights"] == pytest.approx(dict.fromkeys(ASPECTS, 0.25))


def test_verdicts_are_cached_per_user_item_and_prompt():
    judge, cache = FakeJudge(levels_for), JudgeCache(100)
    group = [rec_rollout(index=i, text=f"answer {i}") for i in range(4)]  # one user, one item, four completions
    first = judge_semantic(group, generate=judge, aggregator=AspectAggregator.uniform(), cache=cache, opts=opts(),
                           catalogue=no_catalogue)
    assert judge.num_requests == 1 and [r.details["cached"] for r in first] == [False] * 4
    again = judge_semantic(group[:1], generate=judge, aggregator=AspectAggregator.uniform(), cache=cache, opts=opts(),
                           catalogue=no_catalogue)
    assert judge.num_requests == 1 and again[0].details["cached"] is True and again[0].score == first[0].score
    other = rec_rollout("Heat (1995) [Action, Crime]", item_id=11, sample_id="u1-i11")
    judge_semantic([other], generate=judge, aggregator=AspectAggregator.uniform(), cache=cache, opts=opts(),
                   catalogue=no_catalogue)
    assert judge.num_requests == 2 and len(cache) == 2


def test_an_unparsable_answer_is_retried_with_a_reminder():
    def answer(user):
        return levels_for(user) if "could not be read" in user else "I think the user likes it."

    judge = FakeJudge(answer)
    [result] = judge_semantic([rec_rollout()], generate=judge, aggregator=AspectAggregator.uniform(),
                              cache=JudgeCache(10), opts=opts(retries=1), catalogue=no_catalogue)
    assert result.details["attempts"] == 2 and result.score == pytest.approx(0.5625)
    assert "I think the user likes it." in judge.batches[1][0].user


def test_an_answer_unparsable_after_retries_fails_naming_the_rollout_or_is_reported():
    judge = FakeJudge(lambda user: "no idea")
    with pytest.raises(JudgeOutputError, match=r"rollout 'u1-i10/0' stayed unparsable after 3 attempt"):
        judge_semantic([rec_rollout()], generate=judge, aggregator=AspectAggregator.uniform(), cache=JudgeCache(10),
                       opts=opts(retries=2), catalogue=no_catalogue)
    cache = JudgeCache(10)
    [result] = judge_semantic([rec_rollout()], generate=judge, aggregator=AspectAggregator.uniform(), cache=cache,
                              opts=opts(retries=0, on_unparsable="report", unjudged_score=-1.0),
                              catalogue=no_catalogue)
    assert result.score == -1.0 and result.components["judged"] == 0.0
    assert result.details["judge_parsed"] is False and result.details["judge_outputs"] == ["no idea"]
    assert len(cache) == 0  # failures are not cached: the next step asks again


def test_a_completion_naming_no_known_item_is_scored_without_a_judge_call():
    judge = FakeJudge(levels_for)
    rollout = make_rollout("I would watch something nice.", prompt=chatml(HISTORY + "\nWhich movie next?"),
                           metadata={"user_id": 1})
    [result] = judge_semantic([rollout], generate=judge, aggregator=AspectAggregator.uniform(), cache=JudgeCache(10),
                              opts=opts(item_parser="item_id", unparsed_score=0.0), catalogue=lambda: {10: None})
    assert (result.score, result.components["parsed"], result.details["parsed"]) == (0.0, 0.0, False)
    assert judge.num_requests == 0


def test_a_generated_item_is_described_from_the_catalogue():
    from rollouts.envs.rec import Item

    judge = FakeJudge(levels_for)
    rollout = make_rollout("Item: 7", prompt=chatml(HISTORY + "\nWhich movie next?"), metadata={"user_id": 1})
    catalogue = {7: Item(item_id=7, title="Alien", year="1979", genres=("Horror", "Sci-Fi"))}
    [result] = judge_semantic([rollout], generate=judge, aggregator=AspectAggregator.uniform(), cache=JudgeCache(10),
                              opts=opts(item_parser="item_id"), catalogue=lambda: catalogue)
    assert result.details["item_id"] == 7 and "Candidate: Alien (1979) [Horror, Sci-Fi]" in judge.batches[0][0].user


def test_a_prompt_without_history_is_an_error_naming_the_rollout():
    rollout = make_rollout("Rating: 3", prompt=chatml("Candidate: Alien (1979) [Horror]"),
                           metadata={"user_id": 1, "item_id": 2})
    with pytest.raises(ValueError, match=r"rollout 's0/0': no user history in its prompt"):
        judge_semantic([rollout], generate=FakeJudge(levels_for), aggregator=AspectAggregator.uniform(),
                       cache=JudgeCache(10), opts=opts(), catalogue=no_catalogue)


def test_sample_fraction_picks_are_deterministic_batch_independent_and_about_the_fraction():
    rollouts = [rec_rollout(sample_id=f"s{g}", index=i) for g in range(250) for i in range(4)]
    picks = [selected_for_judge(r, fraction=0.3, seed=7) for r in rollouts]
    assert picks == [selected_for_judge(r, fraction=0.3, seed=7) for r in rollouts]
    assert 0.25 < sum(picks) / len(picks) < 0.35
    assert picks != [selected_for_judge(r, fraction=0.3, seed=8) for r in rollouts]
    assert all(selected_for_judge(r, fraction=1.0, seed=0) for r in rollouts[:20])
    assert not any(selected_for_judge(r, fraction=0.0, seed=0) for r in rollouts[:20])
    later = [rec_rollout(sample_id=f"s{g}", index=i, policy_version=1) for g in range(250) for i in range(4)]
    assert picks != [selected_for_judge(r, fraction=0.3, seed=7) for r in later]  # a new step picks anew
    some = rollouts[:40]
    kw = {"aggregator": AspectAggregator.uniform(), "opts": opts(sample_fraction=0.5), "catalogue": no_catalogue}
    whole = judge_semantic(some, generate=FakeJudge(levels_for), cache=JudgeCache(0), **kw)
    pieces = [judge_semantic([r], generate=FakeJudge(levels_for), cache=JudgeCache(0), **kw)[0] for r in some]
    assert [r.components["judged"] for r in whole] == [r.components["judged"] for r in pieces]


def test_unjudged_rollouts_make_no_call_and_a2po_falls_back_to_the_business_advantage():
    judge = FakeJudge(levels_for)
    group = [rec_rollout(index=i) for i in range(4)]
    results = judge_semantic(group, generate=judge, aggregator=AspectAggregator.uniform(), cache=JudgeCache(10),
                             opts=opts(sample_fraction=0.0, unjudged_score=0.0), catalogue=no_catalogue)
    assert judge.num_requests == 0
    assert all(r.components == {"judged": 0.0} and r.details["judged"] is False for r in results)
    business_N = torch.tensor([1.0, 2.0, 3.0, 4.0])
    has_semantic_N = torch.tensor([r.components["judged"] == 1.0 for r in results])
    semantic_N = torch.tensor([r.score for r in results])
    advantages_N, _ = a2po_advantages(business_N, semantic_N, has_semantic_N, torch.zeros(4, dtype=torch.long))
    a_biz_N = (business_N - business_N.mean()) / (business_N.std() + 1e-6)
    assert torch.allclose(advantages_N, a_biz_N, atol=1e-5)


def test_options_reject_bad_knobs():
    with pytest.raises(ValueError, match="sample_fraction=1.5"):
        SemanticOptions(sample_fraction=1.5)
    with pytest.raises(ValueError, match="num_levels=10"):
        SemanticOptions(num_levels=10)
    with pytest.raises(ValueError, match="on_unparsable='zero'"):
        SemanticOptions(on_unparsable="zero")


# ---------------------------------------------------------------------------------------------------------------------
# Agent judge.


@pytest.mark.parametrize(("text", "expected"), [
    ("PASS: it gives a rating", (True, "it gives a rating")),
    ("fail - invents a movie", (False, "invents a movie")),
    ("**PASS**: fine", (True, "fine")),
    ("FAIL", (False, "")),
    ("\n  PASS: first line counts\nFAIL: not this", (True, "first line counts")),
])
def test_verdicts_parse(text, expected):
    verdict = parse_verdict(text)
    assert verdict is not None and (verdict.passed, verdict.reason) == expected


@pytest.mark.parametrize("text", ["The user does not provide a rating.", "PASSING: x", "PASS because x", ""])
def test_unparsable_verdicts_are_none(text):
    assert parse_verdict(text) is None


def test_the_verdict_regex_admits_what_the_parser_reads():
    assert re.fullmatch(VERDICT_REGEX, "FAIL: the answer invents a rating")
    assert not re.fullmatch(VERDICT_REGEX, "Maybe: unsure")


def test_senior_review_grades():
    everything = dict.fromkeys(DEFAULT_DIMENSIONS, True)
    critical = ("relevance", "factuality")
    assert senior_review(everything, critical=critical, tau=1.0) == "S"
    assert senior_review(everything | {"factuality": False}, critical=critical, tau=1.0) == "B"
    assert senior_review(everything | {"diversity": False}, critical=critical, tau=1.0) == "A"
    assert senior_review(everything | {"diversity": False}, critical=critical, tau=0.75) == "S"  # 3/4 reaches τ
    assert senior_review(everything | {"diversity": False, "personalisation": False}, critical=critical,
                         tau=0.75) == "A"  # 2/4 < τ
    assert senior_review(everything | {"diversity": False}, critical=tuple(everything), tau=1.0) == "B"  # "all"


def agent_opts(**kw) -> AgentOptions:
    defaults = {"dimensions": None, "critical": ("relevance", "factuality"), "grade_scores": None}
    return AgentOptions.build(**(defaults | kw))


def by_dimension(failing: set[str]):
    def answer(user):
        name = re.search(r"Check \((\w+)\)", user).group(1)
        return f"FAIL: {name} is lacking" if name in failing else f"PASS: {name} is fine"
    return answer


def test_agent_judge_asks_every_dimension_once_per_rollout_and_grades():
    judge, cache = FakeJudge(by_dimension({"diversity"})), JudgeCache(100)
    rollouts = [rec_rollout(index=0, text="Rating: 5"), rec_rollout(index=1, text="Rating: 2")]
    results = judge_agent(rollouts, generate=judge, cache=cache, opts=agent_opts())
    assert judge.num_requests == 8 and len(judge.batches) == 1
    first = results[0]
    assert (first.score, first.details["grade"]) == (0.5, "A")
    assert first.components == {"judged": 1.0, "pass_share": 0.75, "relevance": 1.0, "factuality": 1.0,
                                "diversity": 0.0, "personalisation": 1.0}
    assert first.details["verdicts"]["diversity"] == {"pass": False, "reason": "diversity is lacking", "attempts": 1}
    assert "Rating: 5" in judge.batches[0][0].user and "Candidate: Alien" in judge.batches[0][0].user
    judge_agent(rollouts, generate=judge, cache=cache, opts=agent_opts())
    assert judge.num_requests == 8  # every verdict came from the cache


def test_agent_judge_grade_scores_critical_all_and_custom_dimensions():
    judge = FakeJudge(by_dimension({"diversity"}))
    [strict] = judge_agent([rec_rollout()], generate=judge, cache=JudgeCache(0),
                           opts=agent_opts(critical="all", grade_scores={"S": 2.0, "A": 1.0, "B": -1.0}))
    assert (strict.details["grade"], strict.score) == ("B", -1.0)
    custom = {"mentions_rating": "Does the answer end with a rating line?"}
    [own] = judge_agent([rec_rollout()], generate=FakeJudge(by_dimension(set())), cache=JudgeCache(0),
                        opts=agent_opts(dimensions=custom, critical=[]))
    assert (own.details["grade"], own.score, own.components["mentions_rating"]) == ("S", 1.0, 1.0)


def test_agent_judge_unparsable_replies_fail_or_are_reported():
    judge = FakeJudge(lambda user: "hmm")
    with pytest.raises(JudgeOutputError, match=r"rollout 'u1-i10/0' stayed unparsable after 2 attempt"):
        judge_agent([rec_rollout()], generate=judge, cache=JudgeCache(0), opts=agent_opts(retries=1))
    [result] = judge_agent([rec_rollout()], generate=judge, cache=JudgeCache(0),
                           opts=agent_opts(retries=0, on_unparsable="report"))
    assert result.components == {"judged": 0.0} and set(result.details["unparsed"]) == set(DEFAULT_DIMENSIONS)


def test_agent_options_reject_bad_config():
    with pytest.raises(ValueError, match="no built-in question"):
        agent_opts(dimensions=["relevance", "humour"])
    with pytest.raises(ValueError, match="critical="):
        agent_opts(critical=["novelty"])
    with pytest.raises(ValueError, match="critical="):
        agent_opts(critical="relevance")
    with pytest.raises(ValueError, match="grade_scores="):
        agent_opts(grade_scores={"S": 1.0, "B": 0.0})
    with pytest.raises(ValueError, match="tau=0"):
        agent_opts(tau=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Shared plumbing: ask, the engine handle, registration.


def test_ask_retries_only_the_unparsable_requests():
    seen = []

    def generate(requests):
        seen.append([r.user for r in requests])
        return ["42" if "b" in r.user and "could not be read" not in r.user else "7" for r in requests]

    requests = [JudgeRequest(system="s", user=u, max_new_tokens=8) for u in ("a", "b")]
    answers = ask(generate, requests, lambda t: int(t) if t == "7" else None, retries=2, reminder="Say 7.")
    assert [(a.value, a.attempts) for a in answers] == [(7, 1), (7, 2)]
    assert len(seen) == 2 and len(seen[1]) == 1 and seen[1][0].startswith("b\n\nYour previous reply")


class SlowWorker:
    """Stands in for RolloutWorker: echoes prompts, counts generate calls, takes a while."""

    def __init__(self):
        self.calls = []
        self.tokenizer = self

    def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
        return messages[-1]["content"]

    def generate_structured(self, prompts, *, max_new_tokens, regexes):
        self.calls.append(list(prompts))
        time.sleep(0.2)
        return [(f"echo {p}", "stop") for p in prompts]


def test_the_engine_is_one_object_per_spec_and_merges_concurrent_calls():
    spec = EngineSpec(model="/nonexistent/judge-model")
    assert judge_engine(spec) is judge_engine(spec)  # created lazily: nothing is loaded here
    assert judge_engine(EngineSpec(model="/nonexistent/other")) is not judge_engine(spec)
    engine = JudgeEngine(spec)
    engine._worker = SlowWorker()
    outputs = {}

    def call(k):
        outputs[k] = engine([JudgeRequest(system="s", user=f"q{k}-{j}", max_new_tokens=4) for j in range(2)])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs == {k: [f"echo q{k}-0", f"echo q{k}-1"] for k in range(5)}
    assert engine.num_batches < 5 and sum(len(c) for c in engine._worker.calls) == 10


def test_both_judges_are_built_in():
    assert resolve_reward("semantic_judge").source == "built-in (rewards.semantic_judge)"
    assert resolve_reward("agent_judge").deterministic is True
    assert resolve_reward("semantic_judge").deterministic is False
