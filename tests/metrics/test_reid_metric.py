"""ReIDMetric: batching invariance, torchmetrics' retrieval metrics as an independent peer, state contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from reid_lab.metrics.distance import compute_distance, evaluate_features
from reid_lab.metrics.rank import RankResult
from reid_lab.metrics.reid_metric import ReIDMetric


def make_split(seed, num_query=12, num_gallery=40, dim=8):
    generator = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, 6, (num_query + num_gallery,), generator=generator)
    camids = torch.randint(0, 3, (num_query + num_gallery,), generator=generator)
    centers = torch.randn(6, dim, generator=generator)
    features = centers[pids] + 0.8 * torch.randn(num_query + num_gallery, dim, generator=generator)
    is_query = torch.zeros(num_query + num_gallery, dtype=torch.bool)
    is_query[torch.randperm(num_query + num_gallery, generator=generator)[:num_query]] = True
    return features, pids, camids, is_query


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_batched_updates_equal_evaluate_features_on_the_concatenation(metric):
    features, pids, camids, is_query = make_split(0)
    m = ReIDMetric(metric=metric, max_rank=10)
    for start in range(0, len(features), 7):  # batches mix query and gallery items
        stop = start + 7
        m.update(features[start:stop], pids[start:stop], camids[start:stop], is_query[start:stop])
    out = m.compute()
    expected = evaluate_features(
        features[is_query], features[~is_query], pids[is_query], pids[~is_query],
        camids[is_query], camids[~is_query], metric=metric, max_rank=10,
    )
    assert set(out) == {"R1", "R5", "R10", "mAP", "mINP"}
    for key, value in expected.summary().items():
        assert out[key].dtype == torch.float32
        assert float(out[key]) == pytest.approx(value, abs=1e-4)
    assert isinstance(m.last_result, RankResult)
    np.testing.assert_array_equal(m.last_result.first_match_rank, expected.first_match_rank)
    np.testing.assert_allclose(m.last_result.all_AP, expected.all_AP, rtol=0, atol=1e-12, equal_nan=True)


def test_matches_torchmetrics_retrieval_peer():
    features, pids, camids, is_query = make_split(1, num_query=10, num_gallery=30)
    m = ReIDMetric()
    m.update(features[is_query], pids[is_query], camids[is_query], True)
    m.update(features[~is_query], pids[~is_query], camids[~is_query], False)
    out = m.compute()

    # Peer input: one (query, gallery) pair per row, junk pairs removed first. torchmetrics treats scores <= 0 as
    # not retrieved, so the score is a strictly positive, order-preserving transform of the distance.
    distmat = compute_distance(features[is_query], features[~is_query]).double()
    q_pids, g_pids = pids[is_query], pids[~is_query]
    q_cams, g_cams = camids[is_query], camids[~is_query]
    same_pid = q_pids[:, None] == g_pids[None, :]
    keep = ~(same_pid & (q_cams[:, None] == g_cams[None, :]))
    score = distmat.max() + 1.0 - distmat
    rows = torch.arange(len(q_pids))[:, None].expand_as(distmat)
    preds, target, indexes = score[keep], same_pid[keep], rows[keep]
    peer_map = RetrievalMAP(empty_target_action="skip")(preds, target, indexes=indexes)
    peer_r1 = RetrievalHitRate(top_k=1, empty_target_action="skip")(preds, target, indexes=indexes)
    assert 0 < float(peer_map) < 1  # a non-trivial case
    assert float(out["mAP"]) == pytest.approx(100 * float(peer_map), abs=1e-4)
    assert float(out["R1"]) == pytest.approx(100 * float(peer_r1), abs=1e-4)


def test_state_contract_and_reset():
    m = ReIDMetric()
    assert m.full_state_update is False and m.higher_is_better is True
    for name in ("features", "pids", "camids", "is_query"):
        assert m._defaults[name] == []
        assert m._reductions[name].__name__ == "dim_zero_cat"
    features, pids, camids, is_query = make_split(2)
    m.update(features, pids, camids, is_query)
    first = {k: float(v) for k, v in m.compute().items()}
    m.reset()
    assert m.features == [] and m.last_result is not None
    m.update(features, pids, camids, is_query)
    assert {k: float(v) for k, v in m.compute().items()} == first


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_update_and_compute_errors():
    m = ReIDMetric()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match=r"features must be a 2-d tensor"):
        m.update(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), True)
    with pytest.raises(ValueError, match=r"pids must have shape \(2,\)"):
        m.update(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), True)
    with pytest.raises(TypeError, match="camids must hold integers"):
        m.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2), True)
    with pytest.raises(ValueError, match=r"is_query must be a bool tensor of shape \(2,\)"):
        m.update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.ones(2))
    m.update(torch.ones(2, 4), torch.tensor([1, 2]), torch.tensor([0, 0]), True)
    with pytest.raises(ValueError, match="feature dim|dim 3"):
        m.update(torch.ones(2, 3), torch.tensor([1, 2]), torch.tensor([0, 0]), False)
    with pytest.raises(ValueError, match="needs both query and gallery items"):
        m.compute()
    with pytest.raises(ValueError, match="metric must be"):
        ReIDMetric(metric="l1")
