"""Multi-turn GUI rollouts on vLLM, token-in/token-out, and how trajectories become training rows.

    collector = MultiTurnCollector(pool, env_pool, ChatRenderer(tokenizer), context=ContextSettings(history="full"),
                                   sampling=SamplingSettings(temperature=1.0, max_new_tokens=48, max_model_len=2048),
                                   max_turns=4)
    trajectories = collector.collect(samples, num_samples=G, policy_version=v, seed=s)   # G episodes per sample
    rollouts = [r for t in trajectories for r in trajectory_rollouts(t, group_size=G, policy_version=v)]

One episode: reset the environment on (task, seed) of the sample; each turn build the prompt ids from the history
mode (rollouts.context), ask the generator for one completion given those ids (`generate_tokens`), send its decoded
text to the environment (the last action in it is executed), and record the sampled ids and log-probs verbatim.
Episodes of a batch advance in lock step, one batched vLLM call per turn for every running episode; an environment
freed by a finished episode starts the next waiting one (the environments are the scarce resource). The episode ends
when the environment says done (success, failure, its step limit, a dead browser), after `max_turns` answers, or when
the next prompt would not fit in `max_model_len` (ended as a failure, `end_reason="context full"`).

Segments. A trajectory is one or more *segments*; a segment is one training sequence: `prompt_ids` (what vLLM was
given on the segment's first turn) + `completion_ids` (the sampled answers, with the observation tokens appended
between them when later turns extend the same stream). `action_mask` is 1 on sampled ids and 0 on observation ids,
whose log-prob is recorded as 0 and which never enter the loss. By construction, turn t's prompt is exactly
`prompt_ids + completion_ids[:start of a_t]` of its segment, so the learner and the sampler see identical tokens.
`full` gives one segment per trajectory; `semantic_context` one per turn; `last_k` one for turns 1..k+1, then one
per turn.

Trajectory-level GRPO on segments (the decision, used by recipes/gui_agent): the reward is a property of the
trajectory (every segment carries the same one); the group-relative advantage A_i is computed over the G
*trajectories* of a task instance (not over segments, which would weight long trajectories more); every action token
of every segment of trajectory i gets A_i; and the loss is normalised per trajectory, 1/|tau_i| over all of its
action tokens across segments, then averaged over trajectories: L = 1/N sum_i 1/|tau_i| sum_{t in tau_i} l_t(A_i).
`segment_advantages` does this by scaling each row's advantage (the clipped surrogate is positively homogeneous in
A), so the learner's per-row aggregation (`seq_mean_token_mean` or `token_mean`) yields exactly that sum. With one
segment per trajectory the scale is 1 and this is plain trajectory-level GRPO. KL and entropy terms, when on, stay
per-row averages.

Rollout ids: a trajectory's first segment is "{sample_id}/{index}" (the trajectory id), segment k >= 1 is
"{sample_id}/{index}/{k}". `Rollout.text` is the segment's answers as vLLM decoded them, joined by newlines (no
observation text). `Rollout.info` holds what rewards need (rewards/gui.py): success, turns, invalid actions,
milestones, per-turn actions and reference actions, segment bookkeeping.

This module imports neither ray nor vllm: the generator (`RolloutPool` / `RolloutWorker`) and the environments
(`EnvPool` / `LocalEnvs`) are passed in.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rl.advantages import get_advantage_estimator
from rl.types import Rollout, Sample
from rollouts.context import (
    ChatRenderer,
    ContextSettings,
    feedback_line,
    model_summary,
    render_screen,
    render_semantic,
    rule_summary,
)
from rollouts.engine import TokenCompletion, request_seed
from rollouts.envs.base import Element, Environment, Observation, StepResult

log = logging.getLogger(__name__)


class TokenGenerator(Protocol):
    """Token-in/token-out sampling: `rollouts.pool.RolloutPool` and `rollouts.engine.RolloutWorker`."""

    def generate_tokens(self, prompt_token_ids_list: Sequence[Sequence[int]], *, num_samples: int,
                        temperature: float, top_p: float, max_new_tokens: int, stop: Sequence[str],
                        policy_version: int, seeds: Sequence[int | None] | None,
                        images: Sequence[str | None] | None) -> list[list[TokenCompletion]]: ...


class EnvBatch(Protocol):
    """Environments addressed by id: `rollouts.envs.pool.EnvPool` (Ray actors) and `LocalEnvs` (in process)."""

    @property
    def num_envs(self) -> int: ...

    def reset(self, env_ids: Sequence[int], tasks: Sequence[str], seeds: Sequence[int | None]) -> list[Observation]: ...

    def step(self, env_ids: Sequence[int], actions: Sequence[str]) -> list[StepResult]: ...


class LocalEnvs:
    """`EnvBatch` over environments in this process, stepped one after another (tests, single-process debugging)."""

    def __init__(self, envs: Sequence[Environment]) -> None:
        self.envs = list(envs)

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def reset(self, env_ids: Sequence[int], tasks: Sequence[str], seeds: Sequence[int | None]) -> list[Observation]:
        return [self.envs[e].reset(task, seed) for e, task, seed in zip(env_ids, tasks, seeds, strict=True)]

    def step(self, env_ids: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        return [self.envs[e].step(action) for e, action in zip(env_ids, actions, strict=True)]


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    temperature: float
    """> 0 samples (training); 0 is greedy (evaluation: log-probs are then 0 and not trainable)."""
    top_p: float = 1.0
    max_new_tokens: int
    """Tokens per answer (one turn)."""
    stop: tuple[str, ...] = ()
    max_model_len: int
    """Prompt + answer must fit; an episode whose next prompt would not is ended ("context full")."""


@dataclass(kw_only=True)
class Segment:
    """One training sequence of a trajectory (see the module docstring)."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    anchor_turn: int
    """The turn whose screen opens the prompt (turn 1 for `full`)."""
    first_turn: int
    last_turn: int
    truncated: bool = False
    """Some answer in it hit max_new_tokens."""

    def append_observation(self, ids: Sequence[int]) -> None:
        self.completion_ids += ids
        self.action_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def append_action(self, completion: TokenCompletion, turn: int) -> None:
        self.completion_ids += completion.token_ids
        self.action_mask += [1] * len(completion.token_ids)
        self.logprobs += completion.logprobs
        self.last_turn = turn
        self.truncated |= completion.finish_reason == "length"


