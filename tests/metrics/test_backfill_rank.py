from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_lab.metrics.backfill import backfill_curves, num_refreshed, order_random
from reid_lab.metrics.backfill_rank import BackfillRanker, refresh_steps
from reid_lab.metrics.distance import compute_distance
from reid_lab.metrics.rank import RankResult, evaluate_rank_reference
from reid_lab.metrics.ranking_engine import QueryStats

RATIOS = tuple(k / 10 for k in range(11))


def _labels(rng, num_query, num_gallery):
    """Pids 1..5 (pid 0 and 9 are distractors only in the gallery), 3 cameras: junk, and some queries without
    positives (pid 7 has no gallery item; pid 5 queries may find only same-camera items)."""
    q_pids = rng.choice([1, 2, 3, 4, 5, 7], size=num_query)
    q_pids[0] = 1
    g_pids = rng.choice([0, 1, 2, 3, 4, 5, 9], size=num_gallery)
    g_pids[:2] = 1
    q_camids = rng.integers(0, 3, size=num_query)
    g_camids = rng.integers(0, 3, size=num_gallery)
    g_camids[g_pids == 5] = 0
    q_camids[0], g_camids[:2] = 0, (1, 0)  # query 0 keeps one positive and one junk item
    return q_pids, g_pids, q_camids, g_camids


def _orders(num_gallery, rng):
    return torch.stack([order_random(num_gallery, seed=int(rng.integers(1000))) for _ in range(3)])


def _reference(d_old, d_new, steps, k, labels):
    """The mixed matrix of step k built column by column, evaluated by the argsort reference."""
    mixed = np.where((steps <= k).numpy()[None, :], d_new, d_old)
    return evaluate_rank_reference(mixed, *labels)


def _assert_stats_equal(stats: QueryStats, expected: RankResult) -> None:
    assert np.array_equal(stats.num_positives > 0, expected.valid)
    assert stats.first_match_rank.tolist() == expected.first_match_rank.tolist()
    np.testing.assert_allclose(stats.ap, expected.all_AP, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.inp, expected.all_INP, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float16])
def test_every_step_of_every_ordering_matches_the_mixed_matrix_with_ties(seed, dtype):
    rng = np.random.default_rng(seed)
    num_query, num_gallery = 12, 37
    labels = _labels(rng, num_query, num_gallery)
    # few distinct integer distances: ties everywhere, within a version and across the two versions
    d_old = rng.integers(0, 6, size=(num_query, num_gallery))
    d_new = rng.integers(0, 6, size=(num_query, num_gallery))
    counts = [num_refreshed(r, num_gallery) for r in RATIOS]
    steps = torch.stack([refresh_steps(order, counts) for order in _orders(num_gallery, rng)])
    ranker = BackfillRanker(torch.from_numpy(labels[1]), torch.from_numpy(labels[3]), steps, len(counts))
    stats = ranker(
        torch.from_numpy(d_old).to(dtype),
        torch.from_numpy(d_new).to(dtype),
        torch.from_numpy(labels[0]),
        torch.from_numpy(labels[2]),
    )
    assert len(stats) == 3 and all(len(per_step) == len(counts) for per_step in stats)
    for o, per_step in enumerate(stats):
        for k, step_stats in enumerate(per_step):
            _assert_stats_equal(step_stats, _reference(d_old, d_new, steps[o], k, labels))


def test_without_camids_every_step_matches_the_mixed_matrix():
    # Cross-modal protocol: no junk, so the same-camera same-pid items of _labels count as positives.
    rng = np.random.default_rng(5)
    num_query, num_gallery = 12, 37
    q_pids, g_pids, _, _ = _labels(rng, num_query, num_gallery)
    d_old = rng.integers(0, 6, size=(num_query, num_gallery))
    d_new = rng.integers(0, 6, size=(num_query, num_gallery))
    counts = [num_refreshed(r, num_gallery) for r in RATIOS]
    steps = torch.stack([refresh_steps(order, counts) for order in _orders(num_gallery, rng)])
    ranker = BackfillRanker(torch.from_numpy(g_pids), None, steps, len(counts))
    stats = ranker(torch.from_numpy(d_old), torch.from_numpy(d_new), torch.from_numpy(q_pids))
    for o, per_step in enumerate(stats):
        for k, step_stats in enumerate(per_step):
            _assert_stats_equal(step_stats, _reference(d_old, d_new, steps[o], k, (q_pids, g_pids, None, None)))


