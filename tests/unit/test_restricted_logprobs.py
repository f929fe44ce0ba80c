"""The learner's side of constrained decoding: log-prob and entropy renormalised over each position's allowed tokens
(rl/kernels/restricted.py), the allowed sets a constrained rollout records (rollouts/sid_processor.py), and how the
trainer packs them into a TrainBatch (rl/trainer.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rl.kernels import AllowedTokensError, restricted_logprob_entropy
from rl.rollout_io import read_rollouts, write_rollouts
from rl.trainer import allowed_id_tensors, build_train_batch
from rl.types import Rollout, Sample, ScoredRollout
from rollouts.sid import SIDIndex
from rollouts.sid_processor import SIDTrieMask, allowed_sets, load_sid_trie, write_sid_trie

M, H, V = 4, 8, 20
ALLOWED_MA = torch.tensor([[3, 5, 7], [5, 11, -1], [9, -1, -1], [0, 19, 3]])
TARGETS_M = torch.tensor([5, 11, 9, 19])


def masked_reference(hidden_MH, weight_VH, targets_M, allowed_MA, temperature):
    """Full [M, V] logits, everything outside each row's set at -inf, log-softmax: the sampler's distribution."""
    logits_MV = hidden_MH @ weight_VH.T / temperature
    keep_MV = torch.zeros(M, V, dtype=torch.bool)
    for m, row in enumerate(allowed_MA.tolist()):
        keep_MV[m, [t for t in row if t >= 0]] = True
    logp_MV = torch.log_softmax(logits_MV.masked_fill(~keep_MV, float("-inf")), dim=-1)
    entropy_M = -(logp_MV.exp() * logp_MV.masked_fill(~keep_MV, 0.0)).sum(-1)
    return logp_MV.gather(1, targets_M[:, None]).squeeze(1), entropy_M


def test_matches_masked_full_vocabulary_softmax_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(M, H, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, H, generator=gen).requires_grad_()
    lp, ent = restricted_logprob_entropy(hidden, weight, TARGETS_M, ALLOWED_MA, temperature=0.7)
    (lp.sum() + 0.3 * ent.sum()).backward()
    got = (lp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    ref_lp, ref_ent = masked_reference(hidden, weight, TARGETS_M, ALLOWED_MA, 0.7)
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    for a, b in zip(got, (ref_lp.detach(), ref_ent.detach(), hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Only rows of tokens in some allowed set receive gradient; the rest of the vocabulary is untouched.
    used = sorted({t for row in ALLOWED_MA.tolist() for t in row if t >= 0})
    untouched = [v for v in range(V) if v not in used]
    assert torch.count_nonzero(weight.grad[untouched]) == 0 and torch.count_nonzero(weight.grad[used]) > 0


def test_a_forced_token_has_log_prob_zero_entropy_zero_and_no_gradient():
    """Row 2's set is {9}: the sampler had no choice, so there is nothing to learn there."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(M, H, generator=gen).requires_grad_()
    weight = torch.randn(V, H, generator=gen)
    lp, ent = restricted_logprob_entropy(hidden, weight, TARGETS_M, ALLOWED_MA)
    assert lp[2].item() == 0.0 and ent[2].item() == 0.0
    # Hand-computed row 1: a two-way choice between ids 5 and 11.
    z5, z11 = (float(hidden[1].detach() @ weight[t]) for t in (5, 11))
    assert lp[1].item() == pytest.approx(z11 - math.log(math.exp(z5) + math.exp(z11)), abs=1e-5)
    lp.sum().backward()
    assert torch.count_nonzero(hidden.grad[2]) == 0 and torch.count_nonzero(hidden.grad[1]) > 0


def test_padding_never_hides_the_smallest_allowed_id():
    """-1 padding and the union's smallest id share a column: padding must not unmark it."""
    hidden, weight = torch.randn(2, H), torch.randn(V, H)
    lp, _ = restricted_logprob_entropy(hidden, weight, torch.tensor([0, 4]), torch.tensor([[0, -1, -1], [4, 0, -1]]))
    assert lp[0].item() == 0.0 and lp[1].item() < 0.0