@dataclass(kw_only=True)
class TurnRecord:
    turn: int
    obs: Observation
    """The screen the action was taken on."""
    feedback: str
    """The feedback line shown with `obs` (about the previous action)."""
    prompt_ids: list[int] = field(default_factory=list)
    """Exactly the ids given to the generator for this turn."""
    completion: TokenCompletion | None = None
    info: Mapping[str, Any] | None = None
    """The environment's StepInfo for this action."""
    summary: str = ""
    summary_source: str = ""
    reference: tuple[str, tuple[float, float, float, float]] | None = None
    next_obs_ids: list[int] | None = None
    """Observation tokens appended after this answer when the stream continues (cached for `last_k`)."""


@dataclass(kw_only=True)
class Trajectory:
    sample: Sample
    index: int
    task: str
    seed: int
    first_prompt_text: str = ""
    turns: list[TurnRecord] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    next_obs: Observation | None = None
    done: bool = False
    success: bool = False
    end_reason: str = ""
    final_info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trajectory_id(self) -> str:
        return f"{self.sample.sample_id}/{self.index}"


# ---------------------------------------------------------------------------------------------------------------------
# Reference actions: the scripted solution step for tasks whose next correct action is determined by the screen.


def _quoted_target(obs: Observation) -> str | None:
    match = re.search(r'"([^"]*)"', obs.instruction)
    return match.group(1) if match else None


