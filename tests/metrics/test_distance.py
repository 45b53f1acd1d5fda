"""compute_distance against per-pair formulas; evaluate_features against evaluate_rank on the full matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_lab.metrics.distance import compute_distance, distance_slices, evaluate_features
from reid_lab.metrics.rank import evaluate_rank, evaluate_rank_reference


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def count_path(request, monkeypatch):
    """Every test here runs twice: CPU tiles counted by the compiled kernel (the default), then by the torch ops
    (the path of other devices); both must give the protocol's numbers."""
    from reid_lab.metrics import ranking_engine

    monkeypatch.setattr(ranking_engine, "CPU_KERNEL", request.param == "kernel")
    return request.param


def naive_distance(query, gallery, metric, normalize):
    q = query.double().tolist()
    g = gallery.double().tolist()
    if normalize:
        q = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in q]
        g = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]
    out = torch.empty(len(q), len(g), dtype=torch.float64)
    for i, a in enumerate(q):
        for j, b in enumerate(g):
            if metric == "cosine":
                out[i, j] = 1.0 - sum(x * y for x, y in zip(a, b))
            else:
                out[i, j] = sum((x - y) ** 2 for x, y in zip(a, b))
    return out


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("normalize", [None, True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_compute_distance_matches_pairwise_formula(metric, normalize, chunk_size):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    gallery = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    do_normalize = (metric == "cosine") if normalize is None else normalize
    expected = naive_distance(query, gallery, metric, do_normalize)
    out = compute_distance(query, gallery, metric=metric, normalize=normalize, chunk_size=chunk_size)
    assert out.shape == (5, 7) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 7, 256, 300, None])