def test_a_target_outside_its_set_or_an_empty_set_is_an_error():
    hidden, weight = torch.zeros(M, H), torch.zeros(V, H)
    with pytest.raises(AllowedTokensError, match="row 1: target token 7"):
        restricted_logprob_entropy(hidden, weight, torch.tensor([5, 7, 9, 19]), ALLOWED_MA)
    empty = ALLOWED_MA.clone()
    empty[3] = -1
    with pytest.raises(AllowedTokensError, match="empty allowed set"):
        restricted_logprob_entropy(hidden, weight, TARGETS_M, empty)


# -- what a constrained rollout records ------------------------------------------------------------------------------

EOS = 2
TOKENS = {"<a_0>": 5, "<a_1>": 6, "<b_0>": 7, "<b_1>": 8}
INDEX = SIDIndex({1: ["<a_0>", "<b_1>"], 2: ["<a_0>", "<b_0>"], 3: ["<a_1>", "<b_0>"]})


def test_allowed_sets_are_exactly_what_the_logits_mask_kept(tmp_path):
    trie = load_sid_trie(str(write_sid_trie(INDEX, TOKENS, [EOS], tmp_path)))
    assert allowed_sets(trie, [6, 7, EOS]) == ((5, 6), (7,), (EOS,))
    assert allowed_sets(trie, [5, 8, EOS]) == ((5, 6), (7, 8), (EOS,))
    completion = [5, 7, EOS]
    mask = SIDTrieMask(trie)
    for position, expected in enumerate(allowed_sets(trie, completion)):
        logits_V = mask(completion[:position], torch.zeros(12))
        assert tuple(torch.isfinite(logits_V).nonzero().view(-1).tolist()) == expected
    no_end = load_sid_trie(str(write_sid_trie(INDEX, TOKENS, [], tmp_path)))
    assert allowed_sets(no_end, [6, 7, 11]) == ((5, 6), (7,), ())  # after the SID: unconstrained


def rollout(rid: str, prompt: tuple[int, ...], completion: tuple[int, ...], allowed=None) -> Rollout:
    return Rollout(rollout_id=rid, sample=Sample(sample_id=rid.split("/")[0], prompt=""), index=0,
                   prompt_token_ids=prompt, completion_token_ids=completion, text="",
                   logprobs=(-0.5,) * len(completion), finish_reason="stop", policy_version=0,
                   allowed_token_ids=allowed)


def test_a_rollout_whose_token_is_outside_its_recorded_set_is_refused():
    with pytest.raises(ValueError, match="completion token 1 \\(id 8\\) is not among the 1 ids"):
        rollout("s/0", (1,), (6, 8, EOS), ((5, 6), (7,), (EOS,)))
    with pytest.raises(ValueError, match="allowed_token_ids has 2 entries for 3"):
        rollout("s/0", (1,), (6, 7, EOS), ((5, 6), (7,)))


def test_the_train_batch_carries_each_constrained_position_and_its_set():
    constrained = rollout("a/0", (1, 1, 1), (6, 7, EOS), ((5, 6), (7,), (EOS,)))
    partly = rollout("b/0", (1,), (5, 8, 11), ((5, 6), (7, 8), ()))  # free after the SID
    free = rollout("c/0", (1, 1), (4, 4))
    batch = build_train_batch([ScoredRollout(rollout=r, reward=0.0, results={}) for r in (constrained, partly, free)],
                              torch.zeros(3))
    assert batch.allowed_positions_BC.tolist() == [[3, 4, 5], [1, 2, -1], [-1, -1, -1]]
    assert batch.allowed_ids_BCA.tolist() == [[[5, 6], [7, -1], [EOS, -1]], [[5, 6], [7, 8], [-1, -1]],
                                              [[-1, -1]] * 3]
    # The constrained positions hold exactly the sampled tokens, inside their sets.
    for b, c in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        position = int(batch.allowed_positions_BC[b, c])
        assert int(batch.input_ids_BT[b, position]) in batch.allowed_ids_BCA[b, c].tolist()
    part = batch.rows(1, 3, width=4)
    assert part.allowed_positions_BC.tolist() == [[1, 2, -1], [-1, -1, -1]]
    assert allowed_id_tensors([free]) == (None, None)


def test_rollout_files_keep_the_allowed_sets(tmp_path):
    r = rollout("a/0", (1, 1), (5, 8, 11), ((5, 6), (7, 8), ()))
    write_rollouts(tmp_path / "r.jsonl", [r], include_token_ids=True)
    (record,) = list(read_rollouts(tmp_path / "r.jsonl"))
    assert record.rollout.allowed_token_ids == ((5, 6), (7, 8), ())
