from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import IncompatibleSpacesError, add_claim, make_space
from reid_lab.retrieval.index import GalleryIndex, torch_search
from reid_lab.retrieval.search import SearchResult, neighbour_overlap_at_k, search_features


def toy_space(name: str, dim: int) -> dict:
    """A space record for hand-made features: one per name (the name stands in for the weights)."""
    return make_space("toy", dim, state_dict={name: torch.zeros(1)}, label=name)



def clustered(n: int, dim: int, clusters: int = 20, seed: int = 0, noise: float = 0.4) -> np.ndarray:
    """Unit vectors around random centres (float32), like ReID embeddings of a few identities."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_topk(queries: np.ndarray, gallery: np.ndarray, k: int,
               check_ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k in float64; by default checks the data has no near-ties in the top k + 1."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, : k + 1]
    top = np.take_along_axis(sims, ids, axis=1)
    assert not check_ties or np.all(np.diff(-top, axis=1) > 1e-5), "test data has near-ties; change the seed"
    return top[:, :k], ids[:, :k]


def feature_set(x: np.ndarray, space: dict, seed: int = 0, num_pids: int = 10) -> FeatureSet:
    n = len(x)
    rng = np.random.default_rng(seed)
    return FeatureSet(
        torch.from_numpy(x), torch.from_numpy(rng.integers(0, num_pids, n)), torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.bool), [f"img_{i}.jpg" for i in range(n)], space,
    )


GALLERY = clustered(600, 16, seed=1)
QUERIES = clustered(25, 16, seed=2)


def test_flat_equals_numpy_brute_force():
    exact_scores, exact_ids = numpy_topk(QUERIES, GALLERY, 10)
    index = GalleryIndex.build(torch.from_numpy(GALLERY), "flat", device="cpu")
    scores, ids = index.search(torch.from_numpy(QUERIES), 10)
    assert ids.shape == scores.shape == (25, 10)
    np.testing.assert_array_equal(ids.numpy(), exact_ids)
    np.testing.assert_allclose(scores.numpy(), exact_scores, atol=1e-5)


def test_flat_normalises_inputs():
    exact_ids = numpy_topk(QUERIES, GALLERY, 5)[1]
    index = GalleryIndex.build(torch.from_numpy(GALLERY * 3.0), "flat", device="cpu")
    np.testing.assert_array_equal(index.search(torch.from_numpy(QUERIES * 0.1), 5)[1].numpy(), exact_ids)


def test_ivf_with_all_cells_probed_is_exact():
    exact_ids = numpy_topk(QUERIES, GALLERY, 10)[1]
    index = GalleryIndex.build(torch.from_numpy(GALLERY), "ivf", device="cpu", nlist=8, nprobe=8)
    np.testing.assert_array_equal(index.search(torch.from_numpy(QUERIES), 10)[1].numpy(), exact_ids)
    index.set_search_params(nprobe=1)  # one cell: approximate, but every returned score is the true cosine
    scores, ids = index.search(torch.from_numpy(QUERIES), 10)
    found = ids >= 0
    true = np.einsum("qd,qkd->qk", QUERIES, GALLERY[ids.clamp(min=0).numpy()])
    np.testing.assert_allclose(scores.numpy()[found.numpy()], true[found.numpy()], atol=1e-5)


def test_hnsw_neighbour_overlap_at_10_is_high():
    data = clustered(3050, 32, clusters=50, seed=3)
    gallery, queries = data[:3000], data[3000:]
    exact_ids = numpy_topk(queries, gallery, 10, check_ties=False)[1]
    index = GalleryIndex.build(torch.from_numpy(gallery), "hnsw", device="cpu", m=16, ef_search=64)
    ids = index.search(torch.from_numpy(queries), 10)[1]
    assert neighbour_overlap_at_k(ids, torch.from_numpy(exact_ids), 10) > 0.9


@pytest.mark.parametrize("chunk_size", [37, 600, 4096])
def test_torch_search_equals_numpy(chunk_size):
    exact_scores, exact_ids = numpy_topk(QUERIES, GALLERY, 10)
    scores, ids = torch_search(torch.from_numpy(QUERIES), torch.from_numpy(GALLERY), 10, chunk_size=chunk_size)
    np.testing.assert_array_equal(ids.numpy(), exact_ids)
    np.testing.assert_allclose(scores.numpy(), exact_scores, atol=1e-5)


def test_torch_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=601"):
        torch_search(torch.from_numpy(QUERIES), torch.from_numpy(GALLERY), 601)
    with pytest.raises(ValueError, match="dim"):
        torch_search(torch.from_numpy(QUERIES), torch.from_numpy(GALLERY[:, :8]), 1)


def test_add_in_chunks_appends_vectors_and_metadata():
    space = toy_space("toy-a", 16)
    whole = GalleryIndex.build(feature_set(GALLERY, space), "flat", device="cpu")
    parts = GalleryIndex.build(feature_set(GALLERY, space).select(torch.arange(600) < 250), "flat",
                               device="cpu", chunk_size=7)
    parts.add(feature_set(GALLERY, space).select(torch.arange(600) >= 250), chunk_size=50)
    assert parts.ntotal == 600 and len(parts.paths) == 600
    assert torch.equal(parts.pids, whole.pids) and parts.paths == whole.paths
    assert torch.equal(parts.search(torch.from_numpy(QUERIES), 10)[1], whole.search(torch.from_numpy(QUERIES), 10)[1])
    with pytest.raises(ValueError, match="dim 8"):
        parts.add(torch.from_numpy(GALLERY[:, :8]))


@pytest.mark.parametrize("kind,params", [("flat", {}), ("ivf", {"nlist": 8, "nprobe": 2}),
                                         ("hnsw", {"m": 8, "ef_search": 20}), ("ivfpq", {"nlist": 4, "pq_m": 4})])
def test_save_load_round_trip(tmp_path, kind, params):
    space = toy_space("toy-a", 16)
    index = GalleryIndex.build(feature_set(GALLERY, space), kind, device="cpu", **params)
    before = index.search(torch.from_numpy(QUERIES), 10)
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # replacing an existing index folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "meta.pt"]
    loaded = GalleryIndex.load(tmp_path / "idx")
    after = loaded.search(torch.from_numpy(QUERIES), 10)
    assert torch.equal(before[1], after[1]) and torch.allclose(before[0], after[0])
    assert loaded.kind == kind and loaded.space == space and loaded.params == index.params
    assert torch.equal(loaded.pids, index.pids) and loaded.paths == index.paths


def test_save_refuses_foreign_folder_and_load_reports_missing(tmp_path):
    index = GalleryIndex.build(torch.from_numpy(GALLERY), "flat", device="cpu")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an index"):
        index.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GalleryIndex.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="index.faiss is missing"):
        GalleryIndex.load(tmp_path / "notes")


def test_build_rejects_bad_parameters():
    x = torch.from_numpy(GALLERY)
    with pytest.raises(ValueError, match="kind"):
        GalleryIndex.build(x, "annoy")
    with pytest.raises(ValueError, match="nlist"):
        GalleryIndex.build(x, "flat", nlist=4)
    with pytest.raises(ValueError, match="pq_m=5 must divide the dimension 16"):
        GalleryIndex.build(x, "ivfpq", nlist=4, pq_m=5)
    with pytest.raises(ValueError, match="NaN or infinite values in 1 of 600 rows"):
        GalleryIndex.build(torch.from_numpy(GALLERY).index_fill(0, torch.tensor([3]), float("nan")), "flat")
    with pytest.raises(ValueError, match=r"queries must have shape \(num_query, 16\)"):
        GalleryIndex.build(x, "flat").search(x[:, :8], 1)
    with pytest.raises(RuntimeError, match="no GPU"):
        GalleryIndex.build(x, "flat", device="gpu")


def test_search_features_checks_spaces():
    old = toy_space("old", 16)
    new = toy_space("new", 16)
    index = GalleryIndex.build(feature_set(GALLERY, old), "flat", device="cpu")
    with pytest.raises(IncompatibleSpacesError, match="no verified compatibility claim"):
        search_features(index, feature_set(QUERIES, new), k=5)
    exact_ids = torch.from_numpy(numpy_topk(QUERIES, GALLERY, 5)[1])
    for queries, allow in [(feature_set(QUERIES, old), False), (feature_set(QUERIES, new), True),
                           (feature_set(QUERIES, add_claim(dict(new), old, metric="mAP", cross=50, reference=40)),
                            False)]:
        result = search_features(index, queries, k=5, allow_unverified=allow)
        assert torch.equal(result.ids, exact_ids)
        assert torch.equal(result.gallery_pids, index.pids[exact_ids])
        assert result.neighbour_overlap_at_k(exact_ids) == 1.0


def test_neighbour_overlap_at_k_by_hand():
    approx = torch.tensor([[1, 2, 3], [4, -1, -1]])
    exact = torch.tensor([[3, 2, 9], [-1, 4, 7]])
    assert neighbour_overlap_at_k(approx, exact) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert neighbour_overlap_at_k(approx, exact, k=1) == 0.0


def test_search_result_metrics_by_hand():
    # query 0 (pid 5, 2 positives): hits pid 5, 7, 5 -> R1 1, P@3 2/3, AP = (1 + 2/3) / 2
    # query 1 (pid 6, 4 positives): hits 7, 6, 7 -> R1 0, P@3 1/3, AP = (1/2) / 3
    # query 2 (pid 9, no positive in the gallery) is skipped
    result = SearchResult(
        ids=torch.tensor([[0, 1, 2], [1, 3, 4], [0, 1, 2]]), scores=torch.zeros(3, 3),
        gallery_pids=torch.tensor([[5, 7, 5], [7, 6, 7], [5, 7, 5]]), gallery_camids=torch.zeros(3, 3),
        query_pids=torch.tensor([5, 6, 9]), num_positives=torch.tensor([2, 4, 0]),
    )
    m = result.metrics()
    assert m["num_valid_queries"] == 2
    assert m["R1"] == pytest.approx(50.0)
    assert m["P@3"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert m["mAP@3"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 / 2) / 3) / 2)
    # without positive counts, every query with a known pid counts (query 2 then has R1 0)
    result.num_positives = None
    assert result.metrics()["R1"] == pytest.approx(100 / 3)


def test_failed_save_keeps_the_old_index_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    index = GalleryIndex.build(torch.from_numpy(GALLERY), "flat", device="cpu")
    index.save(tmp_path / "idx")
    before = (tmp_path / "idx" / "meta.pt").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("reid_lab.retrieval.index.faiss.write_index", fail)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert (tmp_path / "idx" / "meta.pt").read_bytes() == before