def _first(elements: Sequence[Element], **attrs: Any) -> Element | None:
    return next((e for e in elements if all(getattr(e, k) == v for k, v in attrs.items())), None)


def _click(element: Element | None) -> tuple[str, tuple[float, float, float, float]] | None:
    return None if element is None else (f"click({element.element_id})", element.bbox)


def _fill_then_submit(obs: Observation, fields: Sequence[tuple[str, str | None]]) -> Any:
    for dom_id, wanted in fields:
        element = _first(obs.elements, dom_id=dom_id)
        if element is None or wanted is None:
            return None
        if element.value != wanted:
            text = wanted.replace("\\", "\\\\").replace('"', '\\"')
            return f'type({element.element_id}, "{text}")', element.bbox
    return _click(_first(obs.elements, dom_id="subbtn"))


def _login_fields(obs: Observation) -> list[tuple[str, str | None]]:
    found = re.findall(r'"([^"]*)"', obs.instruction)
    return [("username", found[0] if found else None), ("password", found[1] if len(found) > 1 else None)]


REFERENCE_POLICIES: dict[str, Callable[[Observation], tuple[str, tuple[float, float, float, float]] | None]] = {
    "click-button": lambda o: _click(_first(o.elements, tag="button", text=_quoted_target(o))),
    "click-link": lambda o: _click(_first(o.elements, text=_quoted_target(o))),
    "click-test": lambda o: _click(_first(o.elements, tag="button")),
    "click-test-2": lambda o: _click(_first(o.elements, tag="button", text="ONE")),
    "focus-text": lambda o: _click(_first(o.elements, dom_id="tt")),
    "enter-text": lambda o: _fill_then_submit(o, [("tt", _quoted_target(o))]),
    "login-user": lambda o: _fill_then_submit(o, _login_fields(o)),
}
"""task -> (canonical reference action, bbox of its target element) for the screen, or None when unknown. Used by
the `gui_step` reward (step-level action matching); tasks not listed get no reference."""


def reference_action(obs: Observation) -> tuple[str, tuple[float, float, float, float]] | None:
    policy = REFERENCE_POLICIES.get(obs.task)
    return policy(obs) if policy is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# The collector


class ContextFullError(ValueError):
    """The first prompt of an episode does not fit in max_model_len with room for an answer."""


