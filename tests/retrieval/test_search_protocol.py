"""Search metrics follow the data's protocol (issue 22): ReID junk removal when the feature files carry camids,
equality with ``evaluate_rank`` at k = gallery size, loud failure without a valid query, and ``--exact`` refusing
files that are not the index's source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import make_space
from reid_lab.metrics.rank import evaluate_rank
from reid_lab.retrieval.cli import main
from reid_lab.retrieval.index import GalleryIndex
from reid_lab.retrieval.search import search_features

SPACE = make_space("toy", 16, state_dict={"toy-16d": torch.zeros(1)}, label="toy-16d")


def same_camera_first(num_pids: int = 8, seed: int = 3, camids: bool = True) -> FeatureSet:
    """One query per identity (camera 0); its identity's two camera-0 gallery images sit right next to it (they
    rank first: the case the Market protocol removes as junk), two images from cameras 1 and 2 lie farther,
    among three hard negatives (other identities' images about as far). Query rows first."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_pids, 16))
    rows, pids, cams, is_query = [], [], [], []

    def add(x, pid, cam, query=False):
        rows.append(x)
        pids.append(pid)
        cams.append(cam)
        is_query.append(query)

    queries = centres + 0.3 * rng.standard_normal(centres.shape)
    for p in range(num_pids):
        add(queries[p], p, 0, True)
    for p in range(num_pids):
        for _ in range(2):
            add(queries[p] + 0.05 * rng.standard_normal(16), p, 0)  # same camera, near the query: junk
        for cam in (1, 2):
            add(centres[p] + 1.0 * rng.standard_normal(16), p, cam)  # other cameras, far: the real positives
        for _ in range(3):
            other = (p + 1 + rng.integers(0, num_pids - 1)) % num_pids
            # hard negatives: another identity's images about as far from the query as its own positives
            add(queries[p] + 1.0 * rng.standard_normal(16), int(other), int(rng.integers(0, 3)))
    n = len(rows)
    return FeatureSet(
        torch.tensor(np.stack(rows), dtype=torch.float32), torch.tensor(pids), torch.tensor(cams) if camids else None,
        torch.tensor(is_query), [f"img/{i:04d}.jpg" for i in range(n)], SPACE,
    )


def cosine_distances(features: FeatureSet) -> np.ndarray:
    """``(num_query, num_gallery)`` 1 - cosine in float64, checked free of near-ties (so both rankings agree)."""
    query, gallery = features.split()
    q = query.features.double().numpy()
    g = gallery.features.double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    dist = 1.0 - q @ g.T
    gaps = np.diff(np.sort(dist, axis=1), axis=1)
    assert gaps.min() > 1e-5, "test data has near-ties; change the seed"
    return dist


def run_search(tmp_path, features: FeatureSet, k: int, *extra: str) -> tuple[int, dict | None]:
    features.save(tmp_path / "feats.pt")
    assert main(["build", "--features", str(tmp_path / "feats.pt"), "--out", str(tmp_path / "idx")]) == 0
    code = main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "feats.pt"), "--k", str(k),
                 "--out", str(tmp_path / "res.json"), *extra])
    out = tmp_path / "res.json"
    return code, json.loads(out.read_text()) if out.exists() else None


def test_search_at_gallery_size_equals_evaluate_rank_under_the_reid_protocol(tmp_path, capsys):
    features = same_camera_first()
    query, gallery = features.split()
    dist = cosine_distances(features)
    expected = evaluate_rank(dist, query.pids, gallery.pids, query.camids, gallery.camids).summary()
    naive = evaluate_rank(dist, query.pids, gallery.pids).summary()  # nothing dropped: same-camera hits count
    assert naive["R1"] == 100.0 and expected["R1"] < 50.0, "the data must separate the two protocols"
    num_gallery = len(gallery.items)
    capsys.readouterr()
    code, result = run_search(tmp_path, features, num_gallery)
    assert code == 0
    metrics = result["metrics"]
    assert metrics["R1"] == expected["R1"]
    assert metrics[f"mAP@{num_gallery}"] == pytest.approx(expected["mAP"], abs=1e-9)
    assert metrics["num_valid_queries"] == len(query.items)
    assert result["protocol"] == "reid"
    printed = capsys.readouterr().out
    assert "ReID protocol" in printed and "same-pid same-camera hits are junk" in printed
    assert f"{expected['R1']:.2f}" in printed


