"""k-reciprocal re-ranking against a naive dense implementation written from the paper.

The reference below follows Zhong et al., CVPR 2017 as the field implements it (``reid-toolboxes.md``
§3): dense ``N x N`` matrices, Python loops and sets, the Jaccard distance as ``1 - sum min / sum max``. It
shares no code with ``reid_lab.metrics.rerank`` (which is sparse, chunked and uses ``1 - m / (2 - m)``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_lab.metrics.rank import evaluate_rank
from reid_lab.metrics.rerank import k_reciprocal_rerank, re_ranking_from_distances


def _base_distance(x: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - x @ x.T
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def dense_rerank(qf: np.ndarray, gf: np.ndarray, k1: int, k2: int, lam: float, metric: str = "euclidean"):
    """Dense, loop-based k-reciprocal re-ranking, float64."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    n, nq = len(x), len(qf)
    dist = _base_distance(x, metric) ** 2  # the reference squares its input distances
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    def neighbours(p: int, k: int) -> list[int]:
        return list(rank[p, : k + 1])

    def reciprocal(p: int, k: int) -> list[int]:
        return [g for g in neighbours(p, k) if p in neighbours(g, k)]

    half = int(round(k1 / 2))
    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        expanded = set(r)
        for q in r:
            rq = reciprocal(q, half)
            if len(set(rq) & set(r)) > 2.0 / 3.0 * len(rq):
                expanded |= set(rq)
        idx = sorted(expanded)
        w = np.exp(-dist[p, idx])
        v[p, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[p, :k2]].mean(axis=0) for p in range(n)])
    jaccard = np.empty((nq, n - nq))
    for i in range(nq):
        for j in range(n - nq):
            a, b = v[i], v[nq + j]
            jaccard[i, j] = 1.0 - np.minimum(a, b).sum() / np.maximum(a, b).sum()
    return (1.0 - lam) * jaccard + lam * dist[:nq, nq:]


def _clustered(num_ids: int, per_id: int, dim: int, seed: int, spread: float = 0.6):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(num_ids, dim))
    pids = np.repeat(np.arange(num_ids), per_id)
    feats = centres[pids] + spread * g.normal(size=(len(pids), dim))
    camids = np.tile(np.arange(per_id), num_ids) % 3
    perm = g.permutation(len(pids))
    return feats[perm], pids[perm], camids[perm]


@pytest.fixture(scope="module")
def toy():
    feats, pids, camids = _clustered(num_ids=6, per_id=8, dim=8, seed=0)
    return feats[:10], feats[10:]


@pytest.mark.parametrize(
    ("k1", "k2", "lam"),
    [(20, 6, 0.3), (7, 3, 0.3), (5, 1, 0.3), (6, 6, 0.0), (8, 2, 1.0), (1, 1, 0.5), (11, 4, 0.7)],
)
def test_matches_dense_reference_float64(toy, k1, k2, lam):
    qf, gf = toy
    expected = dense_rerank(qf, gf, k1, k2, lam)
    got = k_reciprocal_rerank(
        torch.from_numpy(qf), torch.from_numpy(gf), k1=k1, k2=k2, lambda_value=lam, chunk_size=7
    )
    assert got.shape == (10, 38) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 1, 10, 13, 64])
def test_chunking_and_float32(toy, chunk_size):
    qf, gf = toy
    expected = dense_rerank(qf, gf, 20, 6, 0.3)
    got = k_reciprocal_rerank(
        torch.from_numpy(qf).float(), torch.from_numpy(gf).float(), chunk_size=chunk_size
    )
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_cosine_metric(toy):
    qf, gf = toy
    expected = dense_rerank(qf, gf, 9, 3, 0.3, metric="cosine")
    got = k_reciprocal_rerank(torch.from_numpy(qf), torch.from_numpy(gf), k1=9, k2=3, metric="cosine")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    # On L2-normalised features squared euclidean = 2 (1 - cos): the row normalisation cancels the 2.
    qn = torch.nn.functional.normalize(torch.from_numpy(qf), dim=1)
    gn = torch.nn.functional.normalize(torch.from_numpy(gf), dim=1)
    np.testing.assert_allclose(k_reciprocal_rerank(qn, gn, k1=9, k2=3).numpy(), expected, atol=1e-10)


def test_lambda_one_is_normalised_original_distance(toy):
    qf, gf = toy
    x = np.concatenate([qf, gf])
    d2 = _base_distance(x, "euclidean") ** 2
    expected = (d2 / d2.max(axis=1, keepdims=True))[:10, 10:]
    got = k_reciprocal_rerank(torch.from_numpy(qf), torch.from_numpy(gf), lambda_value=1.0)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (4, 1, 0.0)])
def test_from_distances_matches_dense_reference(toy, k1, k2, lam):
    qf, gf = toy
    d = _base_distance(np.concatenate([qf, gf]), "euclidean")
    expected = dense_rerank(qf, gf, k1, k2, lam)
    d_copy = d.copy()
    got = re_ranking_from_distances(
        d[:10, 10:], d[:10, :10], d[10:, 10:], k1=k1, k2=k2, lambda_value=lam, chunk_size=6
    )
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    np.testing.assert_array_equal(d, d_copy)  # inputs are read, never written


def test_single_query_and_gallery_item_edge():
    g = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = g[:1] + 0.01
    expected = dense_rerank(q.numpy(), g.numpy(), 3, 2, 0.3)
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, k1=3, k2=2).numpy(), expected, atol=1e-10)


def test_exact_duplicates_give_finite_output():
    g = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)).repeat(3, 1)  # ties everywhere
    out = k_reciprocal_rerank(g[:5], g, k1=6, k2=3, chunk_size=8)
    assert out.shape == (5, 36) and bool(torch.isfinite(out).all())
    # identical V rows give m = 1 up to rounding, so d_J may dip just below 0
    assert bool(((out >= -1e-6) & (out <= 1 + 1e-6)).all())