class MultiTurnCollector:
    """Runs episodes of (task, seed) samples against `envs`, sampling answers from `generator` token-in/token-out.

    screenshots: pass each turn's screenshot to the generator (vision-language models; needs a renderer with
    image_placeholder=True and environments that save screenshots).
    """

    def __init__(self, generator: TokenGenerator, envs: EnvBatch, renderer: ChatRenderer, *,
                 context: ContextSettings, sampling: SamplingSettings, max_turns: int,
                 screenshots: bool = False) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns} must be >= 1.")
        if screenshots and not (context.history == "semantic_context" or
                                (context.history == "last_k" and context.last_k == 0)):
            raise ValueError("Screenshot observations are rendered per turn: use history=semantic_context (or "
                             f"last_k with last_k=0), not {context.history!r}.")
        self.generator, self.envs, self.renderer = generator, envs, renderer
        self.context, self.sampling, self.max_turns, self.screenshots = context, sampling, max_turns, screenshots
        self.planner = TurnPlanner(renderer, context=context, sampling=sampling, max_turns=max_turns)

    def collect(self, samples: Sequence[Sample], *, num_samples: int, policy_version: int,
                seed: int | None) -> list[Trajectory]:
        """`num_samples` episodes per sample (metadata "task", "seed"), grouped per sample in input order."""
        trajectories = [Trajectory(sample=s, index=i, task=str(s.metadata["task"]), seed=int(s.metadata["seed"]))
                        for s in samples for i in range(num_samples)]
        pending = deque(trajectories)
        running: dict[int, Trajectory] = {}
        while pending or running:
            self._start(pending, running)
            env_ids = sorted(running)
            plans = [self.planner.plan(running[e]) for e in env_ids]
            for env_id, plan in zip(env_ids, plans, strict=True):
                if plan is None:  # context full: ended without acting
                    running.pop(env_id)
            active = [(e, p) for e, p in zip(env_ids, plans, strict=True) if p is not None]
            if not active:
                continue
            completions = self._generate([running[e] for e, _ in active], [p for _, p in active],
                                         policy_version=policy_version, seed=seed)
            results = self.envs.step([e for e, _ in active], [c.text for c in completions])
            for (env_id, _), completion, result in zip(active, completions, results, strict=True):
                traj = running[env_id]
                self.planner.record(traj, completion, result)
                if traj.done:
                    running.pop(env_id)
        return trajectories

    def _start(self, pending: deque[Trajectory], running: dict[int, Trajectory]) -> None:
        starting = [(env_id, pending.popleft()) for env_id in free_envs(self.envs.num_envs, running, len(pending))]
        if not starting:
            return
        observations = self.envs.reset([e for e, _ in starting], [t.task for _, t in starting],
                                       [t.seed for _, t in starting])
        for (env_id, traj), obs in zip(starting, observations, strict=True):
            self.planner.start(traj, obs)
            running[env_id] = traj

    def _generate(self, trajs: Sequence[Trajectory], prompts: Sequence[list[int]], *, policy_version: int,
                  seed: int | None) -> list[TokenCompletion]:
        s = self.sampling
        seeds = [None if seed is None else request_seed(seed, f"{t.trajectory_id}/t{len(t.turns)}") for t in trajs]
        images = [t.turns[-1].obs.screenshot_path for t in trajs] if self.screenshots else None
        if images is not None and any(image is None for image in images):
            raise ValueError("Screenshot observations need environments that save screenshots (gui.screenshot_dir).")
        groups = self.generator.generate_tokens(
            list(prompts), num_samples=1, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
            stop=list(s.stop), policy_version=policy_version, seeds=seeds, images=images)
        return [group[0] for group in groups]


def free_envs(num_envs: int, running: Collection[int], num_waiting: int) -> list[int]:
    """The environments that start waiting episodes now: the lowest free ids, at most one per waiting episode."""
    return [e for e in range(num_envs) if e not in running][:num_waiting]