def test_top_k_r1_and_truncated_map_under_the_reid_protocol(tmp_path, capsys):
    """k < gallery: R1 is still evaluate_rank's (every top-5 holds a kept hit: only 2 junk items per query);
    mAP@5 is the truncated AP of the kept list, checked against a per-query loop over the full ranking."""
    features = same_camera_first()
    query, gallery = features.split()
    dist = cosine_distances(features)
    expected = evaluate_rank(dist, query.pids, gallery.pids, query.camids, gallery.camids).summary()
    k = 5
    capsys.readouterr()
    code, result = run_search(tmp_path, features, k)
    assert code == 0
    aps = []
    for i in range(len(query.items)):
        order = np.argsort(dist[i], kind="stable")[:k]
        junk = (gallery.pids.numpy()[order] == int(query.pids[i])) & (gallery.camids.numpy()[order] == 0)
        rel = gallery.pids.numpy()[order][~junk] == int(query.pids[i])
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        same_pid = gallery.pids.numpy() == int(query.pids[i])
        positives = int((same_pid & (gallery.camids.numpy() != 0)).sum())  # in the whole gallery, junk excluded
        aps.append((precision * rel).sum() / min(positives, len(rel)))
    assert result["metrics"]["R1"] == expected["R1"]
    assert result["metrics"][f"mAP@{k}"] == pytest.approx(100 * np.mean(aps), abs=1e-9)
    printed = capsys.readouterr().out
    assert f"mAP@{k} is the truncated AP@{k}" in printed and f"--k {len(gallery.items)}" in printed


def test_without_camids_the_cross_modal_protocol_is_named_and_followed(tmp_path, capsys):
    features = same_camera_first(camids=False)
    query, gallery = features.split()
    expected = evaluate_rank(cosine_distances(features), query.pids, gallery.pids).summary()
    capsys.readouterr()
    code, result = run_search(tmp_path, features, len(gallery.items))
    assert code == 0 and result["protocol"] == "cross_modal"
    assert result["metrics"]["R1"] == expected["R1"] == 100.0
    assert result["metrics"][f"mAP@{len(gallery.items)}"] == pytest.approx(expected["mAP"], abs=1e-9)
    printed = capsys.readouterr().out
    assert "cross-modal protocol" in printed and "carry no camids" in printed


def test_camids_on_one_side_only_exit_2(tmp_path, capsys):
    with_cams, without = same_camera_first(), same_camera_first(camids=False)
    without.save(tmp_path / "gallery.pt")
    with_cams.save(tmp_path / "queries.pt")
    assert main(["build", "--features", str(tmp_path / "gallery.pt"), "--out", str(tmp_path / "idx")]) == 0
    assert not GalleryIndex.load(tmp_path / "idx").has_camids  # recorded, and it survives save / load
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "queries.pt"),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "queries.pt" in err and "camids" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_index_folders_without_the_camid_flag_infer_it(tmp_path):
    """Folders written before ``has_camids`` was recorded: unknown camids were stored as -1."""
    for camids, expected in ((True, True), (False, False)):
        GalleryIndex.build(same_camera_first(camids=camids).split()[1], "flat").save(tmp_path / "idx")
        meta = torch.load(tmp_path / "idx" / "meta.pt", weights_only=True)
        del meta["has_camids"]
        torch.save(meta, tmp_path / "idx" / "meta.pt")
        assert GalleryIndex.load(tmp_path / "idx").has_camids is expected


def test_gallery_of_one_identity_is_refused_loudly(tmp_path, capsys):
    """Queries of identities 0..2 against a gallery holding only identity 3: no query has a positive."""
    rng = np.random.default_rng(0)
    n_query, n_gallery = 3, 6
    x = torch.tensor(rng.standard_normal((n_query + n_gallery, 16)), dtype=torch.float32)
    pids = torch.tensor([0, 1, 2] + [3] * n_gallery)
    features = FeatureSet(x, pids, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]), torch.arange(9) < n_query,
                          [f"img/{i}.jpg" for i in range(9)], SPACE)
    capsys.readouterr()
    code, result = run_search(tmp_path, features, 3)
    assert code == 2 and result is None
    err = capsys.readouterr().err
    assert "no valid query" in err and "1 identity" in err and "feats.pt" in err and "undefined" in err


