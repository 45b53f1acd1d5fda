"""ReIDMetric / RetrievalMetric: batching invariance, torchmetrics' retrieval metrics as an independent peer, the
cross-modal protocol against a naive loop, state contract and the DDP state sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from reid_lab.metrics.distance import compute_distance, evaluate_features
from reid_lab.metrics.rank import RankResult
from reid_lab.metrics.reid_metric import ReIDMetric, RetrievalMetric


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


# ------------------------------------------------------------------------------------------ cross-modal protocol


def naive_cross_modal(queries, gallery, q_pids, g_pids):
    """Per query: rank the gallery by (1 - cos, gallery index), nothing dropped; skip queries without a positive;
    R@k = first positive within the top k, AP over all positives, INP = |G| / rank of the last positive."""
    r1, r5, aps, inps = [], [], [], []
    for q, pid in zip(queries.double().tolist(), q_pids.tolist()):
        dist = []
        for j, g in enumerate(gallery.double().tolist()):
            cos = sum(a * b for a, b in zip(q, g)) / (sum(a * a for a in q) ** 0.5 * sum(b * b for b in g) ** 0.5)
            dist.append((1.0 - cos, j))
        relevant = [int(g_pids[j]) == pid for _, j in sorted(dist)]
        if not any(relevant):
            continue
        ranks = [k for k, rel in enumerate(relevant, start=1) if rel]
        r1.append(ranks[0] <= 1)
        r5.append(ranks[0] <= 5)
        aps.append(sum(i / k for i, k in enumerate(ranks, start=1)) / len(ranks))
        inps.append(len(ranks) / ranks[-1])
    mean = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    return {"R1": mean(r1), "R5": mean(r5), "mAP": mean(aps), "mINP": mean(inps), "num_valid": len(aps)}


def text_image_split(seed, num_text=14, num_images=30, dim=8):
    """Caption embeddings (queries) and image embeddings (gallery) of one space, from two 'encoders' (different
    offsets and noise per modality); pid 9 has captions but no image (a skipped query)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, dim, generator=generator)
    t_pids = torch.randint(0, 6, (num_text,), generator=generator)
    t_pids[0] = 9
    i_pids = torch.randint(0, 6, (num_images,), generator=generator)
    text = centers[t_pids] + 0.3 + 0.9 * torch.randn(num_text, dim, generator=generator)
    images = centers[i_pids] + 0.7 * torch.randn(num_images, dim, generator=generator)
    return text, t_pids, images, i_pids


def test_cross_modal_matches_a_naive_loop_and_drops_nothing():
    text, t_pids, images, i_pids = text_image_split(0)
    m = RetrievalMetric(protocol="cross_modal", max_rank=10)
    # batches of either modality, in any order; keyword and positional forms
    m.update(images[:11], i_pids[:11], False)
    m.update(text[:6], t_pids[:6], is_query=True)
    m.update(features=images[11:], pids=i_pids[11:], is_query=torch.zeros(19, dtype=torch.bool))
    m.update(text[6:], t_pids[6:], torch.ones(8, dtype=torch.bool))
    out = m.compute()
    expected = naive_cross_modal(text, images, t_pids, i_pids)
    assert set(out) == {"R1", "R5", "R10", "mAP", "mINP"}
    for key in ("R1", "R5", "mAP", "mINP"):
        assert float(out[key]) == pytest.approx(expected[key], abs=1e-4)
    assert m.last_result.num_valid == expected["num_valid"] == len(t_pids) - 1
    assert 0 < expected["mAP"] < 100  # a non-trivial case


def test_cross_modal_keeps_same_camera_matches_that_reid_drops():
    # One query, gallery [same pid same camera, other pid, same pid other camera]: the ReID protocol drops the
    # first item (junk), the cross-modal protocol counts it as the rank-1 match.
    query, gallery = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.05], [0.8, 0.6], [0.5, 0.9]])
    reid, cross = ReIDMetric(), RetrievalMetric(protocol="cross_modal")
    reid.update(query, torch.tensor([1]), torch.tensor([0]), True)
    reid.update(gallery, torch.tensor([1, 2, 1]), torch.tensor([0, 1, 1]), False)
    cross.update(query, torch.tensor([1]), True)
    cross.update(gallery, torch.tensor([1, 2, 1]), False)
    assert float(reid.compute()["mAP"]) == pytest.approx(50.0)  # positive at kept-rank 2
    assert float(cross.compute()["mAP"]) == pytest.approx(100 * (1 + 2 / 3) / 2)  # positives at ranks 1, 3


def test_protocol_decides_the_update_arguments_and_states():
    reid, cross = ReIDMetric(), RetrievalMetric(protocol="cross_modal")
    assert isinstance(reid, RetrievalMetric) and reid.protocol == "reid"
    assert "camids" in reid._reductions and "camids" not in cross._reductions
    features, pids = torch.ones(2, 4), torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"protocol='cross_modal'.*too many positional"):
        cross.update(features, pids, torch.tensor([0, 0]), True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'camids'"):
        cross.update(features, pids, camids=torch.tensor([0, 0]), is_query=True)
    with pytest.raises(TypeError, match=r"protocol='reid'.*missing a required argument: 'is_query'"):
        reid.update(features, pids, True)
    with pytest.raises(ValueError, match="protocol must be one of"):
        RetrievalMetric(protocol="text")


@pytest.mark.parametrize("protocol", ["reid", "cross_modal"])
def test_states_gathered_from_two_ranks_equal_one_process(protocol):
    # torchmetrics' DDP sync through its dist_sync_fn hook: rank 0 receives rank 1's states, in state order.
    features, pids, camids, is_query = make_split(4)
    extra = (camids,) if protocol == "reid" else ()
    whole = RetrievalMetric(protocol=protocol)
    whole.update(features, pids, *extra, is_query)
    calls = []

    def gather(tensor, group=None):
        calls.append(tensor)
        return [tensor, peer_states[len(calls) - 1]]

    ranks = [
        RetrievalMetric(protocol=protocol, dist_sync_fn=gather, distributed_available_fn=lambda: True),
        RetrievalMetric(protocol=protocol),
    ]
    for rank, metric in enumerate(ranks):
        part = slice(rank, None, 2)
        metric.update(features[part], pids[part], *[t[part] for t in extra], is_query[part])
    peer_states = [torch.cat(getattr(ranks[1], name)) for name in ranks[1]._reductions]
    synced = ranks[0].compute()
    assert len(calls) == len(peer_states) == (4 if protocol == "reid" else 3)
    expected = whole.compute()
    for key, value in expected.items():
        assert float(synced[key]) == pytest.approx(float(value), abs=1e-4)
