"""Semantic IDs: residual k-means, collision resolution, the index JSON, the trie, and constrained generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rollouts.sid import (
    SIDIndex,
    SIDIndexError,
    SIDTrie,
    add_sid_tokens,
    build_sid_index,
    code_metrics,
    constrained_beam_search,
    constrained_greedy,
    kmeans,
    residual_kmeans,
    resolve_collisions,
    sample_sids,
)


def blobs(num_per_blob: int = 20, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight, far-apart Gaussian blobs: x_ND and the true blob of each point."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:3] * 10
    labels = torch.arange(3).repeat_interleave(num_per_blob)
    return centres[labels] + 0.1 * torch.randn(3 * num_per_blob, dim, generator=gen), labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------------------------------------------------------------
# k-means and codes.


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    x, labels = blobs()
    first = kmeans(x, 3, seed=7)
    assert same_partition(first.codes_N, labels)
    again = kmeans(x, 3, seed=7)
    assert torch.equal(first.codes_N, again.codes_N) and torch.equal(first.centroids_KD, again.centroids_KD)
    # Each centre is the mean of its points.
    for k in range(3):
        assert torch.allclose(first.centroids_KD[k], x[first.codes_N == k].double().mean(0))


def test_kmeans_with_more_clusters_than_distinct_points_leaves_codes_unused():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    result = kmeans(x, 4, seed=0)
    assert result.codes_N[0] == result.codes_N[1] != result.codes_N[2]
    assert result.inertia == pytest.approx(0.0)


def test_residual_kmeans_levels_shrink_the_residual_and_repeat_exactly():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    codes_NL, books = residual_kmeans(x, num_levels=3, codes_per_level=8, seed=3)
    assert codes_NL.shape == (200, 3) and codes_NL.dtype == torch.int64
    assert int(codes_NL.min()) >= 0 and int(codes_NL.max()) < 8
    residual = x.double()
    energies = [float((residual**2).sum())]
    for level, book_KD in enumerate(books):
        residual = residual - book_KD[codes_NL[:, level]]
        energies.append(float((residual**2).sum()))
    assert energies == sorted(energies, reverse=True) and energies[-1] < 0.7 * energies[0]
    again, _ = residual_kmeans(x, num_levels=3, codes_per_level=8, seed=3)
    assert torch.equal(codes_NL, again)


def test_resolve_collisions_numbers_items_within_each_shared_code():
    codes = torch.tensor([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [1, 1]])
    assert resolve_collisions(codes).tolist() == [[0, 1, 0], [0, 1, 1], [2, 3, 0], [0, 1, 2], [2, 3, 1], [1, 1, 0]]
    unique = torch.tensor([[0, 1], [1, 0]])
    assert torch.equal(resolve_collisions(unique), unique)


def test_code_metrics_by_hand():
    codes = torch.tensor([[0, 1], [0, 1], [2, 3], [1, 3]])
    m = code_metrics(codes, codes_per_level=4)
    assert m["sid/collision_rate"] == pytest.approx(1 - 3 / 4)
    assert m["sid/colliding_items"] == pytest.approx(2 / 4) and m["sid/max_items_per_sid"] == 2
    assert m["sid/code_usage_l1"] == pytest.approx(3 / 4) and m["sid/code_usage_l2"] == pytest.approx(2 / 4)
    assert m["sid/code_perplexity_l1"] == pytest.approx(2**1.5)  # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    assert m["sid/code_perplexity_l2"] == pytest.approx(2.0)


def test_build_index_makes_unique_sids_even_for_identical_embeddings():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    x[10:15] = x[3]  # six identical items: the same codes at every level
    ids = [f"item{i}" for i in range(50)]
    index, metrics = build_sid_index(ids, x, num_levels=2, codes_per_level=4, seed=0)
    assert metrics["sid/max_items_per_sid"] >= 6 and metrics["sid/num_levels"] == 3
    assert metrics["sid/extra_level_codes"] == metrics["sid/max_items_per_sid"]
    sids = [index[i] for i in ids]
    assert len(set(sids)) == 50 and {len(s) for s in sids} == {3}
    assert {s[2] for s in sids} <= {f"<c_{k}>" for k in range(int(metrics["sid/extra_level_codes"]))}
    assert all(s[0].startswith("<a_") and s[1].startswith("<b_") for s in sids)
    assert build_sid_index(ids, x, num_levels=2, codes_per_level=4, seed=0)[0] == index


# ---------------------------------------------------------------------------------------------------------------------
# The index file.


def test_index_json_round_trip_is_identical(tmp_path):
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    index, _ = build_sid_index([*range(1, 16), *[f"B0{i}" for i in range(15)]], x, num_levels=2, codes_per_level=4)
    path = index.save(tmp_path / "sid.json")
    loaded = SIDIndex.load(path)
    assert loaded == index and loaded.sids == index.sids and list(loaded) == list(index)
    assert loaded.save(tmp_path / "again.json").read_text() == path.read_text()  # byte-identical on re-save
    assert isinstance(next(iter(loaded)), int)  # "1" in the file is item 1 again
    assert json.loads(path.read_text())["1"] == list(index[1])


def test_foreign_index_in_the_common_form_is_accepted(tmp_path):
    text = """{"B00X":["<a_12>","<b_7>","<c_3>"],
      "B00Y": ["<a_12>", "<b_7>", "<c_4>"],
      "17": ["<a_0>", "<b_255>", "<c_3>"], "042": ["<a_1>", "<b_1>", "<c_1>"]}"""
    path = tmp_path / "foreign.json"
    path.write_text(text)
    index = SIDIndex.load(path)
    assert len(index) == 4 and index.item_for(["<a_12>", "<b_7>", "<c_4>"]) == "B00Y"
    assert index[17] == ("<a_0>", "<b_255>", "<c_3>") and "042" in index  # "042" is not canonical: stays a string
    assert index.tokens()[:3] == ["<a_0>", "<a_1>", "<a_12>"] and index.sid_text("B00X") == "<a_12><b_7><c_3>"
    assert SIDIndex.load(index.save(tmp_path / "ours.json")) == index


@pytest.mark.parametrize("text, fragments", [
    ('{"1": ["<a_1>", "<b_1>"],\n "2": ["<a_1>", "<b_1>"]}',
     ["line 2, item 2", "same SID <a_1><b_1>", "as line 1, item 1"]),
    ('{"1": ["<a_1>"],\n "2": ["<a_1>", "<b_1>"]}', ["line 2, item 2", "starts with the whole SID of line 1, item 1"]),
    ('{"1": ["<a_1>"],\n "x": []}', ["line 2, item 'x'", "the SID is empty"]),
    ('{"1": ["<a_1>", 7]}', ["line 1, item 1:", "token 2 is int 7"]),
    ('{"1": ["<a_1>"],\n\n "2": ["a_1"]}', ["line 3, item 2:", "token 1 'a_1' is not of the form"]),
    ('{"1": "<a_1><b_2>"}', ["line 1, item 1:", "expected a list of tokens"]),
    ('{"1": ["<a_1>"],\n "1": ["<a_2>"]}', ["line 2, item 1:", "already listed on line 1"]),
    ('{"1": ["<a_1>"],\n "2": ["<a_2>"}', ["2: invalid JSON"]),
    ('[["<a_1>"]]', ["expected an object {item_id: [tokens]}"]),
])
def test_bad_index_is_rejected_naming_item_line_and_problem(tmp_path, text, fragments):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SIDIndexError) as err:
        SIDIndex.load(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------------------------------
# The trie.


def small_index() -> SIDIndex:
    return SIDIndex({1: ["<a_0>", "<b_0>"], 2: ["<a_0>", "<b_1>"], 3: ["<a_1>", "<b_0>"], "x": ["<a_2>", "<b_5>"]})


TOKEN_IDS = {"<a_0>": 10, "<a_1>": 11, "<a_2>": 12, "<b_0>": 20, "<b_1>": 21, "<b_5>": 25}


def test_trie_allowed_next_and_items():
    trie = small_index().trie(TOKEN_IDS, end_ids=[2])
    assert trie.allowed_next([]) == (10, 11, 12)
    assert trie.allowed_next([10]) == (20, 21) and trie.allowed_next([12]) == (25,)
    assert trie.allowed_next([10, 21]) == (2,)  # a finished SID: only the end token
    assert trie.allowed_next([20]) == () and trie.allowed_next([10, 25]) == ()  # no valid SID goes that way
    assert trie.item_for([11, 20]) == 3 and trie.item_for([12, 25]) == "x" and trie.item_for([10]) is None
    node = trie.step(trie.step(0, 10), 20)
    assert trie.is_leaf(node) and trie.item_at(node) == 1 and trie.step(node, 10) == -1
    logits = torch.arange(30, dtype=torch.float32)
    trie.mask_logits_(logits, node=trie.node_for([10]))
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [20, 21] and logits[21] == 21.0
    assert trie.max_depth == 2 and trie.num_items == 4


def test_trie_rejects_duplicates_and_prefixes():
    with pytest.raises(ValueError, match="prefix"):
        SIDTrie({1: [1, 2], 2: [1]})
    with pytest.raises(ValueError, match="prefix"):
        SIDTrie({1: [1], 2: [1, 2]})
    with pytest.raises(ValueError, match="equals"):
        SIDTrie({1: [1, 2], 2: [1, 2]})
    with pytest.raises(ValueError, match="no token id"):
        small_index().trie({"<a_0>": 1})


def test_trie_decode_splits_runs_into_items():
    trie = small_index().trie(TOKEN_IDS)
    assert trie.decode([10, 20, 11, 20]) == [1, 3]  # two SIDs back to back
    assert trie.decode([5, 10, 21, 7, 12, 25, 2]) == [2, "x"]  # other tokens around them are ignored
    assert trie.decode([10, 25, 11, 20]) == [None, 3]  # a bad continuation ends the SID; the next one still counts
    assert trie.decode([20, 25, 10, 20]) == [None, 1]  # a stretch that can start nothing: one None
    assert trie.decode([10, 5, 11]) == [None, None]  # unfinished, interrupted; unfinished at the end


def test_index_parses_generated_text():
    index = small_index()
    assert index.parse("I suggest <a_0><b_1> or <a_2> <b_5>.") == [2, "x"]
    assert index.parse("<a_0><b_9><a_1><b_0>") == [None, 3] and index.parse("no ids here") == []


# ---------------------------------------------------------------------------------------------------------------------
# Constrained generation on a tiny random model.


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper logits than the default init, so the distribution is far from uniform
        model.get_input_embeddings().weight.mul_(20.0)
    return model


def random_index(num_items: int, levels: int, codes: int, seed: int = 0) -> SIDIndex:
    gen = torch.Generator().manual_seed(seed)
    combos = torch.randperm(codes**levels, generator=gen)[:num_items].tolist()
    sids = {i: [f"<{'abc'[lv]}_{(c // codes**lv) % codes}>" for lv in range(levels)] for i, c in enumerate(combos)}
    return SIDIndex(sids)


def test_200_constrained_samples_are_all_valid_items_and_unconstrained_ones_are_not():
    index = random_index(num_items=40, levels=3, codes=4)  # 40 of the 64 possible code triples are items
    token_to_id = {t: 32 + k for k, t in enumerate(index.tokens())}
    trie = index.trie(token_to_id)
    model = tiny_llama(vocab_size=64)
    prompt = [1, 5, 9, 3]
    constrained = sample_sids(model, prompt, num_samples=200, trie=trie, generator=torch.Generator().manual_seed(0))
    assert len(constrained) == 200 and all(trie.item_for(s) is not None for s in constrained)
    assert len({trie.item_for(s) for s in constrained}) > 5  # sampling, not one forced answer
    id_to_token = {v: k for k, v in token_to_id.items()}
    assert all(index.item_for([id_to_token[t] for t in s]) is not None for s in constrained)
    # Baselines: SID tokens only (right kinds of tokens, any combination), and the free vocabulary.
    sid_tokens_only = sample_sids(model, prompt, num_samples=200, num_tokens=3, allowed_ids=sorted(id_to_token),
                                  generator=torch.Generator().manual_seed(0))
    free = sample_sids(model, prompt, num_samples=200, num_tokens=3, generator=torch.Generator().manual_seed(0))
    for unconstrained in (sid_tokens_only, free):
        num_invalid = sum(trie.item_for(s) is None for s in unconstrained)
        assert num_invalid > 50, num_invalid


def exact_sid_logprob(model, prompt: list[int], trie: SIDTrie, seq: tuple[int, ...]) -> float:
    """log p(seq) with each step's softmax restricted to the tokens the trie allows there."""
    total, prefix = 0.0, ()
    for token in seq:
        logits = model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1]
        allowed = list(trie.allowed_next(prefix))
        total += float(torch.log_softmax(logits[allowed], -1)[allowed.index(token)])
        prefix += (token,)
    return total