class TurnPlanner:
    """One episode's bookkeeping, without generator or environments: `plan(traj)` gives turn t's prompt ids (or None:
    context full) and extends the trajectory's segments; `record(traj, completion, result)` adds the sampled answer
    and the environment's result of its action. `MultiTurnCollector` calls these for each running episode."""

    def __init__(self, renderer: ChatRenderer, *, context: ContextSettings, sampling: SamplingSettings,
                 max_turns: int) -> None:
        self.renderer, self.context, self.sampling, self.max_turns = renderer, context, sampling, max_turns

    def start(self, traj: Trajectory, obs: Observation) -> None:
        """The environment was reset for `traj`: `obs` is its first screen."""
        traj.next_obs = obs

    def plan(self, traj: Trajectory) -> list[int] | None:
        """Turn t's prompt ids (opening a new segment or extending the current one); None ends the episode."""
        obs, turn = traj.next_obs, len(traj.turns) + 1
        assert obs is not None
        last_info = traj.turns[-1].info if traj.turns else None
        record = TurnRecord(turn=turn, obs=obs, feedback=feedback_line(last_info), reference=reference_action(obs))
        prompt, extends = self._prompt_ids(traj, record)
        budget = self.sampling.max_model_len - self.sampling.max_new_tokens
        if len(prompt) > budget:
            if turn == 1:
                raise ContextFullError(
                    f"The first prompt of {traj.task} (seed {traj.seed}) has {len(prompt)} tokens, but "
                    f"max_model_len={self.sampling.max_model_len} leaves {budget} after max_new_tokens="
                    f"{self.sampling.max_new_tokens}. Raise model.max_model_len or lower rollout.max_new_tokens.")
            traj.done, traj.end_reason = True, "context full"
            traj.final_info = dict(traj.turns[-1].info or {})
            return None
        record.prompt_ids = prompt
        if extends is not None:
            traj.segments[-1].append_observation(extends)
        else:
            anchor = max(1, turn - self.context.last_k) if self.context.history == "last_k" else turn
            traj.segments.append(Segment(prompt_ids=prompt, anchor_turn=1 if turn == 1 else anchor,
                                         first_turn=turn, last_turn=turn))
        if turn == 1:
            traj.first_prompt_text = self.renderer.tokenizer.decode(prompt, skip_special_tokens=False)
        seg = traj.segments[-1]
        assert seg.prompt_ids + seg.completion_ids == prompt, "a turn's prompt must be its segment's stream so far"
        traj.turns.append(record)
        return prompt

    def _prompt_ids(self, traj: Trajectory, record: TurnRecord) -> tuple[list[int], list[int] | None]:
        """(prompt ids, observation ids to append when the turn extends the current segment, else None)."""
        ctx, turn, obs = self.context, record.turn, record.obs
        text = ctx.text_elements
        if ctx.history == "semantic_context":
            summaries = [t.summary for t in traj.turns]
            content = render_semantic(obs, summaries, max_summaries=ctx.max_summaries, feedback=record.feedback,
                                      text_elements=text, summary_instruction=ctx.summariser == "model")
            return self.renderer.first_prompt_ids(content), None
        if turn == 1:
            return self.renderer.first_prompt_ids(render_screen(obs, text_elements=text)), None
        anchor = 1 if ctx.history == "full" else max(1, turn - ctx.last_k)
        seg = traj.segments[-1]
        if anchor == seg.anchor_turn:
            ids = self._next_obs_ids(traj, turn - 1)
            return seg.prompt_ids + seg.completion_ids + ids, ids
        first = traj.turns[anchor - 1] if anchor < turn else record  # the screen that opens the window
        prompt = self.renderer.first_prompt_ids(
            render_screen(first.obs, feedback=first.feedback, hidden_steps=anchor - 1, text_elements=text))
        for past in range(anchor, turn):
            completion = traj.turns[past - 1].completion
            assert completion is not None
            prompt += list(completion.token_ids) + self._next_obs_ids(traj, past)
        return prompt, None

    def _next_obs_ids(self, traj: Trajectory, turn: int) -> list[int]:
        """Observation ids that follow answer `turn` in the stream (computed once, then reused)."""
        past = traj.turns[turn - 1]
        if past.next_obs_ids is None:
            screen = traj.turns[turn].obs if turn < len(traj.turns) else traj.next_obs
            feedback = feedback_line(past.info)
            assert screen is not None and past.completion is not None
            content = render_screen(screen, feedback=feedback, text_elements=self.context.text_elements)
            past.next_obs_ids = self.renderer.observation_ids(
                content, previous_ended_with_eos=self.renderer.ended_with_eos(past.completion.token_ids))
        return past.next_obs_ids

    def record(self, traj: Trajectory, completion: TokenCompletion, result: StepResult) -> None:
        """The answer sampled for the turn `plan` opened and the environment's result of its action."""
        record = traj.turns[-1]
        record.completion, record.info = completion, dict(result.info)
        traj.segments[-1].append_action(completion, record.turn)
        written = model_summary(completion.text, max_chars=self.context.summary_max_chars) \
            if self.context.summariser == "model" else None
        record.summary = written or rule_summary(record.turn, record.obs, result.info,
                                                 max_chars=self.context.summary_max_chars)
        record.summary_source = "model" if written else "rule"
        if result.done:
            traj.done, traj.success = True, result.success
            traj.end_reason = str(result.info.get("reason") or ("environment failed" if result.env_error else ""))
            traj.final_info = dict(result.info)
        elif record.turn >= self.max_turns:  # environments normally end it themselves (max_steps = max_turns)
            traj.done, traj.end_reason, traj.final_info = True, "max turns", dict(result.info)
        else:
            traj.next_obs = result.observation