def test_exact_refuses_a_file_with_nan_rows(tmp_path, capsys):
    features = same_camera_first()
    features.save(tmp_path / "feats.pt")
    broken = FeatureSet(features.features.clone(), features.pids, features.camids, features.is_query,
                        features.items, features.space)
    broken.features[20] = float("nan")
    broken.save(tmp_path / "nan.pt")
    assert main(["build", "--features", str(tmp_path / "feats.pt"), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "feats.pt"),
                 "--exact", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "nan.pt" in err and "NaN" in err and "img/0020.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


# an ivf index keeps no per-row vectors to compare: for it items, ids and space are what is checked
@pytest.mark.parametrize("kind,change", [(kind, change) for kind in ("flat", "hnsw", "ivf")
                                         for change in ("items", "pids", "camids", "space", "vectors")
                                         if (kind, change) != ("ivf", "vectors")])
def test_exact_refuses_a_file_that_is_not_the_index_source(tmp_path, capsys, kind, change):
    features = same_camera_first()
    features.save(tmp_path / "feats.pt")
    other = FeatureSet(features.features.clone(), features.pids.clone(), features.camids.clone(),
                       features.is_query, list(features.items), dict(features.space))
    gallery_row = 11  # row 3 of the gallery part (8 query rows first)
    if change == "items":
        other.items[gallery_row] = "img/elsewhere.jpg"
    elif change == "pids":
        other.pids[gallery_row] += 100
    elif change == "camids":
        other.camids[gallery_row] += 5
    elif change == "space":
        other.space = make_space("toy", 16, state_dict={"other": torch.zeros(1)}, label="other")
    else:
        other.features[gallery_row] = torch.randn(16, generator=torch.Generator().manual_seed(1))
    other.save(tmp_path / "other.pt")
    extra = ["--nlist", "2"] if kind == "ivf" else []
    assert main(["build", "--features", str(tmp_path / "feats.pt"), "--kind", kind, *extra,
                 "--out", str(tmp_path / "idx")]) == 0
    args = ["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "feats.pt"), "--k", "5",
            "--out", str(tmp_path / "r.json")]
    assert main([*args, "--exact", str(tmp_path / "feats.pt")]) == 0  # the real source is accepted
    capsys.readouterr()
    assert main([*args, "--exact", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err
    assert "other.pt" in err and "is not the file the index" in err and len(err.strip().splitlines()) == 1
    assert change == "space" or "row 3" in err


def test_search_result_junk_by_hand():
    """Query 0 (pid 5, camera 1): hits (pid 5, cam 1) junk, (7, 1), (5, 2): kept list [-, rel], 1 positive
    left in the gallery: R1 0, AP = (1/2) / min(1, 2 kept) = 1/2. Query 1 (pid 6, camera 0): hits (6, 1),
    (6, 0) junk, (7, 0): kept [rel, -], 1 positive: R1 1, AP = 1."""
    index = GalleryIndex.build(
        FeatureSet(torch.eye(6), torch.tensor([5, 7, 5, 6, 6, 7]), torch.tensor([1, 1, 2, 1, 0, 0]),
                   torch.zeros(6, dtype=torch.bool), [f"g{i}" for i in range(6)], SPACE | {"dim": 6}), "flat")
    queries = FeatureSet(
        torch.tensor([[1.0, 0.8, 0.6, 0, 0, 0], [0, 0, 0, 1.0, 0.8, 0.6]]), torch.tensor([5, 6]), torch.tensor([1, 0]),
        torch.ones(2, dtype=torch.bool), ["q0", "q1"], SPACE | {"dim": 6})
    result = search_features(index, queries, k=3)
    assert result.ids.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert result.num_positives.tolist() == [1, 1]  # junk excluded: g0 for q0, g4 for q1
    assert result.junk().tolist() == [[True, False, False], [False, True, False]]
    m = result.metrics()
    assert m["R1"] == 50.0 and m["mAP@3"] == pytest.approx(100 * (1 / 2 + 1) / 2)