def test_distance_slices_tile_the_matrix_in_order(metric, chunk_size):
    """600 queries: 256-row matmul blocks cut into slices that never straddle a block, covering each row once."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(600, 6, generator=generator, dtype=torch.float64)
    gallery = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    expected = naive_distance(query, gallery, metric, metric == "cosine")
    starts, rows = [], []
    for start, block in distance_slices(query, gallery, metric=metric, chunk_size=chunk_size):
        assert block.shape[1] == 9 and block.shape[0] <= (chunk_size or 600)
        starts.append(start)
        rows.append(block.clone())  # the slice is a view of a reused buffer
    assert starts == sorted(starts) and starts[0] == 0
    torch.testing.assert_close(torch.cat(rows), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        distance_slices(query, gallery, chunk_size=0)


def test_euclidean_is_squared_and_cosine_in_0_2():
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert compute_distance(query, gallery, metric="euclidean").tolist() == [[0.0, 5.0, 16.0]]
    assert compute_distance(query, gallery).tolist() == [[0.0, 1.0, 2.0]]


def test_dtypes_numpy_input_and_clamping():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(4, 16, generator=generator)
    out16 = compute_distance(query.half(), query.half(), metric="euclidean")
    assert out16.dtype == torch.float32
    assert (out16 >= 0).all()  # |q|^2 + |q|^2 - 2 q.q can round below zero; clamped
    out_np = compute_distance(query.numpy(), query.numpy())
    torch.testing.assert_close(out_np, compute_distance(query, query))
    assert compute_distance(query, query.double()).dtype == torch.float64


def test_compute_distance_errors():
    with pytest.raises(ValueError, match="same feature dim"):
        compute_distance(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"query_features must be 2-d .* got shape \(3,\)"):
        compute_distance(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="metric must be one of"):
        compute_distance(torch.zeros(2, 3), torch.zeros(2, 3), metric="manhattan")
    with pytest.raises(TypeError, match="gallery_features must be a torch tensor or numpy array"):
        compute_distance(torch.zeros(2, 3), [[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        compute_distance(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=0)


def id_case(seed, num_query=15, num_gallery=50):
    """(q_pids, g_pids, q_camids, g_camids), the argument order of the evaluators; pid 0 = distractors."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(1, 7, num_query),
        rng.integers(0, 6, num_gallery),
        rng.integers(0, 3, num_query),
        rng.integers(0, 3, num_gallery),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_evaluate_features_equals_evaluate_rank_on_exact_integer_distances(chunk_size):
    # Small integer features, unnormalised squared euclidean: every distance is an exact integer, many ties,
    # so any difference in ranking or tie handling between the two paths would show.
    generator = torch.Generator().manual_seed(2)
    query = torch.randint(-2, 3, (15, 4), generator=generator).float()
    gallery = torch.randint(-2, 3, (50, 4), generator=generator).float()
    ids = id_case(2)
    full = evaluate_rank_reference(compute_distance(query, gallery, metric="euclidean"), *ids, 20)
    result = evaluate_features(
        query, gallery, *ids, metric="euclidean", max_rank=20, chunk_size=chunk_size
    )
    np.testing.assert_array_equal(result.first_match_rank, full.first_match_rank)
    np.testing.assert_array_equal(result.cmc, full.cmc)
    np.testing.assert_allclose(result.all_AP, full.all_AP, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.all_INP, full.all_INP, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_evaluate_features_without_camids_equals_the_reference_on_the_full_matrix(chunk_size):
    # Cross-modal protocol: exact integer distances with ties; nothing is dropped, so a query can match an
    # identical gallery item (distance 0) at rank 1, as text-to-image search counts it.
    generator = torch.Generator().manual_seed(4)
    query = torch.randint(-2, 3, (15, 4), generator=generator).float()
    gallery = torch.cat([query[:5], torch.randint(-2, 3, (45, 4), generator=generator).float()])
    q_pids, g_pids, _, _ = id_case(4)
    g_pids[:5] = q_pids[:5]
    full = evaluate_rank_reference(compute_distance(query, gallery, metric="euclidean"), q_pids, g_pids, None, None)
    result = evaluate_features(query, gallery, q_pids, g_pids, metric="euclidean", chunk_size=chunk_size)
    assert (result.first_match_rank[:5] == 0).all()
    np.testing.assert_array_equal(result.first_match_rank, full.first_match_rank)
    np.testing.assert_array_equal(result.cmc, full.cmc)
    np.testing.assert_allclose(result.all_AP, full.all_AP, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.all_INP, full.all_INP, rtol=0, atol=1e-12, equal_nan=True)


def test_evaluate_features_cosine_matches_full_matrix():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(20, 8, generator=generator, dtype=torch.float64)
    gallery = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    ids = id_case(3, 20, 60)
    full = evaluate_rank(compute_distance(query, gallery), *ids)
    result = evaluate_features(query, gallery, *ids, chunk_size=6)
    np.testing.assert_array_equal(result.first_match_rank, full.first_match_rank)
    assert result.mAP == pytest.approx(full.mAP, abs=1e-12)
    assert result.mINP == pytest.approx(full.mINP, abs=1e-12)


def test_evaluate_features_errors():
    with pytest.raises(ValueError, match=r"q_pids must have shape \(2,\)"):
        evaluate_features(torch.zeros(2, 3), torch.ones(4, 3), [1], [1, 1, 2, 2], [0, 0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_features(torch.zeros(0, 3), torch.ones(4, 3), [], [1, 1, 2, 2], [], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_features(torch.ones(2, 3), torch.ones(2, 3), [1, 2], [3, 4], [0, 0], [1, 1])


def test_thin_products_are_padded_so_every_path_gives_the_same_bits():
    # Thin products (a few query rows) take BLAS kernels that round differently from wider ones, at 1 and at 2
    # threads; compute_distance pads them to 16 rows, so any chunk size and thread count gives the bits of one
    # full single-thread product, as evaluate_features' blocks do.
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(21, 64, generator=generator)
    gallery = torch.randn(1500, 64, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        full = compute_distance(query, gallery, chunk_size=4096)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for chunk_size in (1, 3, 7, 10, 4096):
                assert torch.equal(compute_distance(query, gallery, chunk_size=chunk_size), full)
    finally:
        torch.set_num_threads(before)
    sliced = torch.cat([block.clone() for _, block in distance_slices(query[:3], gallery)])
    assert torch.equal(sliced, full[:3])


def test_evaluate_features_over_several_product_blocks_and_tiles_equals_the_reference():
    # 2,100 queries: at the smallest budget two product blocks of 1,050 rows, the 12,000-item gallery in tiles, each
    # ranked in blocks that get their exact pairs from their own pair product; by default whole rows. Integer
    # features: many exactly tied distances across tile borders.
    from reid_lab.metrics.distance import MIN_MEMORY_BUDGET, ranking_plan, reserved_bytes

    generator = torch.Generator().manual_seed(6)
    query = torch.randint(-2, 3, (2100, 16), generator=generator).float()
    gallery = torch.randint(-2, 3, (12000, 16), generator=generator).float()
    q_pids = torch.randint(0, 300, (2100,), generator=generator)
    g_pids = torch.randint(0, 300, (12000,), generator=generator)
    q_camids = torch.randint(0, 4, (2100,), generator=generator)
    g_camids = torch.randint(0, 4, (12000,), generator=generator)
    ids = (q_pids, g_pids, q_camids, g_camids)
    reserved = reserved_bytes(12000)
    small = MIN_MEMORY_BUDGET + reserved
    plan = ranking_plan(small, 2100, 12000, 4, reserved)
    assert plan.columns < 12000 and plan.product_rows >= 1050  # tiles of two 1,050-row products
    reference = evaluate_rank_reference(compute_distance(query, gallery, metric="euclidean"), *ids)
    for budget in (None, small):
        result = evaluate_features(query, gallery, *ids, metric="euclidean", memory_budget=budget)
        np.testing.assert_array_equal(result.first_match_rank, reference.first_match_rank)
        np.testing.assert_array_equal(result.cmc, reference.cmc)
        np.testing.assert_allclose(result.all_AP, reference.all_AP, rtol=0, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(result.all_INP, reference.all_INP, rtol=0, atol=1e-12, equal_nan=True)
