from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_lab.metrics.backfill import (
    DEFAULT_BACKFILL_RATIOS,
    BackfillCurve,
    backfill_curve,
    backfill_curves,
    num_refreshed,
    old_model_uncertainty,
    order_by_sigma,
    order_by_uncertainty,
    order_oracle,
    order_random,
)
from reid_lab.metrics.compatibility import VersionFeatures, compatibility_matrix
from reid_lab.metrics.rank import evaluate_rank_reference

NUM_IDS, DIM = 8, 8


@pytest.fixture(scope="module")
def data():
    """8 ids; 2 queries per id (cameras 0, 1); 5 gallery images per id (cameras 0, 1, 2, 2, 3)."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((NUM_IDS, DIM))
    q_pids = np.repeat(np.arange(NUM_IDS), 2)
    q_camids = np.tile([0, 1], NUM_IDS)
    g_pids = np.repeat(np.arange(NUM_IDS), 5)
    g_camids = np.tile([0, 1, 2, 2, 3], NUM_IDS)

    def embed(pids, noise):
        return (centres[pids] + noise * rng.standard_normal((len(pids), DIM))).astype(np.float32)

    features = {
        "q_old": embed(q_pids, 1.0),
        "g_old": embed(g_pids, 1.0),
        "q_new": embed(q_pids, 0.4),
        "g_new": embed(g_pids, 0.4),
    }
    labels = (q_pids, g_pids, q_camids, g_camids)
    return features, labels


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


def _cosine_distance(query, gallery):
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return 1.0 - query.astype(np.float64) @ gallery.astype(np.float64).T


def _naive_mixed(q_new, stored, g_new, order, beta, labels):
    """Rebuild the mixed gallery from scratch: copy the features, recompute every distance, evaluate."""
    count = math.floor(round(beta * len(g_new), 9))
    gallery = stored.copy()
    gallery[np.asarray(order)[:count]] = g_new[np.asarray(order)[:count]]
    return evaluate_rank_reference(_cosine_distance(q_new, gallery), *labels)


def _orders(num_gallery, features):
    scores = np.linalg.norm(features["g_old"], axis=1)
    return {
        "random": order_random(num_gallery, seed=3),
        "uncertainty": order_by_uncertainty(scores),
        "oracle": order_oracle(_t(features["g_old"]), _t(features["g_new"])),
    }


RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def test_curve_matches_naive_rebuild_for_every_ordering(data):
    features, labels = data
    f = {k: _t(v) for k, v in features.items()}
    orders = _orders(len(labels[1]), features)
    curves = backfill_curves(
        f["q_new"],
        f["g_old"],
        f["g_new"],
        *labels,
        orders=orders,
        ratios=RATIOS,
        old_system=(f["q_old"], f["g_old"]),
    )
    old = evaluate_rank_reference(_cosine_distance(features["q_old"], features["g_old"]), *labels)
    old_top1 = old.first_match_rank == 0
    for name, curve in curves.items():
        assert curve.ordering == name
        assert curve.num_refreshed == (0, 10, 20, 30, 40)
        assert curve.old_self_test == pytest.approx(old.summary())
        for i, beta in enumerate(RATIOS):
            expected = _naive_mixed(
                features["q_new"], features["g_old"], features["g_new"], orders[name], beta, labels
            )
            for key, value in expected.summary().items():
                assert curve.values[key][i] == pytest.approx(value, abs=1e-6), (name, beta, key)
            new_top1 = expected.first_match_rank == 0
            flipped = np.flatnonzero(old_top1 & ~new_top1 & old.valid)
            assert curve.negative_flip_queries[i].tolist() == flipped.tolist()
            assert curve.values["NFR"][i] == pytest.approx(100 * len(flipped) / old.valid.sum())
            assert curve.values["PFR"][i] == pytest.approx(
                100 * np.sum(~old_top1 & new_top1 & old.valid) / old.valid.sum()
            )
            ap_drop = np.flatnonzero(expected.all_AP < old.all_AP)
            assert curve.ap_negative_flip_queries[i].tolist() == ap_drop.tolist()


def test_endpoints_are_cross_test_and_new_self_test(data):
    features, labels = data
    f = {k: _t(v) for k, v in features.items()}
    curve = backfill_curve(f["q_new"], f["g_old"], f["g_new"], *labels, order=order_random(40, seed=0))
    assert curve.ratios == DEFAULT_BACKFILL_RATIOS
    versions = [
        VersionFeatures("old", f["q_old"], f["g_old"]),
        VersionFeatures("new", f["q_new"], f["g_new"]),
    ]
    matrix = compatibility_matrix(versions, *labels)
    for key in ("R1", "mAP", "mINP"):
        assert curve.values[key][0] == pytest.approx(matrix.cell("new", "old", key))
        assert curve.values[key][-1] == pytest.approx(matrix.cell("new", "new", key))
    assert "NFR" not in curve.values and curve.negative_flip_queries == ()


def test_several_orderings_equal_separate_calls_and_inputs_untouched(data):
    features, labels = data
    f = {k: _t(v) for k, v in features.items()}
    before = f["g_old"].clone()
    orders = _orders(40, features)
    together = backfill_curves(f["q_new"], f["g_old"], f["g_new"], *labels, orders=orders, ratios=RATIOS)
    for name, order in orders.items():
        alone = backfill_curve(
            f["q_new"], f["g_old"], f["g_new"], *labels, order=order, ratios=RATIOS, ordering=name
        )
        assert alone.values == together[name].values
    assert torch.equal(f["g_old"], before)


def test_chunked_distances_give_the_same_curve(data):
    features, labels = data
    f = {k: _t(v) for k, v in features.items()}
    order = order_random(40, seed=5)
    full = backfill_curve(f["q_new"], f["g_old"], f["g_new"], *labels, order=order, ratios=RATIOS)
    chunked = backfill_curve(
        f["q_new"], f["g_old"], f["g_new"], *labels, order=order, ratios=RATIOS, chunk_size=3
    )
    assert chunked.values.keys() == full.values.keys()
    for key, values in full.values.items():
        assert chunked.values[key] == pytest.approx(values, abs=1e-9), key


def test_transformed_old_gallery_replaces_the_old_features(data):
    features, labels = data
    rng = np.random.default_rng(7)
    transformed = (features["g_new"] + 0.5 * rng.standard_normal(features["g_new"].shape)).astype(np.float32)
    tiny_old = _t(features["g_old"][:, :3])  # FCT: old space may have another dimension
    order = order_random(40, seed=1)
    curve = backfill_curve(
        _t(features["q_new"]),
        tiny_old,
        _t(features["g_new"]),
        *labels,
        order=order,
        ratios=RATIOS,
        transformed_old_gallery=_t(transformed),
    )
    for i, beta in enumerate(RATIOS):
        expected = _naive_mixed(features["q_new"], transformed, features["g_new"], order, beta, labels)
        assert curve.values["mAP"][i] == pytest.approx(expected.summary()["mAP"], abs=1e-6)
    with pytest.raises(ValueError, match="g_old has dim 3"):
        backfill_curve(_t(features["q_new"]), tiny_old, _t(features["g_new"]), *labels, order=order)


def test_auc_is_the_grid_mean_by_hand():
    curve = BackfillCurve(ratios=(0.0, 0.5, 1.0), num_refreshed=(0, 1, 2), values={"mAP": [10.0, 40.0, 70.0]})
    assert curve.auc("mAP") == pytest.approx(40.0)
    # A concave curve tells the mean from the trapezoid: (10 + 60 + 70) / 3 = 46.67, while the trapezoid
    # 0.5 * (10 + 60) / 2 + 0.5 * (60 + 70) / 2 = 50 gives the endpoints half weight.
    concave = BackfillCurve(
        ratios=(0.0, 0.5, 1.0), num_refreshed=(0, 1, 2), values={"mAP": [10.0, 60.0, 70.0]}
    )
    assert concave.auc() == pytest.approx(140 / 3)
    # FastFill's 11-point grid: the mean of the 11 values, e.g. M(β) = 100 β^2 -> 100 * (0.01 * 385) / 11 = 35
    eleven = BackfillCurve(
        ratios=DEFAULT_BACKFILL_RATIOS, num_refreshed=tuple(range(11)),
        values={"R1": [100 * b * b for b in DEFAULT_BACKFILL_RATIOS]},
    )
    assert eleven.auc("R1") == pytest.approx(35.0)
    assert not hasattr(BackfillCurve, "auc_trapezoid")  # one AUC definition
    for ratios in ((0.0, 0.2, 1.0), (0.0, 0.5), (0.5, 1.0), (0.0,)):
        uneven = BackfillCurve(ratios=ratios, num_refreshed=(0,) * len(ratios), values={"mAP": [1.0] * len(ratios)})
        with pytest.raises(ValueError, match="equally spaced"):
            uneven.auc()
    again = BackfillCurve.from_dict(curve.to_dict())
    assert again.values == curve.values and again.ratios == curve.ratios


def test_random_order_is_reproducible_by_seed():
    first, second = order_random(50, seed=11), order_random(50, seed=11)
    assert torch.equal(first, second)
    assert not torch.equal(first, order_random(50, seed=12))
    assert sorted(first.tolist()) == list(range(50))


def test_uncertainty_sigma_and_oracle_orders_by_hand():
    assert order_by_uncertainty([0.1, 0.9, 0.5, 0.9]).tolist() == [1, 3, 2, 0]
    assert order_by_sigma(torch.tensor([-1.0, 2.0, 0.5])).tolist() == [1, 2, 0]
    assert order_by_sigma(torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 0.0]])).tolist() == [1, 2, 0]
    # ties keep gallery order (the cases of the former upgrade.adapters.backfill_order_by_uncertainty)
    order = order_by_sigma(torch.tensor([0.5, 2.0, -1.0, 2.0, 0.5, 3.0]))
    assert order.dtype == torch.long and order.tolist() == [5, 1, 3, 0, 4, 2]
    assert order_by_sigma(torch.tensor([0.1, 2.0, 0.1, 3.0])).tolist() == [3, 1, 0, 2]
    g_old = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    g_new = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])  # distances after normalising: 0, 2, sqrt(2)
    assert order_oracle(g_old, g_new).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="NaN"):
        order_by_uncertainty([0.1, float("nan")])


def test_old_model_uncertainty_is_softmax_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    p = np.exp([1.0, 2.0, 3.0, 4.0]) / np.exp([1.0, 2.0, 3.0, 4.0]).sum()
    expected = [math.log(4), 0.0, float(-(p * np.log(p)).sum())]
    assert old_model_uncertainty(logits).tolist() == pytest.approx(expected, abs=1e-9)
    assert order_by_uncertainty(old_model_uncertainty(logits)).tolist() == [0, 2, 1]


def test_num_refreshed_floor_is_robust_to_float_error():
    assert num_refreshed(0.29, 100) == 29
    assert num_refreshed(0.3, 10) == 3
    assert num_refreshed(0.25, 10) == 2
    assert num_refreshed(1.0, 7) == 7


def test_bad_input_is_named(data):
    features, labels = data
    f = {k: _t(v) for k, v in features.items()}
    args = (f["q_new"], f["g_old"], f["g_new"], *labels)
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve(*args, order=torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(40,\\)"):
        backfill_curve(*args, order=torch.arange(39))
    with pytest.raises(ValueError, match="strictly increasing"):
        backfill_curve(*args, order=torch.arange(40), ratios=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        backfill_curve(*args, order=torch.arange(40), ratios=(0.0, 1.5))
    with pytest.raises(ValueError, match="g_old is required"):
        backfill_curve(f["q_new"], None, f["g_new"], *labels, order=torch.arange(40))