def test_float_distances_with_ties_across_versions_and_few_cells():
    rng = np.random.default_rng(5)
    num_query, num_gallery = 9, 64
    labels = _labels(rng, num_query, num_gallery)
    d_old = rng.random((num_query, num_gallery))
    d_new = rng.random((num_query, num_gallery))
    # a third of the items keep their distance when refreshed; a few distances repeat within a row
    same = rng.random(num_gallery) < 0.3
    d_new[:, same] = d_old[:, same]
    d_old[:, 10:14] = d_old[:, [3]]
    counts = [num_refreshed(r, num_gallery) for r in (0.0, 0.3, 0.55, 1.0)]
    steps = torch.stack([refresh_steps(order, counts) for order in _orders(num_gallery, rng)])
    for num_cells in (1, 3, None):  # one cell: every candidate is compared exactly; results never change
        ranker = BackfillRanker(
            torch.from_numpy(labels[1]), torch.from_numpy(labels[3]), steps, len(counts), num_cells=num_cells
        )
        stats = ranker(torch.from_numpy(d_old), torch.from_numpy(d_new), torch.from_numpy(labels[0]),
                       torch.from_numpy(labels[2]))
        for o, per_step in enumerate(stats):
            for k, step_stats in enumerate(per_step):
                _assert_stats_equal(step_stats, _reference(d_old, d_new, steps[o], k, labels))


def test_infinite_positive_distance_takes_the_exact_path_and_nan_is_refused():
    rng = np.random.default_rng(3)
    labels = _labels(rng, 6, 20)
    d_old = rng.integers(0, 4, size=(6, 20)).astype(np.float64)
    d_new = rng.integers(0, 4, size=(6, 20)).astype(np.float64)
    d_old[0, 0] = np.inf  # query 0's positive (gallery item 0) is infinitely far in the old version
    d_new[:, 5] = np.inf
    counts = [0, 10, 20]
    steps = refresh_steps(order_random(20, seed=2), counts)[None]
    ranker = BackfillRanker(torch.from_numpy(labels[1]), torch.from_numpy(labels[3]), steps, 3)
    qp, qc = torch.from_numpy(labels[0]), torch.from_numpy(labels[2])
    stats = ranker(torch.from_numpy(d_old), torch.from_numpy(d_new), qp, qc)
    for k in range(3):
        _assert_stats_equal(stats[0][k], _reference(d_old, d_new, steps[0], k, labels))
    d_new[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ranker(torch.from_numpy(d_old), torch.from_numpy(d_new), qp, qc)


def test_refresh_steps_by_hand():
    # order refreshes item 3, then 0, then 2, then 1; counts per step 0, 1, 1, 3, 4
    steps = refresh_steps(torch.tensor([3, 0, 2, 1]), [0, 1, 1, 3, 4])
    assert steps.tolist() == [3, 4, 3, 1]
    assert refresh_steps(torch.tensor([1, 0]), [0, 1]).tolist() == [2, 1]  # item 0 is never refreshed


def _naive_curve_values(q_new, g_old, g_new, order, labels, metric):
    """Rebuild each mixed gallery from the features, recompute every distance, evaluate by argsort."""
    out = []
    for beta in RATIOS:
        count = math.floor(round(beta * len(g_new), 9))
        gallery = g_old.clone()
        gallery[order[:count]] = g_new[order[:count]]
        dist = compute_distance(q_new, gallery, metric=metric).numpy()
        out.append(evaluate_rank_reference(dist, *labels))
    return out


# Squared euclidean distances of integer features are exact integers whatever the query blocking; cosine ones
# may differ in the last bit between BLAS block shapes, so that case keeps the naive rebuild's single block.
@pytest.mark.parametrize(("metric", "chunk_size"), [("euclidean", 4), ("cosine", 4096)])
def test_backfill_curves_equal_a_naive_rebuild_with_integer_features(metric, chunk_size):
    rng = np.random.default_rng(11)
    num_query, num_gallery = 15, 43
    labels = _labels(rng, num_query, num_gallery)
    # small integer features from a tiny set: exact duplicates, so distances tie within and across versions
    q_new = torch.from_numpy(rng.integers(-1, 2, size=(num_query, 3)).astype(np.float32))
    g_old = torch.from_numpy(rng.integers(-1, 2, size=(num_gallery, 3)).astype(np.float32))
    g_new = torch.from_numpy(rng.integers(-1, 2, size=(num_gallery, 3)).astype(np.float32))
    q_new[q_new.abs().sum(1) == 0, 0] = 1.0  # cosine needs non-zero vectors
    g_old[g_old.abs().sum(1) == 0, 1] = 1.0
    g_new[g_new.abs().sum(1) == 0, 2] = 1.0
    orders = {"a": order_random(num_gallery, seed=0), "b": torch.arange(num_gallery).flip(0)}
    old_system = (q_new + 1.0, g_old)
    curves = backfill_curves(
        q_new, g_old, g_new, *labels, orders=orders, metric=metric, chunk_size=chunk_size, old_system=old_system
    )
    old = evaluate_rank_reference(compute_distance(*old_system, metric=metric).numpy(), *labels)
    for name, order in orders.items():
        expected = _naive_curve_values(q_new, g_old, g_new, order, labels, metric)
        for i, result in enumerate(expected):
            for key, value in result.summary().items():
                assert curves[name].values[key][i] == pytest.approx(value, abs=1e-9), (name, i, key)
            ap_drop = np.flatnonzero(result.all_AP < old.all_AP - 1e-12)
            assert curves[name].ap_negative_flip_queries[i].tolist() == ap_drop.tolist()