def test_beam_search_with_all_beams_is_exact_and_narrow_beams_return_valid_distinct_items():
    index = random_index(num_items=12, levels=2, codes=4, seed=1)
    token_to_id = {t: 40 + k for k, t in enumerate(index.tokens())}
    trie = index.trie(token_to_id)
    model = tiny_llama(vocab_size=64, seed=3)
    prompt = [3, 1, 4]
    with torch.no_grad():
        exact = sorted(((exact_sid_logprob(model, prompt, trie, tuple(token_to_id[t] for t in sid)), item)
                        for item, sid in index.sids.items()), key=lambda p: -p[0])
    hits = constrained_beam_search(model, prompt, trie, num_beams=12, top_k=12)
    assert [h.item_id for h in hits] == [item for _, item in exact]
    assert [h.logprob for h in hits] == pytest.approx([lp for lp, _ in exact], abs=1e-5)
    assert math.fsum(math.exp(h.logprob) for h in hits) == pytest.approx(1.0, abs=1e-5)  # a distribution over items
    narrow = constrained_beam_search(model, prompt, trie, num_beams=4, top_k=3)
    assert len(narrow) == 3 and len({h.item_id for h in narrow}) == 3
    assert all(trie.item_for(h.token_ids) == h.item_id for h in narrow)
    assert [h.logprob for h in narrow] == sorted((h.logprob for h in narrow), reverse=True)
    greedy = constrained_greedy(model, prompt, trie)
    with torch.no_grad():  # step by step: the most likely allowed token each time
        prefix: tuple[int, ...] = ()
        while trie.item_for(prefix) is None:
            logits = model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1]
            allowed = list(trie.allowed_next(prefix))
            prefix += (allowed[int(logits[allowed].argmax())],)
    assert greedy.token_ids == prefix


