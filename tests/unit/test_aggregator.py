"""Stage-2 aspect aggregator w(x): simplex weights, Bradley-Terry loss, proxy aspects by hand, a planted preference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rewards.aggregator import (
    ASPECTS,
    AspectAggregator,
    AspectWeights,
    FeatureLayout,
    HistoryItem,
    aggregate,
    aspect_scores_from_levels,
    bradley_terry_loss,
    co_rating_cosine_II,
    fit_aggregator,
    load_aggregator,
    pairwise_accuracy,
    popularity_percentiles,
    proxy_aspect_scores_N4,
    save_aggregator,
    user_features_BF,
)
from rewards.ecpm import ArtifactError
from rewards.items import UserInfo

LAYOUT = FeatureLayout(occupations=("other", "writer"), genres=("Action", "Comedy", "Drama"))


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_levels_and_aggregate_by_hand():
    assert aspect_scores_from_levels([[1, 3, 5, 2]], num_levels=5).tolist() == [[0.0, 0.5, 1.0, 0.25]]
    with pytest.raises(ValueError, match="must lie in 1..5"):
        aspect_scores_from_levels([[0, 1, 2, 3]], num_levels=5)
    w_B4 = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    s_B4 = torch.tensor([[1.0, 0.0, 0.5, 0.25]])
    assert aggregate(w_B4, s_B4).tolist() == pytest.approx([0.1 + 0.0 + 0.15 + 0.1])


def test_weights_lie_on_the_simplex_and_start_uniform():
    torch.manual_seed(0)
    model = AspectWeights(LAYOUT.num_features, hidden=8)
    x_BF = torch.randn(16, LAYOUT.num_features)
    assert torch.allclose(model(x_BF), torch.full((16, 4), 0.25))
    with torch.no_grad():
        model.mlp[-1].weight.normal_(std=3.0)
    w_B4 = model(x_BF)
    assert bool((w_B4 >= 0).all()) and torch.allclose(w_B4.sum(-1), torch.ones(16))
    assert w_B4.std(0).sum() > 0.1  # no longer uniform, still on the simplex


def test_bradley_terry_loss_and_accuracy_by_hand():
    w_P4 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    diff_P4 = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    # β = 1: −log σ(1) = log(1 + e^−1)
    assert float(bradley_terry_loss(w_P4, diff_P4, torch.tensor(0.0))) == pytest.approx(math.log1p(math.exp(-1)))
    # margins 1, −1, 0, 2 → (1 + 0 + ½ + 1) / 4
    w = torch.full((4, 4), 0.25)
    diffs = torch.tensor([[4.0, 0, 0, 0], [-4.0, 0, 0, 0], [1.0, -1.0, 0, 0], [8.0, 0, 0, 0]])
    assert pairwise_accuracy(w, diffs) == pytest.approx(0.625)


def test_proxy_aspects_by_hand():
    history = [HistoryItem(genres=("Action",), rating=5, year="1990"),
               HistoryItem(genres=("Comedy",), rating=1, year="2000")]
    genres = ("Action", "Comedy", "Drama")
    items_NG = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # Action, Comedy, Drama
    years_N = torch.tensor([1995.0, 2005.0, float("nan")])
    pct_N = torch.tensor([0.9, 0.5, 0.0])
    cf_NH = torch.tensor([[0.4, 0.1], [0.2, 0.9], [0.0, 0.0]])
    s_N4 = proxy_aspect_scores_N4(history, items_NG, years_N, pct_N, cf_NH, genres)
    # profile: taste t = (5−3)·Action + (1−3)·Comedy = (2, −2, 0), ‖t‖ = √8; cos(Action, t) = 2/√8 = 1/√2,
    # cos(Comedy, t) = −1/√2, cos(Drama, t) = 0 → (1 + cos)/2
    c = 1 / math.sqrt(2)
    assert s_N4[:, 0].tolist() == pytest.approx([(1 + c) / 2, (1 - c) / 2, 0.5])
    # future interest: mean co-rating cosine to the recent liked items = only history item 0
    assert s_N4[:, 1].tolist() == pytest.approx([0.4, 0.2, 0.0])
    assert s_N4[:, 2].tolist() == pytest.approx([0.1, 0.5, 1.0])  # novelty = 1 − popularity percentile
    # context: median history year 1995 → exp(−0/10), exp(−10/10), unknown year 0.5
    assert s_N4[:, 3].tolist() == pytest.approx([1.0, math.exp(-1), 0.5])


def test_popularity_percentiles_and_co_rating_by_hand():
    pct = popularity_percentiles({1: 10, 2: 5, 3: 5}, [1, 2, 3, 4])  # item 4 never rated
    assert pct == pytest.approx({1: 1.0, 2: 1 / 3, 3: 1 / 3, 4: 0.0})
    rated_UI = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # items 0&1 share one of 2 users of item 0
    sim_II = co_rating_cosine_II(rated_UI)
    assert sim_II[0, 1] == pytest.approx(1 / math.sqrt(2)) and sim_II[1, 2] == 0.0 and sim_II[0, 0] == 0.0


def test_user_features_layout():
    x_BF = user_features_BF(LAYOUT, [UserInfo(age=30, gender="F", occupation="writer"), None],
                            [[HistoryItem(genres=("Action", "Drama"), rating=5),
                              HistoryItem(genres=("Action",), rating=4), HistoryItem(genres=("Comedy",), rating=2)],
                             []])
    assert x_BF.shape == (2, 7 + 2 + 2 + 3 + 1)
    age, gender, job, profile, length = x_BF[0].split([7, 2, 2, 3, 1])
    assert age.tolist() == [0, 0, 1, 0, 0, 0, 0] and gender.tolist() == [1, 0] and job.tolist() == [0, 1]
    assert profile.tolist() == pytest.approx([1.0, 0.0, 0.5])  # liked items: Action in 2 of 2, Drama in 1 of 2
    assert float(length) == pytest.approx(math.log1p(3) / math.log1p(1000))
    assert x_BF[1].abs().sum() == 0  # unknown user without history


def planted_pairs(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Users 0..9 have feature e_0 and care about profile fit; users 10..19 have e_1 and care about novelty."""
    gen = torch.Generator().manual_seed(seed)
    features_UF = torch.zeros(20, 2)
    features_UF[:10, 0], features_UF[10:, 1] = 1.0, 1.0
    true_U4 = torch.zeros(20, 4)
    true_U4[:10, 0], true_U4[10:, 2] = 1.0, 1.0
    user_P = torch.randint(0, 20, (num,), generator=gen)
    s_a, s_b = torch.rand(num, 4, generator=gen), torch.rand(num, 4, generator=gen)
    prefer_a = (true_U4[user_P] * (s_a - s_b)).sum(-1) > 0
    diff_P4 = torch.where(prefer_a[:, None], s_a - s_b, s_b - s_a)  # always preferred minus other
    return features_UF, user_P, diff_P4


