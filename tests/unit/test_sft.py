"""rl/sft.py: completion-only SFT warm-start on the tiny Llama with SID tokens added (seconds on CPU).

Invariants: prompt and padding tokens never enter the loss; a few SFT steps raise log p(target SID | prompt) of the
trained pairs; a warm-start is cached in its directory (reused with the same settings, refused with others).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rl.config import ConfigError, SFTConfig
from rl.sft import (
    IGNORE,
    SFTExample,
    collate,
    encode_example,
    finetune,
    mean_target_logprob,
    target_logprobs_B,
    warm_start,
)


@pytest.fixture(scope="module")
def sid_setup(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 6-item, 2-level SID index added, saved; (path, tokenizer, index, examples)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollouts.sid import SIDIndex, add_sid_tokens

    index = SIDIndex({1: ["<a_0>", "<b_0>"], 2: ["<a_0>", "<b_1>"], 3: ["<a_1>", "<b_0>"], 4: ["<a_1>", "<b_1>"],
                      5: ["<a_2>", "<b_0>"], 6: ["<a_2>", "<b_1>"]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    add_sid_tokens(tokenizer, index, model)
    out = tmp_path_factory.mktemp("tiny-sid")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    render = lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                        add_generation_prompt=True)
    examples = [SFTExample(prompt=render(f"The user watched movie {item}. Which semantic ID is next?"),
                           target=index.sid_text(item % 6 + 1)) for item in index]
    return out, tokenizer, index, examples


def test_encoding_labels_only_the_target_and_eos(sid_setup):
    _, tokenizer, index, examples = sid_setup
    ids, labels = encode_example(tokenizer, examples[0])
    target_ids = tokenizer.convert_tokens_to_ids(list(index[2])) + [tokenizer.eos_token_id]
    assert ids[-3:] == target_ids and labels[-3:] == target_ids
    assert labels[:-3] == [IGNORE] * (len(ids) - 3)
    batch = collate([(ids, labels), ([5, 6], [IGNORE, 6])], pad_id=0)  # left-padded: targets end every row
    assert batch["labels"][1].tolist() == [IGNORE] * (len(ids) - 2) + [IGNORE, 6]
    assert batch["attention_mask"][1].tolist() == [0] * (len(ids) - 2) + [1, 1]
    assert batch["position_ids"][1, -2:].tolist() == [0, 1] and batch["position_ids"][0, -1] == len(ids) - 1


def test_padding_never_changes_an_examples_target_logprob(sid_setup):
    from transformers import AutoModelForCausalLM

    path, tokenizer, _, examples = sid_setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    long = SFTExample(prompt=examples[1].prompt + " and many more words to make it longer", target=examples[1].target)
    with torch.no_grad():
        alone = target_logprobs_B(model, collate([encode_example(tokenizer, examples[0])], 0))
        padded = target_logprobs_B(model, collate([encode_example(tokenizer, e) for e in (examples[0], long)], 0))
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)


def test_a_few_sft_steps_raise_the_target_sid_logprob(sid_setup):
    from transformers import AutoModelForCausalLM

    path, tokenizer, _, examples = sid_setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    before = mean_target_logprob(model, tokenizer, examples)
    cfg = SFTConfig(num_steps=8, lr=3e-3, batch_size=6)
    metrics = finetune(model, tokenizer, {"next_item": examples}, {"next_item": 1.0}, cfg=cfg, seed=0,
                       progress=False)
    after = mean_target_logprob(model, tokenizer, examples)
    # 2 SID tokens + EOS among ~49k tokens: a random model gives about 3 * log(1/49k) ≈ -32; SFT must gain a lot.
    assert after > before + 5.0, (before, after)
    assert metrics["sft/num_steps"] == 8 and metrics["sft/loss_last10"] < metrics["sft/loss_first"]
    assert "sft/loss_last10_next_item" in metrics


def test_warm_start_is_cached_and_refuses_other_settings(sid_setup, tmp_path):
    path, _, _, examples = sid_setup
    cfg = SFTConfig(num_steps=2, lr=1e-3, batch_size=2)
    sources, weights = {"next_item": examples}, {"next_item": 1.0}
    first = warm_start(str(path), sources, weights, tmp_path / "sft_model", cfg=cfg, seed=0, progress=False)
    assert not first.reused and (tmp_path / "sft_model" / "config.json").is_file()
    again = warm_start(str(path), sources, weights, tmp_path / "sft_model", cfg=cfg, seed=0, progress=False)
    assert again.reused and again.metrics == first.metrics and again.model_path == first.model_path
    with pytest.raises(ConfigError, match="sft differ"):
        warm_start(str(path), sources, weights, tmp_path / "sft_model", cfg=dataclasses.replace(cfg, lr=2e-3),
                   seed=0, progress=False)


def test_nothing_to_train_on_is_a_clear_error(sid_setup):
    _, tokenizer, _, examples = sid_setup
    with pytest.raises(ValueError, match="nothing to train on"):
        finetune(None, tokenizer, {"next_item": examples, "alignment": []}, {"next_item": 0.0, "alignment": 1.0},
                 cfg=SFTConfig(num_steps=1), seed=0, progress=False)
