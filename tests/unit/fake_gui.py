"""Fakes for multi-turn GUI tests: a scripted MiniWoB-like environment and a scripted token generator.

`FakeEnv` shows a click-button-like page whose filler texts change every step (so full-history prompts really grow);
clicking the target button succeeds, anything else keeps the episode going until `max_steps`. `ScriptedGenerator`
answers with given texts as real token ids of a tokenizer (EOS appended unless told otherwise) and records every
prompt it was given.
"""

from __future__ import annotations

from collections.abc import Sequence

from rollouts.engine import TokenCompletion
from rollouts.envs.actions import ActionParseError, parse_action
from rollouts.envs.base import Element, Observation, StepResult

FILLER = ("lorem ipsum dolor", "sit amet consectetur", "adipiscing elit sed", "do eiusmod tempor",
          "incididunt ut labore")


class FakeEnv:
    """Environment protocol over a fake page: target button "Submit" (id 4) among others; milestones as MiniWoB's."""

    def __init__(self, *, max_steps: int = 10, num_elements: int = 6) -> None:
        self.max_steps, self.num_elements = max_steps, num_elements
        self.steps, self.task, self.seed, self.done = 0, "click-button", 0, False

    def _obs(self, reached: tuple[str, ...] = ()) -> Observation:
        elements = [Element(element_id=4, tag="button", text="Submit", bbox=(2, 52, 43, 21))]
        for i in range(self.num_elements - 1):
            text = f"{FILLER[(i + self.steps) % len(FILLER)]} {self.steps * 7 + i}"
            elements.append(Element(element_id=5 + i, tag="div", text=text, bbox=(2, 73 + 11 * i, 156, 11)))
        lines = ['Task: Click on the "Submit" button.', "Elements:", *(e.describe() for e in elements)]
        return Observation(task=self.task, instruction='Click on the "Submit" button.', text="\n".join(lines),
                           elements=tuple(elements), seed=self.seed, step=self.steps,
                           milestones=("target button clicked",), milestones_reached=reached)

    def reset(self, task: str, seed: int | None = None) -> Observation:
        self.steps, self.task, self.seed, self.done = 0, task, seed or 0, False
        return self._obs()

    def step(self, action_text: str) -> StepResult:
        assert not self.done
        self.steps += 1
        info = {"task": self.task, "seed": self.seed, "step": self.steps, "action": None, "penalty": False,
                "parse_error": None, "action_error": None, "env_error": None, "success": False, "raw_reward": None,
                "reason": None, "truncated": False, "elapsed_s": 0.0, "milestones_reached": [], "num_milestones": 1,
                "progress": 0.0}
        try:
            action = parse_action(action_text)
            info["action"] = str(action)
            success = action.kind == "click" and action.element_id == 4
            if action.kind == "click" and action.element_id not in {4, *range(5, 4 + self.num_elements)}:
                info["action_error"] = f"No element with id {action.element_id} on the page."
        except ActionParseError as err:
            info.update(penalty=True, parse_error=str(err))
            success = False
        if success:
            info.update(success=True, raw_reward=1.0, reason="task succeeded", milestones_reached=[
                "target button clicked"], progress=1.0)
        elif self.steps >= self.max_steps:
            info.update(reason="max steps", truncated=True)
        self.done = success or self.steps >= self.max_steps
        obs = self._obs(("target button clicked",) if success else ())
        return StepResult(observation=obs, reward=1.0 if success else 0.0, done=self.done, info=info)

    def close(self) -> None:
        pass


class ScriptedGenerator:
    """`TokenGenerator` answering call k, prompt i with `answers[(k + i) % len(answers)]` (tokenized, + EOS unless
    `eos=False`); logprobs are -0.01 * (position + 1). `calls` keeps (prompts, completions) of every call."""

    def __init__(self, tokenizer, answers: Sequence[str], *, eos: bool = True) -> None:
        self.tokenizer, self.answers, self.eos = tokenizer, list(answers), eos
        self.calls: list[tuple[list[list[int]], list[TokenCompletion]]] = []

    def generate_tokens(self, prompt_token_ids_list, *, num_samples=1, temperature, top_p=1.0, max_new_tokens,
                        stop=(), policy_version, seeds=None, images=None):
        assert num_samples == 1
        out = []
        for i, _ in enumerate(prompt_token_ids_list):
            text = self.answers[(len(self.calls) + i) % len(self.answers)]
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))[:max_new_tokens]
            finish = "length"
            if self.eos and len(ids) < max_new_tokens:
                ids, finish = ids + [self.tokenizer.eos_token_id], "stop"
            logprobs = tuple(-0.01 * (j + 1) for j in range(len(ids)))
            out.append(TokenCompletion(token_ids=tuple(ids), logprobs=logprobs, text=text, finish_reason=finish))
        self.calls.append(([list(p) for p in prompt_token_ids_list], out))
        return [[completion] for completion in out]

