"""Uncertainty-based backfilling order (RACT, ICLR 2022) on cases whose flip risk is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_lab.metrics.backfill import (
    UNCERTAINTY_ESTIMATORS,
    backfill_curves,
    num_refreshed,
    old_model_uncertainty,
    order_by_uncertainty,
    order_random,
)

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _unit(*coords):
    v = np.asarray(coords, dtype=np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture()
def known_risk():
    """3 queries (pids A=0, B=1, C=2, camera 0), 4 gallery items (camera 1) in a 4-d space, cosine distance.

    ``g1`` (pid B) is the one flip-causing item: its *new* feature is closer to query A's new feature
    (cos 0.981) than A's stale positive ``g0_old`` is (cos 0.958), yet farther than ``g0_new`` (cos 0.995).
    Refreshing ``g1`` while ``g0`` is still old flips query A (old system correct, mixed gallery wrong);
    refreshing ``g0`` first makes ``g1`` harmless. No other refresh changes any query's top-1.
    The old classifier is flat on ``g1`` and ever more peaked on ``g2``, ``g0``, ``g3``.
    """
    e1, e2, e3, e4 = np.eye(4)
    q_old = np.stack([e1, e3, e4])
    q_new = q_old.copy()
    g_old = np.stack([_unit(1, 0.3, 0, 0), _unit(0, 0, 1, 0.5), _unit(0, 0, 1, 0.1), _unit(0, 0.1, 0, 1)])
    g_new = np.stack([_unit(1, 0.1, 0, 0), _unit(1, 0, 0.2, 0), _unit(0, 0, 1, 0.1), _unit(0, 0.1, 0, 1)])
    labels = (np.array([0, 1, 2]), np.array([0, 1, 1, 2]), np.zeros(3, dtype=np.int64), np.ones(4, dtype=np.int64))
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    return {"q_old": q_old, "q_new": q_new, "g_old": g_old, "g_new": g_new}, labels, logits


def _naive_top1_correct(query, gallery, q_pids, g_pids, q_camids, g_camids):
    """Per query, one at a time: drop same-pid-same-camera items, take the most similar, compare pids."""
    correct, valid = [], []
    for i in range(len(query)):
        best, best_sim, has_positive = None, -math.inf, False
        for j in range(len(gallery)):
            if q_pids[i] == g_pids[j] and q_camids[i] == g_camids[j]:
                continue  # junk under the Market-1501 protocol
            has_positive |= bool(q_pids[i] == g_pids[j])
            sim = float(np.dot(query[i], gallery[j]) / (np.linalg.norm(query[i]) * np.linalg.norm(gallery[j])))
            if sim > best_sim:
                best, best_sim = j, sim
        valid.append(has_positive)
        correct.append(has_positive and g_pids[best] == q_pids[i])
    return np.array(correct), np.array(valid)


def _naive_nfr(features, labels, order, beta):
    """Negative-flip rate (percent) at one β, the mixed gallery rebuilt and every query scored by a loop."""
    old_correct, old_valid = _naive_top1_correct(features["q_old"], features["g_old"], *labels)
    count = num_refreshed(beta, len(features["g_old"]))
    mixed = features["g_old"].copy()
    refreshed = np.asarray(order)[:count]
    mixed[refreshed] = features["g_new"][refreshed]
    new_correct, _ = _naive_top1_correct(features["q_new"], mixed, *labels)
    return 100.0 * float(np.sum(old_correct & ~new_correct & old_valid)) / float(old_valid.sum())


def _curves(features, labels, orders):
    t = {k: torch.from_numpy(v) for k, v in features.items()}
    return backfill_curves(
        t["q_new"], t["g_old"], t["g_new"], *labels, orders=orders, ratios=RATIOS, old_system=(t["q_old"], t["g_old"])
    )


@pytest.mark.parametrize("estimator", UNCERTAINTY_ESTIMATORS)
def test_paper_order_refreshes_the_most_uncertain_item_first(known_risk, estimator):
    """RACT: most uncertain old feature first. Here that is g1, the flip-causing item, then g2, g0, g3."""
    _, _, logits = known_risk
    order = order_by_uncertainty(old_model_uncertainty(logits, estimator))
    assert order.tolist() == [1, 2, 0, 3]


def test_refreshing_the_risky_item_before_its_victims_positive_flips_that_query(known_risk):
    features, labels, logits = known_risk
    paper = order_by_uncertainty(old_model_uncertainty(logits))
    curves = _curves(features, labels, {"uncertainty": paper, "least_uncertain_first": paper.flip(0)})
    # query A flips while g1 is new and g0 still old (β = 0.25, 0.5); one of three queries
    assert curves["uncertainty"].values["NFR"] == pytest.approx([0.0, 100 / 3, 100 / 3, 0.0, 0.0])
    assert [q.tolist() for q in curves["uncertainty"].negative_flip_queries] == [[], [0], [0], [], []]
    # g0 is refreshed before g1 in the reverse order, so nothing ever flips
    assert curves["least_uncertain_first"].values["NFR"] == pytest.approx([0.0] * 5)


def test_nfr_along_the_grid_equals_a_naive_per_query_loop(known_risk):
    features, labels, logits = known_risk
    orders = {
        "uncertainty": order_by_uncertainty(old_model_uncertainty(logits)),
        "margin": order_by_uncertainty(old_model_uncertainty(logits, "margin")),
        "random": order_random(4, seed=5),
    }
    for name, curve in _curves(features, labels, orders).items():
        expected = [_naive_nfr(features, labels, orders[name], beta) for beta in RATIOS]
        assert curve.values["NFR"] == pytest.approx(expected), name


def test_nfr_equals_naive_loop_with_identity_correlated_uncertainty():
    """A random gallery whose old-classifier uncertainty is shared within an identity (as on real ReID data)."""
    rng = np.random.default_rng(7)
    num_ids, dim = 6, 5
    centres = rng.standard_normal((num_ids, dim))
    q_pids, g_pids = np.repeat(np.arange(num_ids), 2), np.repeat(np.arange(num_ids), 4)
    q_camids, g_camids = np.tile([0, 1], num_ids), np.tile([0, 1, 2, 3], num_ids)

    def embed(pids, noise):
        return centres[pids] + noise * rng.standard_normal((len(pids), dim))

    features = {"q_old": embed(q_pids, 1.0), "g_old": embed(g_pids, 1.0), "q_new": embed(q_pids, 0.5),
                "g_new": embed(g_pids, 0.5)}
    labels = (q_pids, g_pids, q_camids, g_camids)
    peak = torch.from_numpy(rng.uniform(0, 4, num_ids)[g_pids] + 0.3 * rng.standard_normal(len(g_pids)))
    logits = torch.zeros(len(g_pids), 10)
    logits[:, 0] = peak
    orders = {"uncertainty": order_by_uncertainty(old_model_uncertainty(logits)), "random": order_random(24, seed=1)}
    for name, curve in _curves(features, labels, orders).items():
        expected = [_naive_nfr(features, labels, orders[name], beta) for beta in RATIOS]
        assert curve.values["NFR"] == pytest.approx(expected), name


def test_estimators_match_hand_computed_values():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.4, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    logits = torch.log(p.clamp_min(1e-300))
    entropy = old_model_uncertainty(logits, "entropy")
    assert entropy.tolist() == pytest.approx([math.log(2), 0.4 * math.log(2.5) + 0.6 * math.log(5), 0.0], abs=1e-9)
    assert old_model_uncertainty(logits, "least_confidence").tolist() == pytest.approx([0.5, 0.6, 0.0])
    assert old_model_uncertainty(logits, "margin").tolist() == pytest.approx([1.0, 0.8, 0.0])
    # the estimators disagree on the first two rows: a tie between two classes is the most uncertain
    # for the margin, a spread over four classes for entropy and least confidence
    assert order_by_uncertainty(old_model_uncertainty(logits, "margin")).tolist() == [0, 1, 2]
    assert order_by_uncertainty(entropy).tolist() == [1, 0, 2]


@pytest.mark.parametrize("estimator", UNCERTAINTY_ESTIMATORS)
def test_estimators_ignore_a_per_row_logit_shift_and_stay_finite_when_saturated(estimator):
    logits = torch.tensor([[3.0, 1.0, -2.0], [0.0, 0.5, 0.2], [2000.0, 0.0, 0.0]])
    shifted = logits + torch.tensor([[5.0], [-3.0], [100.0]])
    scores = old_model_uncertainty(logits, estimator)
    assert torch.isfinite(scores).all()
    assert scores[2].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(scores, old_model_uncertainty(shifted, estimator))


def test_default_estimator_is_entropy_and_bad_arguments_raise():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(old_model_uncertainty(logits), old_model_uncertainty(logits, "entropy"))
    with pytest.raises(ValueError, match="estimator must be one of"):
        old_model_uncertainty(logits, "variance")
    with pytest.raises(ValueError, match="at least 2 classes"):
        old_model_uncertainty(torch.zeros(3, 1), "margin")
