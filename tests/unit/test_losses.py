"""rl.losses: hand-computed values and invariants (padding never leaks, micro-batches sum to the full batch)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.losses import (
    AGGREGATIONS,
    ENTROPY_SCHEDULES,
    KL_ESTIMATORS,
    clipped_surrogate,
    entropy_coef_at,
    hepo_loss,
    loss_denominator,
    policy_loss,
)

# One sequence of 4 tokens with ratios r = [1.5, 0.5, 1.1, 0.7] and advantages [1, 1, -1, -1]; clip 0.2 / 0.28:
#   t0: r=1.5, A=+1: -min(1.5, 1.28)   = -1.28  (high-clipped)
#   t1: r=0.5, A=+1: -min(0.5, 0.8)    = -0.5   (below 1-eps but A>0: not a clipped region)
#   t2: r=1.1, A=-1: -min(-1.1, -1.1)  =  1.1
#   t3: r=0.7, A=-1: -min(-0.7, -0.8)  =  0.8   (low-clipped)
# token mean: (-1.28 - 0.5 + 1.1 + 0.8) / 4 = 0.12 / 4 = 0.03
RATIOS = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
ADVS = torch.tensor([[1.0, 1.0, -1.0, -1.0]])


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def test_clipped_policy_loss_hand_computed():
    logprobs = _leaf(RATIOS.log())
    loss, metrics = policy_loss(
        logprobs, torch.zeros(1, 4), ADVS, torch.ones(1, 4), loss_denominator=4.0, clip_low=0.2, clip_high=0.28
    )
    torch.testing.assert_close(loss, torch.tensor(0.03))
    torch.testing.assert_close(metrics["loss/policy"], torch.tensor(0.03))
    assert metrics["clip/frac_high"] == 0.25 and metrics["clip/frac_low"] == 0.25 and metrics["clip/frac_dual"] == 0
    torch.testing.assert_close(metrics["ratio/mean"], torch.tensor(0.95))  # (1.5 + .5 + 1.1 + .7) / 4
    # d loss / d logprob = -A r / 4 where unclipped, 0 where clipped: [0, -0.5/4, 1.1/4, 0].
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125, 0.275, 0.0]]))


def test_dual_clip_caps_negative_advantage_loss():
    # r = 5, A = -1, c = 3: PPO loss max(5, 1.2) = 5; dual clip caps it at -c A = 3. With A = +1 nothing changes.
    loss_BT, regions = clipped_surrogate(torch.tensor([[5.0, 5.0]]), torch.tensor([[-1.0, 1.0]]), dual_clip=3.0)
    torch.testing.assert_close(loss_BT, torch.tensor([[3.0, -1.2]]))
    assert regions["dual"].tolist() == [[True, False]]
    with pytest.raises(ValueError, match="must be > 1"):
        clipped_surrogate(RATIOS, ADVS, dual_clip=0.5)


def test_advantages_per_sequence_broadcast():
    a, _ = policy_loss(RATIOS.log(), torch.zeros(1, 4), torch.tensor([2.0]), torch.ones(1, 4), loss_denominator=4.0)
    b, _ = policy_loss(RATIOS.log(), torch.zeros(1, 4), torch.full((1, 4), 2.0), torch.ones(1, 4), loss_denominator=4.0)
    torch.testing.assert_close(a, b)


def test_aggregations_hand_computed():
    # per-token values [[1, 2, 3, pad], [4, pad, pad, pad]], mask [[1, 1, 1, 0], [1, 0, 0, 0]]
    #   token_mean:          (1 + 2 + 3 + 4) / 4 tokens = 2.5
    #   seq_mean_token_mean: (6/3 + 4/1) / 2 sequences = 3.0
    #   constant:            10 / (2 sequences * max length 4) = 1.25
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "constant": 1.25, "dr_grpo": 1.25}
    for name, value in expected.items():
        denominator = loss_denominator(mask, aggregation=name, max_completion_length=4)
        torch.testing.assert_close(AGGREGATIONS[name](values, mask, denominator=denominator), torch.tensor(value))
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_denominator(mask, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="Did you mean 'token_mean'"):
        loss_denominator(mask, aggregation="token_mea")


def test_kl_estimators_hand_computed():
    # pi = .5, pi_ref = .25: log r' = log 2 = .693147
    #   k1 = .693147; k2 = .693147^2 / 2 = .240227; k3 = .25/.5 - log(.25/.5) - 1 = .5 + .693147 - 1 = .193147
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    log2 = math.log(2.0)
    torch.testing.assert_close(KL_ESTIMATORS["k1"](lp, ref), torch.tensor([log2]))
    torch.testing.assert_close(KL_ESTIMATORS["k2"](lp, ref), torch.tensor([log2**2 / 2]))
    torch.testing.assert_close(KL_ESTIMATORS["k3"](lp, ref), torch.tensor([0.5 + log2 - 1.0]))
    # All three vanish when the policy equals the reference.
    for kl in KL_ESTIMATORS.values():
        assert kl(lp, lp) == 0.0


def test_kl_and_entropy_terms_hand_computed():
    # Two tokens, on-policy (r = 1), A = 0, so the policy term is 0.
    # log pi - log pi_ref = [log 2, 0] -> k1 = [log 2, 0]; token mean = log 2 / 2; kl_coef = .1 -> + .1 * log2 / 2
    # entropy [1, 3] -> token mean 2; entropy_coef = .01 -> - .02
    lp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    loss, metrics = policy_loss(
        lp, lp, torch.zeros(1, 2), torch.ones(1, 2), loss_denominator=2.0,
        ref_logprobs_BT=ref, kl_coef=0.1, kl_estimator="k1",
        entropy_BT=torch.tensor([[1.0, 3.0]]), entropy_coef=0.01,
    )  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(0.1 * math.log(2) / 2 - 0.02))
    torch.testing.assert_close(metrics["loss/kl"], torch.tensor(math.log(2) / 2))
    torch.testing.assert_close(metrics["loss/entropy"], torch.tensor(2.0))
    # KL off: kl_coef = 0 (or no reference) leaves no KL term and no KL metric.
    off, off_metrics = policy_loss(lp, lp, torch.zeros(1, 2), torch.ones(1, 2), loss_denominator=2.0, kl_coef=0.0)
    assert off == 0.0 and "loss/kl" not in off_metrics
    off, off_metrics = policy_loss(
        lp, lp, torch.zeros(1, 2), torch.ones(1, 2), loss_denominator=2.0,
        ref_logprobs_BT=ref, kl_coef=0.1, kl_estimator="none",
    )  # fmt: skip
    assert off == 0.0 and "loss/kl" not in off_metrics
    with pytest.raises(ValueError, match="Did you mean 'k3'"):
        policy_loss(lp, lp, torch.zeros(1, 2), torch.ones(1, 2), loss_denominator=2.0, ref_logprobs_BT=ref,
                    kl_coef=0.1, kl_estimator="k33")  # fmt: skip


def test_kl_ratio_weighted_multiplies_by_ratio():
    # r = 2 on one token, A = 0: k1 = log2 - log(.25)... use logprob = log .5, old = log .25 (r = 2), ref = log .25
    #   k1 = log 2; weighted by r: 2 log 2.
    lp, old = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    loss, _ = policy_loss(
        lp, old, torch.zeros(1, 1), torch.ones(1, 1), loss_denominator=1.0,
        ref_logprobs_BT=old, kl_coef=1.0, kl_estimator="k1", kl_ratio_weighted=True,
    )  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(2)))


def test_truncated_importance_sampling_hand_computed():
    # On-policy learner (r = 1), A = 1 -> per-token policy loss -1.
    # old - sampler = [log 3, log .5] -> weights min([3, .5], cap 2) = [2, .5]; token mean = (-2 - .5) / 2 = -1.25
    old = torch.zeros(1, 2)
    sampler = -torch.tensor([[math.log(3.0), math.log(0.5)]])
    loss, metrics = policy_loss(
        old, old, torch.ones(1, 2), torch.ones(1, 2), loss_denominator=2.0, sampler_logprobs_BT=sampler, tis_cap=2.0
    )
    torch.testing.assert_close(loss, torch.tensor(-1.25))
    torch.testing.assert_close(metrics["tis/weight_mean"], torch.tensor(1.25))
    assert metrics["tis/frac_capped"] == 0.5
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(old, old, torch.ones(1, 2), torch.ones(1, 2), loss_denominator=2.0, sampler_logprobs_BT=sampler)


def _random_batch(seed: int, batch: int = 4, length: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    randn = lambda: torch.randn(batch, length, generator=gen)
    return {
        "logprobs": -randn().abs(),
        "old": -randn().abs(),
        "ref": -randn().abs(),
        "sampler": -randn().abs(),
        "entropy": randn().abs(),
        "adv": torch.randn(batch, generator=gen)[:, None].expand(batch, length).clone(),
        "mask": mask,
    }


def _loss_and_grads(data, *, aggregation, denominator, **knobs):
    logprobs, entropy = _leaf(data["logprobs"]), _leaf(data["entropy"])
    loss, metrics = policy_loss(
        logprobs, data["old"], data["adv"], data["mask"], loss_denominator=denominator, clip_low=0.2, clip_high=0.28,
        dual_clip=3.0, ref_logprobs_BT=data["ref"], kl_coef=0.05, entropy_BT=entropy, entropy_coef=0.01,
        sampler_logprobs_BT=data["sampler"], tis_cap=2.0, aggregation=aggregation, **knobs,
    )  # fmt: skip
    loss.backward()
    return loss, metrics, logprobs.grad, entropy.grad


AGGREGATION_NAMES = ["token_mean", "seq_mean_token_mean", "constant"]


@pytest.mark.parametrize("aggregation", AGGREGATION_NAMES)
@pytest.mark.parametrize("kl_estimator", sorted(KL_ESTIMATORS))
def test_padding_changes_nothing(aggregation, kl_estimator):
    data = _random_batch(seed=1)
    denominator = loss_denominator(data["mask"], aggregation=aggregation, max_completion_length=8)
    loss, metrics, grad_lp, grad_ent = _loss_and_grads(
        data, aggregation=aggregation, denominator=denominator, kl_estimator=kl_estimator
    )
    # Pad every tensor with 3 extra columns of garbage (NaN, inf, huge) and one all-padding row.
    garbage = torch.tensor([float("nan"), float("inf"), 1e30])
    padded = {}
    for key, value in data.items():
        fill = torch.zeros(3) if key == "mask" else garbage
        wide = torch.cat([value, fill.expand(value.shape[0], 3)], dim=1)
        padded[key] = torch.cat([wide, (torch.zeros(8) if key == "mask" else torch.full((8,), float("nan")))[None]])
    padded_denominator = loss_denominator(padded["mask"], aggregation=aggregation, max_completion_length=8)
    torch.testing.assert_close(padded_denominator, denominator)
    p_loss, p_metrics, p_grad_lp, p_grad_ent = _loss_and_grads(
        padded, aggregation=aggregation, denominator=padded_denominator, kl_estimator=kl_estimator
    )
    torch.testing.assert_close(p_loss, loss)
    for key in metrics:
        torch.testing.assert_close(p_metrics[key], metrics[key])
    torch.testing.assert_close(p_grad_lp[:4, :5], grad_lp)
    torch.testing.assert_close(p_grad_ent[:4, :5], grad_ent)
    # Padding gets exactly zero (finite) gradient.
    assert torch.equal(p_grad_lp[:4, 5:], torch.zeros(4, 3)) and torch.equal(p_grad_lp[4], torch.zeros(8))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    split=st.integers(1, 5),
    aggregation=st.sampled_from(AGGREGATION_NAMES),
    kl_ratio_weighted=st.booleans(),
)
def test_micro_batches_with_full_denominator_equal_full_batch(seed, split, aggregation, kl_ratio_weighted):
    data = _random_batch(seed, batch=6)
    denominator = loss_denominator(data["mask"], aggregation=aggregation, max_completion_length=5)
    full_loss, full_metrics, full_grad_lp, full_grad_ent = _loss_and_grads(
        data, aggregation=aggregation, denominator=denominator, kl_ratio_weighted=kl_ratio_weighted
    )
    parts = [{k: v[:split] for k, v in data.items()}, {k: v[split:] for k, v in data.items()}]
    results = [
        _loss_and_grads(part, aggregation=aggregation, denominator=denominator, kl_ratio_weighted=kl_ratio_weighted)
        for part in parts
    ]
    torch.testing.assert_close(results[0][0] + results[1][0], full_loss)
    for key in ("loss/policy", "loss/kl", "loss/entropy", "loss/total"):
        torch.testing.assert_close(results[0][1][key] + results[1][1][key], full_metrics[key])
    torch.testing.assert_close(torch.cat([results[0][2], results[1][2]]), full_grad_lp)
    torch.testing.assert_close(torch.cat([results[0][3], results[1][3]]), full_grad_ent)


def test_entropy_schedules_hand_computed():
    # linear 0.01 -> 0 over 100 steps: step 25 -> .0075; step 100 and later -> 0.
    # cosine: step 50 -> .01 * (1 + cos(pi/2)) / 2 = .005; step 25 -> .005 * (1 + cos(pi/4)) = .0085355...
    assert entropy_coef_at(25, schedule="linear", start=0.01, num_steps=100) == pytest.approx(0.0075)
    assert entropy_coef_at(250, schedule="linear", start=0.01, num_steps=100) == pytest.approx(0.0)
    assert entropy_coef_at(50, schedule="cosine", start=0.01, num_steps=100) == pytest.approx(0.005)
    assert entropy_coef_at(25, schedule="cosine", start=0.01, num_steps=100) == pytest.approx(
        0.005 * (1 + math.sqrt(0.5))
    )
    assert entropy_coef_at(0, schedule="cosine", start=0.01, end=0.001, num_steps=10) == pytest.approx(0.01)
    assert entropy_coef_at(10, schedule="cosine", start=0.01, end=0.001, num_steps=10) == pytest.approx(0.001)
    assert entropy_coef_at(7, schedule="constant", start=0.02) == 0.02
    assert set(ENTROPY_SCHEDULES) == {"constant", "linear", "cosine"}
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        entropy_coef_at(0, schedule="cosin", start=0.01, num_steps=10)


def test_hepo_loss_hand_computed():
    # N = 2, L = 2, on-policy (r = 1, nothing clipped): per-level policy loss = -sum_n A_nl / N.
    #   A = [[1, 2], [3, -4]] -> level 0: -(1 + 3)/2 = -2; level 1: -(2 - 4)/2 = 1
    #   c = [.5, 1] -> policy = .5 * -2 + 1 * 1 = 0
    # value: V - R = [[1, 0], [0, 2]] -> 0.5 * (1 + 4) / 2 = 1.25; value_coef .5 -> total .625
    logprobs = _leaf(torch.zeros(2, 2))
    advantages = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    values = _leaf(torch.tensor([[1.0, 1.0], [1.0, 3.0]]))
    returns = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    loss, metrics = hepo_loss(
        logprobs, torch.zeros(2, 2), advantages, values, returns, level_weights=[0.5, 1.0], loss_denominator=2.0
    )
    torch.testing.assert_close(loss, torch.tensor(0.625))
    torch.testing.assert_close(metrics["loss/policy_level0"], torch.tensor(-2.0))
    torch.testing.assert_close(metrics["loss/policy_level1"], torch.tensor(1.0))
    torch.testing.assert_close(metrics["loss/value"], torch.tensor(1.25))
    loss.backward()
    # d/d logprob = -c_l A r / N; d/d V = value_coef * (V - R) / N
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, -1.0], [-0.75, 2.0]]))
    torch.testing.assert_close(values.grad, torch.tensor([[0.25, 0.0], [0.0, 0.5]]))


def test_hepo_loss_one_level_equals_policy_loss():
    # L = 1, c = [1], value_coef = 0: one code token per candidate, i.e. policy_loss on T = 1 sequences.
    gen = torch.Generator().manual_seed(3)
    logprobs, old = -torch.rand(5, 1, generator=gen), -torch.rand(5, 1, generator=gen)
    advantages = torch.randn(5, 1, generator=gen)
    ours, _ = hepo_loss(
        logprobs, old, advantages, torch.zeros(5, 1), torch.zeros(5, 1),
        level_weights=[1.0], loss_denominator=5.0, clip_high=0.28, value_coef=0.0,
    )  # fmt: skip
    reference, _ = policy_loss(logprobs, old, advantages, torch.ones(5, 1), loss_denominator=5.0, clip_high=0.28)
    torch.testing.assert_close(ours, reference)