def test_training_learns_a_planted_preference(tmp_path, one_thread):
    features_UF, user_P, diff_P4 = planted_pairs(4000, seed=0)
    torch.manual_seed(0)
    model = AspectWeights(2, hidden=8)
    losses = fit_aggregator(model, features_UF, user_P, diff_P4, epochs=40, batch_size=500, lr=5e-2)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        w_U4 = model(features_UF)
    assert w_U4[0].argmax() == ASPECTS.index("profile_fit") and w_U4[0, 0] > 0.8
    assert w_U4[15].argmax() == ASPECTS.index("novelty") and w_U4[15, 2] > 0.8
    _, test_user_P, test_diff_P4 = planted_pairs(2000, seed=1)
    assert pairwise_accuracy(w_U4[test_user_P], test_diff_P4) > 0.9
    assert pairwise_accuracy(torch.full_like(test_diff_P4, 0.25), test_diff_P4) < 0.8  # one w for all is worse


def test_artifact_round_trip_and_uniform(tmp_path):
    torch.manual_seed(0)
    model = AspectWeights(LAYOUT.num_features, hidden=4)
    with torch.no_grad():
        model.mlp[-1].weight.normal_()
    users = {1: UserInfo(age=30, gender="F", occupation="writer")}
    agg = load_aggregator(save_aggregator(tmp_path / "agg", model, LAYOUT, users, hidden=4, metrics={"acc": 0.6}))
    history = [[HistoryItem(genres=("Drama",), rating=5)]]
    expected = model(user_features_BF(LAYOUT, [users[1]], history))
    assert torch.allclose(agg.weights_B4([1], history), expected) and agg.metrics == {"acc": 0.6}
    s_B4 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert agg.score([1], history, s_B4) == pytest.approx(expected[:, 0].tolist())
    assert AspectAggregator.uniform().score([5], [[]], torch.tensor([[1.0, 0.0, 0.5, 0.5]])) == [0.5]
    with pytest.raises(ArtifactError, match="python -m rewards.train aggregator"):
        load_aggregator(tmp_path / "missing")


@pytest.mark.slow
def test_aggregator_training_command_on_movielens(tmp_path, capsys):
    """`python -m rewards.train aggregator` on the prepared MovieLens-100K (about a minute on 2 busy cores)."""
    from rewards.train import main
    from rl.assets import AssetError, require

    try:
        require("data")
    except AssetError as err:
        pytest.skip(str(err))
    assert main(["aggregator", "--out", str(tmp_path / "aggregator")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pairwise_accuracy"] > 0.6, metrics  # measured 0.631 (uniform weights 0.459)
    assert (tmp_path / "aggregator" / "model.pt").is_file()
