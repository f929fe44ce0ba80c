"""A2PO is selected by `algorithm.advantage: a2po`; the trainer feeds it the two named rewards kept apart."""

from __future__ import annotations

import pytest
import torch

from rl.advantages import a2po_advantages
from rl.config import ConfigError, load_config
from rl.trainer import reward_pair
from rl.types import RewardResult, Rollout, Sample, ScoredRollout

REWARDS = {"rewards": [{"name": "ecpm"}, {"name": "semantic_judge", "weight": 0.0}]}


def test_a2po_config_names_two_rewards_of_the_run():
    cfg = load_config({"algorithm": {"advantage": "a2po"}, "reward": REWARDS})
    assert (cfg.algorithm.business_reward, cfg.algorithm.semantic_reward) == ("ecpm", "semantic_judge")
    with pytest.raises(ConfigError, match="algorithm.semantic_reward='judge', but reward.rewards has no reward"):
        load_config({"algorithm": {"advantage": "a2po", "semantic_reward": "judge"}, "reward": REWARDS})
    with pytest.raises(ConfigError, match="needs two different rewards"):
        load_config({"algorithm": {"advantage": "a2po", "semantic_reward": "ecpm"}, "reward": REWARDS})
    with pytest.raises(ConfigError, match="Did you mean 'a2po'"):
        load_config({"algorithm": {"advantage": "a2p0"}, "reward": REWARDS})


def scored(i: int, business: float, semantic: float, judged: bool) -> ScoredRollout:
    sample = Sample(sample_id=f"g{i // 3}", prompt="p")
    rollout = Rollout(rollout_id=f"g{i // 3}/{i % 3}", sample=sample, index=i % 3, prompt_token_ids=(1,),
                      completion_token_ids=(2,), text="x", logprobs=(0.0,), finish_reason="stop", policy_version=0)
    results = {"ecpm": RewardResult(score=business),
               "semantic_judge": RewardResult(score=semantic, components={"judged": float(judged)})}
    return ScoredRollout(rollout=rollout, reward=business, results=results)


def test_reward_pair_feeds_a2po_the_business_and_judged_semantic_scores():
    batch = [scored(0, 1.0, 0.9, True), scored(1, 0.0, 0.1, True), scored(2, 0.5, 0.0, False),
             scored(3, 0.2, 0.3, True), scored(4, 0.4, 0.8, False), scored(5, 0.4, 0.0, True)]
    business_N, semantic_N, judged_N = reward_pair(batch, "ecpm", "semantic_judge")
    assert business_N.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.2, 0.4, 0.4])
    assert judged_N.tolist() == [True, True, False, True, False, True]
    group_ids_N = torch.tensor([0, 0, 0, 1, 1, 1])
    advantages_N, metrics = a2po_advantages(business_N, semantic_N, judged_N, group_ids_N)
    assert metrics["a2po/frac_judged"] == pytest.approx(4 / 6)
    # Unjudged rollouts keep the business advantage; judged ones never flip its sign.
    biz_only, _ = a2po_advantages(business_N, semantic_N, torch.zeros(6, dtype=torch.bool), group_ids_N)
    assert advantages_N[2] == biz_only[2] and advantages_N[4] == biz_only[4]
    assert torch.all(torch.sign(advantages_N) == torch.sign(biz_only))
