"""Our GRPO loss equals the loss TRL 1.16's own `GRPOTrainer._compute_loss` computes, to 1e-6.

TRL's code runs for real: a `GRPOTrainer` is built offline around a ~1k-parameter Llama and a word-level tokenizer
made in code (saved to a temp dir so TRL can load its reference model from it), and its `_compute_loss` is called
on a hand-made batch with old and reference log-probs. Our side computes log-probs from the same model with a plain
forward + log_softmax and calls `rl.losses.policy_loss` with the mapping below; values and parameter gradients must
match.

TRL loss_type -> our aggregation and denominator (single process, no gradient accumulation):
  grpo    -> "seq_mean_token_mean", number of sequences
  bnpo    -> "token_mean", number of loss tokens in the batch
  dr_grpo -> "constant", B * max_completion_length
  dapo    -> "token_mean", num_items_in_batch (loss tokens of the whole generation batch)
beta -> kl_coef with the k3 estimator; TRL's `use_bias_correction_kl` -> kl_ratio_weighted; epsilon / epsilon_high ->
clip_low / clip_high; entropy_coef -> entropy_coef (TRL's bonus is always a token mean, so it matches ours for the
token-mean loss types only, the ones tested with it). TRL's vLLM importance-sampling correction needs vLLM
generation and is not covered here.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from rl.losses import loss_denominator, policy_loss

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

MAX_COMPLETION_LENGTH = 6
AGGREGATION_OF = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "constant", "dapo": "token_mean"}


@pytest.fixture(scope="module")
def model_dir():
    """A tiny Llama (vocab 64, hidden 8, one layer) and a word-level tokenizer, saved offline to a temp dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        yield directory


def _make_trainer(model_dir: str, **config_kwargs) -> trl.GRPOTrainer:
    args = trl.GRPOConfig(
        output_dir=os.path.join(model_dir, "out"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=MAX_COMPLETION_LENGTH,
        **config_kwargs,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 4})
    trainer = trl.GRPOTrainer(
        model=model_dir,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by HF Trainer's loop at each step; one step, no accumulation
    return trainer


def _batch(seed: int) -> dict[str, torch.Tensor]:
    """4 sequences: left-padded prompts of 2-3 tokens, right-padded completions of 2-6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    return {
        "prompt_ids": torch.randint(3, 64, (4, 3), generator=gen) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, 64, (4, MAX_COMPLETION_LENGTH), generator=gen) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
    }


def _our_logprobs_and_entropy(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain forward (TRL's patch passes through without fused_lm_head=True), log_softmax, gather."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    num_completion = batch["completion_ids"].shape[1]
    logp_BTV = torch.log_softmax(logits[:, -num_completion - 1 : -1].float(), dim=-1)
    logprobs_BT = logp_BTV.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return logprobs_BT, entropy_BT


CASES = [
    pytest.param(dict(loss_type=lt, beta=beta, epsilon=0.2, epsilon_high=eps_high), id=f"{lt}-beta{beta}-eh{eps_high}")
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for beta in (0.0, 0.04)
    for eps_high in (0.2, 0.28)
]
CASES += [
    pytest.param(dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False), id="grpo-kl-no-bias-correction"),
    pytest.param(dict(loss_type="dapo", beta=0.04, epsilon=0.1, epsilon_high=0.3), id="dapo-eps0.1-0.3"),
    pytest.param(dict(loss_type="bnpo", beta=0.0, entropy_coef=0.05), id="bnpo-entropy"),
    pytest.param(dict(loss_type="dapo", beta=0.04, entropy_coef=0.05), id="dapo-kl-entropy"),
]


@pytest.mark.parametrize("config", CASES)
def test_policy_loss_matches_trl_compute_loss(model_dir, config):
    trainer = _make_trainer(model_dir, **config)
    model = trainer.model
    batch = _batch(seed=len(str(config)))
    mask_BT = batch["completion_mask"].float()

    logprobs_BT, entropy_BT = _our_logprobs_and_entropy(model, batch)
    # Old/ref log-probs a few tenths away from the current ones, so the ratio crosses both clip bounds.
    gen = torch.Generator().manual_seed(1)
    old_BT = (logprobs_BT.detach() + 0.4 * torch.randn(logprobs_BT.shape, generator=gen)) * mask_BT
    ref_BT = (logprobs_BT.detach() + 0.3 * torch.randn(logprobs_BT.shape, generator=gen)) * mask_BT
    inputs = dict(batch, old_per_token_logps=old_BT, ref_per_token_logps=ref_BT, num_items_in_batch=mask_BT.sum())

    params = [p for p in model.parameters() if p.requires_grad]
    trl_loss = trainer._compute_loss(model, inputs)
    trl_grads = torch.autograd.grad(trl_loss, params)

    args = trainer.args
    aggregation = AGGREGATION_OF[args.loss_type]
    denominator = loss_denominator(mask_BT, aggregation=aggregation, max_completion_length=MAX_COMPLETION_LENGTH)
    if args.loss_type == "dapo":
        denominator = inputs["num_items_in_batch"]
    ours, metrics = policy_loss(
        logprobs_BT,
        old_BT,
        batch["advantages"],
        mask_BT,
        loss_denominator=denominator,
        clip_low=trainer.epsilon_low,  # TRL resolves epsilon_high=None to epsilon
        clip_high=trainer.epsilon_high,
        ref_logprobs_BT=ref_BT,
        kl_coef=args.beta,
        kl_estimator="k3",
        kl_ratio_weighted=args.use_bias_correction_kl,
        entropy_BT=entropy_BT,
        entropy_coef=args.entropy_coef,
        aggregation=aggregation,
    )
    our_grads = torch.autograd.grad(ours, params)

    # The ratios really cross the clip bounds, so the clipped branch is exercised.
    assert metrics["clip/frac_low"] > 0 and metrics["clip/frac_high"] > 0
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=0, atol=1e-6)
    for ours_grad, trl_grad in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-5, atol=1e-6)
