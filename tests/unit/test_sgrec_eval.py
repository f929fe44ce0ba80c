"""sgrec_a2po's evaluation pieces without engines: the ranked item list, HR@K/NDCG@K on a fake pool, the alignment
pairs of the SFT warm-start, and the error when the config does not name the run's index."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from rl.config import Config, ConfigError, DataConfig, RolloutConfig
from rl.types import Rollout, Sample
from rollouts.sid import SIDIndex

INDEX = SIDIndex({1: ["<a_0>", "<b_0>"], 2: ["<a_0>", "<b_1>"], 3: ["<a_1>", "<b_0>"], 4: ["<a_1>", "<b_1>"]})


def test_rank_items_puts_greedy_first_then_sampled_items_by_best_logprob():
    from recipes.sgrec_a2po.main import rank_items

    sampled = [(3, -2.0), (None, -0.1), (2, -1.0), (3, -0.5), (1, -0.2), (4, -1.0)]
    # greedy 1 first (its sampled copy is not listed twice), then 3 (best -0.5), then 2 and 4 tied at -1.0 in order.
    assert rank_items(1, sampled) == [1, 3, 2, 4]
    assert rank_items(None, [(None, 0.0)]) == []


@dataclass
class FakePool:
    """Greedy answers item 2 for every prompt; sampled answers cycle through `answers` with log-prob -k for the k-th."""

    answers: list[int]
    policy_version: int = 0
    calls: list[int] = field(default_factory=list)

    def _rollout(self, sample: Sample, index: int, item: int, logprob: float) -> Rollout:
        return Rollout(rollout_id=f"{sample.sample_id}/{index}", sample=sample, index=index, prompt_token_ids=(1,),
                       completion_token_ids=(5, 6), text=INDEX.sid_text(item), logprobs=(logprob, 0.0),
                       finish_reason="stop", policy_version=0)

    def generate_greedy(self, samples, *, max_new_tokens):
        return [self._rollout(s, 0, 2, 0.0) for s in samples]

    def generate(self, samples, *, policy_version, seed):
        self.calls.append(len(samples))
        return [self._rollout(s, g, self.answers[g % len(self.answers)], -float(g)) for s in samples for g in range(2)]


class FakeForm:
    index = INDEX


@dataclass
class FakeTask:
    targets: list[int]
    form: FakeForm = field(default_factory=FakeForm)

    def samples(self, *, limit, seed):
        return [Sample(sample_id=f"s{n}", prompt="p", metadata={"item_id": t}) for n, t in enumerate(self.targets)]


def test_evaluate_hr_and_ndcg_by_hand():
    from recipes.sgrec_a2po.main import make_evaluate

    cfg = Config(data=DataConfig(eval_k=[1, 3], num_eval_users=3), rollout=RolloutConfig(num_samples_per_prompt=2))
    pool = FakePool(answers=[4, 3])  # every user: ranked [2 (greedy), 4 (-0), 3 (-1)]
    metrics = make_evaluate(FakeTask(targets=[2, 3, 1]), cfg)(type("P", (), {"pool": pool})(), 0)
    assert pool.calls == [9]  # 2·max(K) = 6 samples per user: 3 copies of 3 users, 2 samples each
    assert metrics["eval/hr@1"] == pytest.approx(1 / 3) and metrics["eval/hr@3"] == pytest.approx(2 / 3)
    assert metrics["eval/ndcg@1"] == pytest.approx(1 / 3)
    assert metrics["eval/ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)  # user 2: rank 3 -> 1/log2(3 + 1)
    assert metrics["eval/valid_sid_frac"] == 1.0 and metrics["eval/distinct_items_frac"] == pytest.approx(1 / 3)


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


def test_evaluate_reports_raw_ecpm_of_greedy_and_sampled_items(tmp_path):
    from recipes.sgrec_a2po.main import make_evaluate
    from rewards.ecpm import default_ctr_dir, load_ctr, synthetic_bid
    from rl.config import RewardConfig, RewardSpec

    if not (default_ctr_dir() / "model.pt").is_file():
        pytest.skip("no CTR artifact: run `recforge prepare` (or `python -m rewards.train ctr`)")
    index_path = str(INDEX.save(tmp_path / "sid_index.json"))
    spec = RewardSpec(name="ecpm", kwargs={"item_parser": "sid", "sid_index": index_path})
    cfg = Config(data=DataConfig(eval_k=[1, 2], num_eval_users=2), rollout=RolloutConfig(num_samples_per_prompt=2),
                 reward=RewardConfig(rewards=[spec]))

    class UserTask(FakeTask):
        def samples(self, *, limit, seed):
            return [Sample(sample_id=f"s{n}", prompt="p", metadata={"item_id": t, "user_id": 10 + n})
                    for n, t in enumerate(self.targets)]

    pool = FakePool(answers=[4, 3])  # greedy: item 2 for users 10 and 11; sampled: items 4 and 3 for each
    metrics = make_evaluate(UserTask(targets=[2, 3]), cfg)(type("P", (), {"pool": pool})(), 0)
    art = load_ctr()

    def value(user: int, item: int) -> float:  # eCPM = 1000 · bid · pCTR
        return 1000 * synthetic_bid(item, art.vocab.items[item].genres) * art.pctr([user], [item])[0]

    assert metrics["eval/ecpm"] == pytest.approx((value(10, 2) + value(11, 2)) / 2)
    sampled = [value(u, i) for u in (10, 11) for i in (4, 3)]  # 2 copies of each user, each copy sampling 4 then 3
    assert metrics["eval/ecpm_sampled"] == pytest.approx(sum(sampled) / len(sampled))