def test_sid_tokens_join_a_real_tokenizer_and_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    old_vocab, old_rows = len(tokenizer), model.get_input_embeddings().weight.detach().clone()
    index = random_index(num_items=30, levels=3, codes=4, seed=2)
    torch.manual_seed(0)
    token_to_id = add_sid_tokens(tokenizer, index, model)
    assert len(tokenizer) == old_vocab + len(index.tokens()) == model.get_input_embeddings().weight.shape[0]
    assert torch.equal(model.get_input_embeddings().weight[:old_vocab], old_rows)  # existing rows untouched
    assert tokenizer("x " + index.sid_text(5), add_special_tokens=False)["input_ids"][-3:] == \
        [token_to_id[t] for t in index[5]]
    assert add_sid_tokens(tokenizer, index, model) == token_to_id and len(tokenizer) == old_vocab + len(token_to_id)
    # End to end: constrained samples decode, as text, to real items.
    trie = index.trie(token_to_id, end_ids=[tokenizer.eos_token_id])
    prompt = tokenizer("Next item:", add_special_tokens=False)["input_ids"]
    samples = sample_sids(model, prompt, num_samples=20, trie=trie, generator=torch.Generator().manual_seed(1))
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
    assert all(len(index.parse(t)) == 1 and index.parse(t)[0] is not None for t in texts), texts