def test_reranking_improves_map_on_clustered_set():
    feats, pids, camids = _clustered(num_ids=30, per_id=8, dim=16, seed=1, spread=1.6)
    feats = torch.from_numpy(feats).float()
    is_query = np.zeros(len(pids), dtype=bool)
    is_query[np.unique(pids, return_index=True)[1]] = True  # one query per id
    qf, gf = feats[is_query], feats[~is_query]
    qp, gp, qc, gc = pids[is_query], pids[~is_query], camids[is_query], camids[~is_query]
    base = torch.cdist(qf, gf) ** 2
    before = evaluate_rank(base, qp, gp, qc, gc).mAP
    after = evaluate_rank(k_reciprocal_rerank(qf, gf, k1=8, k2=3), qp, gp, qc, gc).mAP
    assert after > before + 0.03, (before, after)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k1": 0}, "k1 must be an integer"),
        ({"k1": 2.5}, "k1 must be an integer"),
        ({"k2": 0}, "k2 must be an integer"),
        ({"k1": 4, "k2": 5}, "k2 must be <= k1"),
        ({"k1": 48}, "k1 must be <"),
        ({"lambda_value": 1.5}, "lambda_value"),
        ({"lambda_value": -0.1}, "lambda_value"),
        ({"metric": "manhattan"}, "metric"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_parameter_validation(toy, kwargs, match):
    qf, gf = (torch.from_numpy(x) for x in toy)
    with pytest.raises(ValueError, match=match):
        k_reciprocal_rerank(qf, gf, **kwargs)


def test_input_validation():
    q, g = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="dims differ"):
        k_reciprocal_rerank(q, torch.randn(10, 5), k1=3, k2=2)
    with pytest.raises(ValueError, match="2-D"):
        k_reciprocal_rerank(q[0], g, k1=3, k2=2)
    with pytest.raises(ValueError, match="non-empty"):
        k_reciprocal_rerank(q[:0], g, k1=3, k2=2)
    with pytest.raises(ValueError, match="floating point"):
        k_reciprocal_rerank(q.long(), g, k1=3, k2=2)
    bad = g.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_rerank(q, bad, k1=3, k2=2)
    d = torch.rand(3, 10)
    with pytest.raises(ValueError, match="q_q_dist"):
        re_ranking_from_distances(d, torch.rand(3, 4), torch.rand(10, 10), k1=3, k2=2)
    with pytest.raises(ValueError, match="g_g_dist"):
        re_ranking_from_distances(d, torch.rand(3, 3), torch.rand(9, 10), k1=3, k2=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(toy):
    qf, gf = (torch.from_numpy(x).float() for x in toy)
    cpu = k_reciprocal_rerank(qf, gf)
    gpu = k_reciprocal_rerank(qf.cuda(), gf.cuda())
    assert gpu.is_cuda
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)


def test_overflowing_features_raise_a_clear_error():
    q, g = torch.randn(3, 4), torch.randn(10, 4)
    g[2, 1] = 1e30  # finite, but its squared norm overflows float32
    with pytest.raises(ValueError, match="too large"):
        k_reciprocal_rerank(q, g, k1=3, k2=2)


@pytest.mark.parametrize(("chunk", "split"), [(64, 16), (50, 50), (7, 3)])
def test_block_pairs_cover_every_pair_once(chunk, split):
    from reid_lab.metrics.rerank import _block_pairs, _spans

    n, nq = 157, 40
    spans = _spans(0, nq, chunk) + _spans(nq, n, chunk)
    seen = np.zeros((n, n), dtype=int)
    for r0, r1, c0, c1, mirrored in _block_pairs(spans, True, split):
        assert not (r0 < nq < r1 or c0 < nq < c1)  # a block never straddles queries and gallery
        seen[r0:r1, c0:c1] += 1
        if mirrored:
            assert r1 <= c0  # disjoint ranges: the transposed block is new work
            seen[c0:c1, r0:r1] += 1
    np.testing.assert_array_equal(seen, np.ones((n, n), dtype=int))
    full = np.zeros((n, n), dtype=int)
    for r0, r1, c0, c1, mirrored in _block_pairs(spans, False, split):
        assert not mirrored
        full[r0:r1, c0:c1] += 1
    np.testing.assert_array_equal(full, np.ones((n, n), dtype=int))


def test_nearest_neighbours_of_symmetric_blocks_match_a_full_sort():
    """The streamed k nearest (first blocks by top-k, later ones by threshold scans on both sides of a
    mirrored block) equal sorting each full row; the row maxima equal the dense maxima."""
    from reid_lab.metrics.rerank import _block_pairs, _NearestNeighbours, _spans

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    d = torch.cdist(x, x).square()
    d = (d + d.T) / 2  # exactly symmetric, as the blocks assume
    k, n, nq = 9, 300, 70
    nn = _NearestNeighbours(n, k, d.dtype, d.device)
    spans = _spans(0, nq, 64) + _spans(nq, n, 64)
    for r0, r1, c0, c1, mirrored in _block_pairs(spans, True, 16):
        if mirrored:
            nn.update_symmetric(r0, r1, c0, c1, d[r0:r1, c0:c1])
        else:
            nn.update(r0, r1, d[r0:r1, c0:c1], c0, dim=0)
    value, index = nn.sorted()
    want_value, want_index = torch.sort(d, dim=1, stable=True)
    torch.testing.assert_close(value, want_value[:, :k], rtol=0, atol=0)
    torch.testing.assert_close(index, want_index[:, :k])  # continuous random data: no ties
    torch.testing.assert_close(nn.rowmax, d.amax(1), rtol=0, atol=0)