# ---------------------------------------------------------------------------------------------------------------------
# Trajectories -> rollouts, and the trajectory-level advantages of their segments


def trajectory_info(traj: Trajectory, *, group_size: int, history: str) -> dict[str, Any]:
    """The JSON-serialisable facts rewards and metrics read (shared by every segment of the trajectory)."""
    final = traj.final_info
    turns = []
    for t in traj.turns:
        info = t.info or {}
        turns.append({
            "turn": t.turn, "action": info.get("action"), "penalty": bool(info.get("penalty")),
            "action_error": info.get("action_error"), "reference": t.reference[0] if t.reference else None,
            "reference_bbox": list(t.reference[1]) if t.reference else None, "prompt_tokens": len(t.prompt_ids),
            "action_tokens": len(t.completion.token_ids) if t.completion else 0, "summary": t.summary,
            "summary_source": t.summary_source,
        })
    acted = [t for t in traj.turns if t.info is not None]
    return {
        "trajectory_id": traj.trajectory_id, "group_size": group_size, "task": traj.task, "seed": traj.seed,
        "history": history, "num_turns": len(acted), "success": traj.success,
        "progress": float(final.get("progress", 0.0)), "milestones_reached": list(final.get("milestones_reached", [])),
        "num_milestones": int(final.get("num_milestones", 0)),
        "num_invalid": sum(bool(t.info.get("penalty")) for t in acted),
        "num_action_errors": sum(t.info.get("action_error") is not None for t in acted),
        "end_reason": traj.end_reason, "env_error": final.get("env_error"),
        "context_full": traj.end_reason == "context full", "turns": turns,
    }


def trajectory_rollouts(traj: Trajectory, *, group_size: int, policy_version: int, history: str) -> list[Rollout]:
    """One Rollout per segment (ids, masks, info: see the module docstring)."""
    info = trajectory_info(traj, group_size=group_size, history=history)
    sample = Sample(sample_id=traj.sample.sample_id, prompt=traj.first_prompt_text, metadata=traj.sample.metadata)
    out = []
    for k, seg in enumerate(traj.segments):
        out.append(Rollout(
            rollout_id=traj.trajectory_id if k == 0 else f"{traj.trajectory_id}/{k}", sample=sample, index=traj.index,
            prompt_token_ids=tuple(seg.prompt_ids), completion_token_ids=tuple(seg.completion_ids),
            text="\n".join(t.completion.text for t in traj.turns[seg.first_turn - 1: seg.last_turn]
                           if t.completion is not None),
            logprobs=tuple(seg.logprobs), finish_reason="length" if seg.truncated else "stop",
            policy_version=policy_version, action_mask=tuple(seg.action_mask),
            reward_hint=1.0 if traj.success else 0.0,
            info={**info, "segment": k, "num_segments": len(traj.segments),
                  "segment_turns": [seg.first_turn, seg.last_turn]},
        ))
    return out