# ---------------------------------------------------------------------------------------------------------------------
# Real item embeddings.


def test_minilm_embeddings_of_movielens_items_are_normalised_cached_and_give_unique_sids(tmp_path, monkeypatch):
    from rl.assets import prepare
    from rollouts import embed
    from rollouts.envs.rec import RecData

    prepare("encoder")
    data = RecData.load_movielens(prepare("data")["data"])
    item_ids = list(data.items)[:150]
    texts = [data.items[i].embedding_text() for i in item_ids]
    emb = embed.cached_embeddings(item_ids, texts, name="ml-subset", cache_dir=tmp_path)
    assert emb.shape == (150, 384) and torch.allclose(emb.norm(dim=1), torch.ones(150), atol=1e-5)
    assert embed.stored_item_ids(tmp_path / "ml-subset.safetensors") == item_ids
    # Toy Story (1) is closer to Aladdin (95, animated) than to Schindler's List (not in the subset: embed it).
    schindler = embed.embed_texts([data.items[318].embedding_text()])[0]
    assert float(emb[0] @ emb[item_ids.index(95)]) > float(emb[0] @ schindler)
    monkeypatch.setattr(embed, "embed_texts", lambda *a, **k: pytest.fail("cache miss"))
    assert torch.equal(embed.cached_embeddings(item_ids, texts, name="ml-subset", cache_dir=tmp_path), emb)
    index, metrics = build_sid_index(item_ids, emb, num_levels=2, codes_per_level=8, seed=0)
    assert len({index[i] for i in item_ids}) == 150 and metrics["sid/code_usage_l1"] == 1.0


@pytest.mark.slow
def test_movielens_full_catalogue_sid_index(tmp_path):
    """L=3, K=32 over all 1,682 MovieLens-100K items (the embeddings take a minute on 2 busy cores, then are cached)."""
    from rollouts.embed import movielens_item_embeddings

    item_ids, emb = movielens_item_embeddings()
    index, metrics = build_sid_index(item_ids, emb, num_levels=3, codes_per_level=32, seed=0)
    assert len(index) == 1682 and len(set(index.sids.values())) == 1682
    assert metrics["sid/collision_rate"] < 0.3 and metrics["sid/max_items_per_sid"] <= 8
    assert all(metrics[f"sid/code_usage_l{lv}"] >= 0.9 for lv in (1, 2, 3))
    assert SIDIndex.load(index.save(tmp_path / "ml.json")) == index
