"""GUI-agent rewards over multi-turn trajectories: `gui_task` (task success, shaped) and `gui_step` (action matching).

Both read `Rollout.info`, written by `rollouts.multiturn.trajectory_rollouts`: `trajectory_id`, `group_size`,
`success`, `num_turns`, `num_invalid`, `progress` (ATP), `turns` (per turn: `action` canonical or null when it did
not parse, `reference` / `reference_bbox` when the task has a scripted reference). A trajectory may span several
rollouts (segments, one per rebuilt prompt); both rewards are trajectory-level: every segment of a trajectory gets
the same score, which is what trajectory-level GRPO needs (rollouts.multiturn.segment_advantages checks it).

- `gui_task`: R = success_reward * 1[success] (the environment's task-success signal), minus `invalid_penalty` per
  unparsable answer (`rl.trajectory.invalid_action_penalty`), then for successes the step-efficiency decay
  R * eta^((T - T_min) / T_min), T_min = fewest turns among the group's successes
  (`rl.trajectory.step_efficiency_rewards`). Components: `success`, `atp` (AndroidLens' Average Task Progress,
  milestones reached / declared: a metric, not in the score), `turns`, `invalid_actions`. With eta < 1 the score
  depends on the whole group, so the call must hold every trajectory of each group (the reward service keeps groups
  together when `batch_size` >= the group's rollouts); a partial group is an error, not a silently different score.
- `gui_step`: the mean over turns that have a reference action of
  type_weight * 1[same action kind] + (1 - type_weight) * 1[same kind and same arguments], where arguments match
  when the element id is the same, a coordinate click falls inside the reference element's box, typed text is equal
  (surrounding whitespace ignored), or the key / direction is the same. An unparsable answer scores 0 on its turn.
  A trajectory with no referenced turn scores 0 (`details["num_referenced"] = 0`).

This module imports neither ray, vllm nor deepspeed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rewards.api import reward
from rl.trajectory import invalid_action_penalty, step_efficiency_rewards
from rl.types import RewardResult, Rollout
from rollouts.envs.actions import Action, ActionParseError, parse_action

_REQUIRED = ("trajectory_id", "group_size", "success", "num_turns", "num_invalid", "progress", "turns")


def _info(rollout: Rollout) -> Mapping[str, Any]:
    missing = [key for key in _REQUIRED if key not in rollout.info]
    if missing:
        raise KeyError(f"rollout info lacks {missing}: GUI rewards score multi-turn trajectories written by "
                       "rollouts.multiturn.trajectory_rollouts (single-turn rollouts carry no trajectory info)")
    return rollout.info


@reward("gui_task", deterministic=False)  # depends on the environment's verdict and the group, not the text alone
def gui_task(rollouts: Sequence[Rollout], *, success_reward: float = 1.0, invalid_penalty: float = 0.1,
             eta: float = 1.0) -> list[RewardResult]:
    """Task success (from the environment) with an unparsable-action penalty and step-efficiency decay; ATP metric."""
    infos = [_info(r) for r in rollouts]
    first_row: dict[str, int] = {}
    for row, info in enumerate(infos):
        first_row.setdefault(str(info["trajectory_id"]), row)
    rows = list(first_row.values())
    group_of: dict[str, int] = {}
    group_ids_N = torch.tensor([group_of.setdefault(rollouts[row].sample.sample_id, len(group_of)) for row in rows])
    if eta < 1.0:
        _check_whole_groups(rollouts, infos, rows)
    success_N = torch.tensor([bool(infos[row]["success"]) for row in rows])
    rewards_N = success_N.to(torch.float64) * success_reward
    invalid_N = torch.tensor([int(infos[row]["num_invalid"]) for row in rows], dtype=torch.float64)
    turns_N = torch.tensor([max(int(infos[row]["num_turns"]), 1) for row in rows], dtype=torch.float64)
    rewards_N, _ = invalid_action_penalty(rewards_N, invalid_N, penalty=invalid_penalty)
    shaped_N, _ = step_efficiency_rewards(rewards_N, turns_N, success_N, group_ids_N, eta=eta)
    by_trajectory = {}
    for n, row in enumerate(rows):
        info = infos[row]
        by_trajectory[str(info["trajectory_id"])] = RewardResult(
            score=float(shaped_N[n]),
            components={"success": float(success_N[n]), "atp": float(info["progress"]),
                        "turns": float(info["num_turns"]), "invalid_actions": float(invalid_N[n])},
            details={"end_reason": info.get("end_reason"), "milestones_reached": list(info.get("milestones_reached",
                                                                                               []))},
        )
    return [by_trajectory[str(info["trajectory_id"])] for info in infos]


def _check_whole_groups(rollouts: Sequence[Rollout], infos: Sequence[Mapping[str, Any]], rows: Sequence[int]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        seen[rollouts[row].sample.sample_id] = seen.get(rollouts[row].sample.sample_id, 0) + 1
    for row in rows:
        sample_id, expected = rollouts[row].sample.sample_id, int(infos[row]["group_size"])
        if seen[sample_id] != expected:
            raise ValueError(f"gui_task got {seen[sample_id]} of the {expected} trajectories of group {sample_id}; "
                             "step-efficiency decay (eta < 1) compares a group's successes. Raise this reward's "
                             "batch_size to at least the group's rollouts (segments included), or set eta=1.")


def action_match(predicted: Action | None, reference: Action,
                 reference_bbox: Sequence[float] | None = None) -> tuple[bool, bool]:
    """(same kind, same kind and same arguments) of a predicted action against the reference."""
    if predicted is None or predicted.kind != reference.kind:
        return False, False
    if reference.kind == "click":
        if predicted.is_coordinate_click and not reference.is_coordinate_click:
            if reference_bbox is None:
                return True, False
            left, top, width, height = reference_bbox
            assert predicted.x is not None and predicted.y is not None
            return True, left <= predicted.x <= left + width and top <= predicted.y <= top + height
        return True, (predicted.element_id, predicted.x, predicted.y) == (reference.element_id, reference.x,
                                                                           reference.y)
    if reference.kind == "type":
        return True, (predicted.element_id == reference.element_id
                      and (predicted.text or "").strip() == (reference.text or "").strip())
    return True, (predicted.key, predicted.direction) == (reference.key, reference.direction)


def _parse_or_none(text: str | None) -> Action | None:
    if not text:
        return None
    try:
        return parse_action(text)
    except ActionParseError:
        return None


@reward("gui_step", deterministic=False)
def gui_step(rollouts: Sequence[Rollout], *, type_weight: float = 0.5) -> list[RewardResult]:
    """Step-level action matching against the task's reference actions (kind, element/coordinates, text)."""
    if not 0.0 <= type_weight <= 1.0:
        raise ValueError(f"type_weight={type_weight} must lie in [0, 1].")
    out = []
    for rollout in rollouts:
        scores, kinds, args = [], 0, 0
        for turn in _info(rollout)["turns"]:
            reference = _parse_or_none(turn.get("reference"))
            if reference is None:
                continue
            kind_ok, args_ok = action_match(_parse_or_none(turn.get("action")), reference, turn.get("reference_bbox"))
            scores.append(type_weight * kind_ok + (1.0 - type_weight) * args_ok)
            kinds += kind_ok
            args += args_ok
        num = len(scores)
        out.append(RewardResult(
            score=sum(scores) / num if num else 0.0,
            components={"type_match": kinds / num if num else 0.0, "exact_match": args / num if num else 0.0},
            details={"num_referenced": num},
        ))
    return out