def segment_advantages(
    rewards_B: torch.Tensor,
    trajectory_ids: Sequence[str],
    group_ids_B: torch.Tensor,
    num_action_tokens_B: torch.Tensor,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    aggregation: str = "seq_mean_token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row advantages for trajectory-level GRPO over segment rows (B rows, N trajectories).

    rewards_B: float (B,), the trajectory's reward on each of its rows (must agree within a trajectory).
    trajectory_ids: B ids, rows of one trajectory share one. group_ids_B: int (B,), same task instance = same group.
    num_action_tokens_B: (B,), action (loss) tokens per row. The estimator runs over trajectories; row b of
    trajectory i gets A_i * D_b / (N * |tau_i|), where D_b is the learner's normaliser for that row under
    `aggregation` (token_mean: all loss tokens of the batch; seq_mean_token_mean: rows with loss tokens times the
    row's own tokens), N = trajectories with action tokens and |tau_i| = their action tokens. Then the learner's loss
    is 1/N sum_i 1/|tau_i| sum_{t in tau_i} l_t(A_i). Returns advantages_B and metrics.
    """
    first: dict[str, int] = {}
    traj_of_B = torch.tensor([first.setdefault(tid, len(first)) for tid in trajectory_ids], dtype=torch.int64)
    num_traj = len(first)
    rewards_N = torch.zeros(num_traj, dtype=rewards_B.dtype).index_copy_(0, traj_of_B, rewards_B)
    mismatch_B = (rewards_N[traj_of_B] - rewards_B).abs() > 1e-6
    if bool(mismatch_B.any()):
        bad = trajectory_ids[int(mismatch_B.nonzero()[0, 0])]
        raise ValueError(f"Trajectory {bad}: its segments got different rewards; trajectory-level GRPO needs one "
                         "reward per trajectory. Use trajectory-level rewards (gui_task, gui_step), which score every "
                         "segment of a trajectory alike.")
    groups_N = torch.zeros(num_traj, dtype=torch.int64).index_copy_(0, traj_of_B, group_ids_B.to(torch.int64))
    advantages_N, metrics = get_advantage_estimator(estimator)(rewards_N, groups_N, eps=eps)
    tokens_B = num_action_tokens_B.to(torch.float32)
    tokens_N = torch.zeros(num_traj).index_add_(0, traj_of_B, tokens_B)
    num_active = (tokens_N > 0).sum().clamp(min=1).to(torch.float32)
    if aggregation == "seq_mean_token_mean":
        denominator_B = (tokens_B > 0).sum().clamp(min=1).to(torch.float32) * tokens_B
    elif aggregation == "token_mean":
        denominator_B = tokens_B.sum().clamp(min=1.0).expand_as(tokens_B)
    else:
        raise ValueError(f"aggregation={aggregation!r}: trajectory-level GRPO over segments supports "
                         "'seq_mean_token_mean' (recommended) and 'token_mean'.")
    scale_B = denominator_B / (num_active * tokens_N[traj_of_B].clamp(min=1.0))
    metrics = {**metrics, "traj/num_trajectories": torch.tensor(float(num_traj)),
               "traj/segments_per_trajectory": torch.tensor(len(trajectory_ids) / max(num_traj, 1))}
    return advantages_N[traj_of_B].to(torch.float32) * scale_B, metrics


def episode_metrics(infos: Sequence[Mapping[str, Any]], *, prefix: str) -> dict[str, float]:
    """Success rate, ATP, turns, invalid-answer rate, context-full and environment-failure rates over trajectories
    (one info per trajectory, `trajectory_info`; segments are deduplicated), overall and per task:
    `{prefix}/success_rate`, `{prefix}/atp`, ..., `{prefix}/<task>/success_rate`, `{prefix}/<task>/atp`."""
    unique = list({str(info["trajectory_id"]): info for info in infos}.values())
    out: dict[str, float] = {}
    for task in [None, *sorted({str(info["task"]) for info in unique})]:
        chosen = [i for i in unique if task is None or i["task"] == task]
        if not chosen:
            continue
        name = prefix if task is None else f"{prefix}/{task}"
        out[f"{name}/success_rate"] = sum(bool(i["success"]) for i in chosen) / len(chosen)
        out[f"{name}/atp"] = sum(float(i["progress"]) for i in chosen) / len(chosen)
        if task is None:
            turns = sum(int(i["num_turns"]) for i in chosen)
            out[f"{name}/turns_mean"] = turns / len(chosen)
            out[f"{name}/invalid_action_frac"] = sum(int(i["num_invalid"]) for i in chosen) / max(turns, 1)
            out[f"{name}/context_full_frac"] = sum(bool(i["context_full"]) for i in chosen) / len(chosen)
            out[f"{name}/env_error_frac"] = sum(i.get("env_error") is not None for i in chosen) / len(chosen)
            out[f"{name}/num_episodes"] = float(len(chosen))
    return out
