"""`ecpm` reward: arithmetic, group normalisation, AUC, bid tables, item parsing, the DeepFM and its artifact."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch

from rewards.ecpm import (
    ArtifactError,
    CtrVocab,
    DeepFM,
    age_bucket,
    ecpm,
    ecpm_reward,
    fit_ctr,
    load_ctr,
    load_value_table,
    normalise_in_groups,
    predict_ctr,
    roc_auc,
    save_ctr,
    synthetic_bid,
    year_bucket,
)
from rewards.items import ItemInfo, UserInfo, normalise_title, parse_item_id, parse_item_title, title_index
from rl.types import Rollout, Sample

USERS = {1: UserInfo(age=24, gender="M", occupation="technician"), 2: UserInfo(age=53, gender="F", occupation="other")}
ITEMS = {
    1: ItemInfo(title="Toy Story", year="1995", genres=("Animation", "Children's", "Comedy")),
    2: ItemInfo(title="Usual Suspects, The", year="1995", genres=("Crime", "Thriller")),
    3: ItemInfo(title="Cape Fear", year="1962", genres=("Film-Noir", "Thriller")),
    4: ItemInfo(title="Cape Fear", year="1991", genres=("Thriller",)),
}
CONFIG = {"embed_dim": 4, "hidden": [8], "dropout": 0.0}


def rollout(sample_id: str, index: int, text: str = "", **metadata) -> Rollout:
    return Rollout(rollout_id=f"{sample_id}/{index}", sample=Sample(sample_id=sample_id, prompt="p", metadata=metadata),
                   index=index, prompt_token_ids=(1,), completion_token_ids=(), text=text, logprobs=(),
                   finish_reason="stop", policy_version=0)


@pytest.fixture()
def constant_ctr(tmp_path):
    """A CTR artifact whose pCTR is exactly 0.02 for every pair: every weight 0, bias = logit(0.02)."""
    vocab = CtrVocab.build(USERS, ITEMS)
    model = DeepFM(vocab.field_sizes, len(vocab.genres), embed_dim=4, hidden=[8], dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.bias.fill_(math.log(0.02 / 0.98))
    return save_ctr(tmp_path / "ctr", model, vocab, config=CONFIG, metrics={})


@pytest.fixture()
def bids_csv(tmp_path):
    path = tmp_path / "bids.csv"
    path.write_text("item_id,bid\n1,0.5\n2,1.0\n3,0.25\n")
    return str(path)


def test_ecpm_arithmetic():
    # 1000 impressions × pCTR 0.02 = 20 clicks × 0.50 per click = 10.00 per mille
    assert ecpm(0.5, 0.02) == pytest.approx(10.0)
    # with a 10 % conversion rate (cost per conversion): 20 clicks × 0.1 × 0.5 = 1.00
    assert ecpm(0.5, 0.02, 0.1) == pytest.approx(1.0)
    assert ecpm(0.0, 0.9) == 0.0


def test_group_normalisation_by_hand():
    values, groups = [10.0, 20.0, 30.0, 5.0, 5.0], ["a", "a", "a", "b", "b"]
    assert normalise_in_groups(values, groups, "minmax") == pytest.approx([0.0, 0.5, 1.0, 0.0, 0.0])
    std = math.sqrt((100 + 0 + 100) / 3)  # population std of 10, 20, 30
    assert normalise_in_groups(values, groups, "zscore") == pytest.approx([-10 / std, 0.0, 10 / std, 0.0, 0.0])
    assert normalise_in_groups(values, groups, "none") == values
    with pytest.raises(ValueError, match="normalize='rank'"):
        normalise_in_groups(values, groups, "rank")


def test_roc_auc_by_hand():
    # positives 0.35 and 0.8 vs negatives 0.1 and 0.4: 3 of the 4 (pos, neg) pairs are ordered right
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts 1/2
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])


def test_buckets():
    assert [age_bucket(a) for a in (7, 18, 24, 25, 56, 73)] == ["<18", "18-24", "18-24", "25-34", "56+", "56+"]
    assert age_bucket(None) == ""
    assert [year_bucket(y) for y in ("1995", "1939", "1940", "", "unknown")] == [
        "1990s", "<1940", "1940s", "unknown", "unknown"]


def test_synthetic_bid_is_the_documented_hash():
    u = int.from_bytes(hashlib.sha256(b"1|Animation|Children's|Comedy").digest()[:8], "big") / 2.0**64
    assert synthetic_bid(1, ("Comedy", "Animation", "Children's")) == round(0.10 + 1.90 * u, 4)
    bids = [synthetic_bid(i, ("Drama",)) for i in range(1, 200)]
    assert all(0.10 <= b < 2.00 for b in bids) and len(set(bids)) > 150


def test_value_tables(tmp_path, bids_csv):
    assert load_value_table(bids_csv) == {1: 0.5, 2: 1.0, 3: 0.25}
    (tmp_path / "b.json").write_text(json.dumps({"7": 1.5}))
    assert load_value_table(tmp_path / "b.json") == {7: 1.5}
    (tmp_path / "bad.csv").write_text("item_id,bid\n1,0.5\n2,-1\n")
    with pytest.raises(ValueError, match=r"bad.csv line 3: bid -1.0 for item 2 must be finite and >= 0"):
        load_value_table(tmp_path / "bad.csv")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_value_table(tmp_path / "nope.csv")


def test_item_parsers():
    assert parse_item_id("I think the user wants this.\nItem: 123") == 123
    assert parse_item_id("**Recommendation:** #7\nitem_id = 42") == 42  # the last line wins
    assert parse_item_id("no id here") is None
    index = title_index(ITEMS)
    assert normalise_title("Usual Suspects, The") == "the usual suspects"
    assert parse_item_title("Crime fan.\nRecommendation: The Usual Suspects (1995)", index) == (2, "The Usual "
                                                                                               "Suspects (1995)")
    assert parse_item_title("Recommendation: Cape Fear (1991)", index)[0] == 4  # the year picks the remake
    assert parse_item_title("Recommendation: cape fear", index)[0] == 3  # no year: the smallest id
    assert parse_item_title("Recommendation: Heat", index) == (None, "Heat")
    assert parse_item_title("Toy Story", index) == (None, None)


def test_reward_ecpm_by_hand(constant_ctr, bids_csv):
    # pCTR 0.02 everywhere, so raw eCPM = 1000 · bid · 0.02 = 20 · bid: items 1, 2, 3 → 10, 20, 5
    group = [rollout("s1", i, user_id=1, candidate_item_id=item) for i, item in enumerate((1, 2, 3))]
    results = ecpm_reward(group, ctr_model=str(constant_ctr), bids=bids_csv)
    assert [r.components["ecpm"] for r in results] == pytest.approx([10.0, 20.0, 5.0])
    assert [r.components["pctr"] for r in results] == pytest.approx([0.02] * 3)
    assert [r.score for r in results] == pytest.approx([5 / 15, 1.0, 0.0])  # min-max within the group
    raw = ecpm_reward(group, ctr_model=str(constant_ctr), bids=bids_csv, normalize="none")
    assert [r.score for r in raw] == pytest.approx([10.0, 20.0, 5.0])
    # two groups in one call are normalised separately; a single-rollout group has nothing to compare with
    mixed = ecpm_reward(group[:2] + [rollout("s2", 0, user_id=2, candidate_item_id=3)],
                        ctr_model=str(constant_ctr), bids=bids_csv)
    assert [r.score for r in mixed] == pytest.approx([0.0, 1.0, 0.0])


def test_unparsable_completion_earns_nothing_and_says_so(constant_ctr, bids_csv):
    group = [rollout("s1", 0, "Item: 2", user_id=1), rollout("s1", 1, "I cannot decide.", user_id=1),
             rollout("s1", 2, "Item: 999", user_id=1)]
    results = ecpm_reward(group, ctr_model=str(constant_ctr), bids=bids_csv, item_parser="item_id")
    assert [r.score for r in results] == pytest.approx([1.0, 0.0, 0.0])
    assert [r.details["parsed"] for r in results] == [True, False, False]
    assert [r.components["parsed"] for r in results] == [1.0, 0.0, 0.0]
    assert results[1].details["reason"] == "no 'Item: <id>' line in the completion"
    assert results[2].details["reason"] == "item 999 is not in the catalogue"
    assert "pctr" not in results[1].components


def test_reward_errors_name_the_problem(constant_ctr, bids_csv, tmp_path):
    with pytest.raises(KeyError, match="item 4 has no bid"):
        ecpm_reward([rollout("s", 0, user_id=1, candidate_item_id=4)], ctr_model=str(constant_ctr), bids=bids_csv)
    ok = ecpm_reward([rollout("s", 0, user_id=1, candidate_item_id=4)], ctr_model=str(constant_ctr), bids=bids_csv,
                     missing_bid=0.0, normalize="none")
    assert ok[0].score == 0.0
    with pytest.raises(KeyError, match="has no 'user_id'"):
        ecpm_reward([rollout("s", 0, candidate_item_id=1)], ctr_model=str(constant_ctr))
    with pytest.raises(ValueError, match="'candidate_item_id'=77 .* is not in the item catalogue"):
        ecpm_reward([rollout("s", 0, user_id=1, candidate_item_id=77)], ctr_model=str(constant_ctr))
    with pytest.raises(ArtifactError, match="python -m rewards.train ctr"):
        ecpm_reward([rollout("s", 0, user_id=1, candidate_item_id=1)], ctr_model=str(tmp_path / "missing"))


def test_synthetic_bids_by_default(constant_ctr):
    results = ecpm_reward([rollout("s", 0, user_id=1, candidate_item_id=1)], ctr_model=str(constant_ctr),
                          normalize="none")
    bid = synthetic_bid(1, ITEMS[1].genres)
    assert results[0].components["bid"] == bid and results[0].score == pytest.approx(20.0 * bid)


@pytest.fixture()
def one_thread():
    """Tiny models train fastest on one thread, especially on a shared 2-core host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_deepfm_learns_a_planted_preference_and_round_trips(tmp_path, one_thread):
    # user 1 clicks thrillers, user 2 clicks comedies; each non-click is the other kind
    torch.manual_seed(0)
    vocab = CtrVocab.build(USERS, ITEMS)
    rng = random.Random(0)
    pairs = [(rng.choice([1, 2]), rng.choice([1, 2, 3, 4])) for _ in range(2000)]
    labels = [float((u == 1) == ("Thriller" in ITEMS[i].genres)) for u, i in pairs]
    sparse_NF, genres_NK = vocab.encode([u for u, _ in pairs], [i for _, i in pairs])
    model = DeepFM(vocab.field_sizes, len(vocab.genres), **CONFIG)
    losses = fit_ctr(model, sparse_NF, genres_NK, torch.tensor(labels), epochs=15, batch_size=128, lr=2e-2,
                     oov_rate=0.0)
    assert losses[-1] < 0.2 < losses[0]
    assert roc_auc(predict_ctr(model, sparse_NF, genres_NK).tolist(), labels) > 0.99
    art = load_ctr(save_ctr(tmp_path / "planted", model, vocab, config=CONFIG, metrics={"auc": 1.0}))
    assert art.pctr([1, 1, 2], [2, 1, 1]) == pytest.approx(predict_ctr(model, *vocab.encode([1, 1, 2], [2, 1, 1]))
                                                           .tolist())
    assert art.pctr([1], [2])[0] > 0.8 and art.pctr([1], [1])[0] < 0.2
    assert len(art.pctr([999], [2])) == 1  # an unknown user falls back to the unknown index, no error


@pytest.mark.slow
def test_ctr_training_command_on_movielens(tmp_path, capsys):
    """`python -m rewards.train ctr` on the prepared MovieLens-100K (about a minute on 2 busy cores)."""
    from rewards.train import main
    from rl.assets import AssetError, require

    try:
        require("data")
    except AssetError as err:
        pytest.skip(str(err))
    assert main(["ctr", "--out", str(tmp_path / "ctr")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["auc"] > 0.8, metrics  # measured 0.866 (popularity baseline 0.865)
    assert (tmp_path / "ctr" / "model.pt").is_file() and (tmp_path / "ctr" / "vocab.json").is_file()
