"""evaluate_rank / evaluate_rank_reference against a naive per-query implementation of the protocol text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_lab.metrics.rank import RankResult, evaluate_rank, evaluate_rank_reference
from reid_lab.metrics.ranking_engine import GalleryRanker


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def count_path(request, monkeypatch):
    """Every test here runs twice: CPU tiles counted by the compiled kernel (the default), then by the torch ops
    (the path of other devices); both must give the protocol's numbers."""
    from reid_lab.metrics import ranking_engine

    monkeypatch.setattr(ranking_engine, "CPU_KERNEL", request.param == "kernel")
    return request.param


def naive_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Straight from the protocol: per query, rank by (distance, gallery index), drop same-pid same-camera
    items (nothing when the camids are None: cross-modal protocol), skip queries without a positive, then
    CMC / AP over all positives / INP = |G| / rank of the last."""
    d = np.asarray(distmat, dtype=np.float64)
    num_query, num_gallery = d.shape
    max_rank = min(max_rank, num_gallery)
    first, aps, inps, cmcs = [], [], [], []
    for i in range(num_query):
        order = sorted(range(num_gallery), key=lambda j: (d[i, j], j))
        if q_camids is None:
            kept = order
        else:
            kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        relevant = [bool(g_pids[j] == q_pids[i]) for j in kept]
        if not any(relevant):
            first.append(-1)
            aps.append(np.nan)
            inps.append(np.nan)
            continue
        hits, precisions, last = 0, [], 0
        for k, rel in enumerate(relevant, start=1):
            if rel:
                hits += 1
                precisions.append(hits / k)
                last = k
        first_rank = relevant.index(True)
        first.append(first_rank)
        aps.append(sum(precisions) / len(precisions))
        inps.append(len(precisions) / last)
        cmcs.append([1.0 if first_rank < k else 0.0 for k in range(1, max_rank + 1)])
    return {
        "first": np.array(first),
        "ap": np.array(aps),
        "inp": np.array(inps),
        "cmc": np.mean(cmcs, axis=0) if cmcs else None,
    }


def random_case(seed, num_query=12, num_gallery=40, kind="ties"):
    rng = np.random.default_rng(seed)
    num_ids, num_cams = 5, 3
    # pid 0 in the gallery = distractors; query pid num_ids + 1 never appears in the gallery (skipped query).
    q_pids = rng.integers(1, num_ids + 2, num_query)
    g_pids = rng.integers(0, num_ids + 1, num_gallery)
    q_camids = rng.integers(0, num_cams, num_query)
    g_camids = rng.integers(0, num_cams, num_gallery)
    # Query 0's only same-pid gallery item is in its own camera: junk only -> skipped.
    q_pids[0], q_camids[0] = 99, 0
    g_pids[0], g_camids[0] = 99, 0
    if kind == "ties":
        distmat = rng.integers(0, 4, (num_query, num_gallery)).astype(np.float32)
    elif kind == "continuous":
        distmat = rng.random((num_query, num_gallery))
    else:  # ties, negative values and infinities
        distmat = np.round(rng.normal(size=(num_query, num_gallery)) * 2).astype(np.float32)
        distmat[rng.random(distmat.shape) < 0.1] = np.inf
    return distmat, q_pids, g_pids, q_camids, g_camids


def assert_matches(result: RankResult, expected: dict, exact_first: bool = True) -> None:
    np.testing.assert_array_equal(result.first_match_rank, expected["first"])
    np.testing.assert_array_equal(result.valid, expected["first"] >= 0)
    np.testing.assert_allclose(result.all_AP, expected["ap"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.all_INP, expected["inp"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.cmc, expected["cmc"], rtol=0, atol=1e-12)
    valid = expected["first"] >= 0
    assert result.num_valid == int(valid.sum())
    assert result.mAP == pytest.approx(np.mean(expected["ap"][valid]), abs=1e-12)
    assert result.mINP == pytest.approx(np.mean(expected["inp"][valid]), abs=1e-12)


@pytest.mark.parametrize("kind", ["ties", "continuous", "inf"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_evaluate_rank_matches_naive(kind, seed, chunk_size):
    case = random_case(seed, kind=kind)
    max_rank = [1, 5, 50][seed]
    expected = naive_evaluate(*case, max_rank=max_rank)
    result = evaluate_rank(*case, max_rank=max_rank, chunk_size=chunk_size)
    assert result.cmc.shape == (min(max_rank, 40),) and result.cmc.dtype == np.float64
    assert not result.valid[0]  # junk-only query
    assert_matches(result, expected)


@pytest.mark.parametrize("kind", ["ties", "continuous", "inf"])
def test_reference_path_matches_naive(kind):
    case = random_case(7, kind=kind)
    assert_matches(evaluate_rank_reference(*case, max_rank=10), naive_evaluate(*case, max_rank=10))


@pytest.mark.parametrize("num_cells", [1, 2, 7, None])
def test_gallery_ranker_any_cell_count_is_exact(num_cells):
    # Few cells force most items to share a cell with a positive: the exact comparison path.
    distmat, q_pids, g_pids, q_camids, g_camids = random_case(3, num_query=10, num_gallery=60, kind="ties")
    ranker = GalleryRanker(torch.from_numpy(g_pids), torch.from_numpy(g_camids), num_cells=num_cells)
    stats = ranker(torch.from_numpy(distmat), torch.from_numpy(q_pids), torch.from_numpy(q_camids))
    expected = naive_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    np.testing.assert_array_equal(stats.first_match_rank, expected["first"])
    np.testing.assert_allclose(stats.ap, expected["ap"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(stats.inp, expected["inp"], rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("kind", ["ties", "continuous", "inf"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_without_camids_nothing_is_dropped_and_both_paths_match_naive(kind, chunk_size):
    distmat, q_pids, g_pids, _, _ = random_case(4, kind=kind)
    expected = naive_evaluate(distmat, q_pids, g_pids, None, None, max_rank=10)
    assert expected["first"][0] >= 0  # the junk-only query of the ReID protocol is valid here
    assert_matches(evaluate_rank(distmat, q_pids, g_pids, max_rank=10, chunk_size=chunk_size), expected)
    assert_matches(evaluate_rank_reference(distmat, q_pids, g_pids, None, None, max_rank=10), expected)


@pytest.mark.parametrize("num_cells", [1, 3, None])
def test_gallery_ranker_without_camids_matches_naive(num_cells):
    distmat, q_pids, g_pids, _, _ = random_case(5, num_query=10, num_gallery=60, kind="ties")
    ranker = GalleryRanker(torch.from_numpy(g_pids), None, num_cells=num_cells)
    stats = ranker(torch.from_numpy(distmat), torch.from_numpy(q_pids))
    expected = naive_evaluate(distmat, q_pids, g_pids, None, None, max_rank=5)
    np.testing.assert_array_equal(stats.first_match_rank, expected["first"])
    np.testing.assert_allclose(stats.ap, expected["ap"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(stats.inp, expected["inp"], rtol=0, atol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="both be given"):
        ranker(torch.from_numpy(distmat), torch.from_numpy(q_pids), torch.zeros(len(q_pids), dtype=torch.long))


def test_fast_path_equals_reference_path_on_larger_tied_input():
    rng = np.random.default_rng(5)
    num_query, num_gallery = 60, 900
    q_pids = rng.integers(1, 40, num_query)
    g_pids = rng.integers(0, 40, num_gallery)
    q_camids = rng.integers(0, 6, num_query)
    g_camids = rng.integers(0, 6, num_gallery)
    distmat = rng.random((num_query, num_gallery), dtype=np.float32)
    distmat -= 0.3 * (q_pids[:, None] == g_pids[None, :])
    distmat = np.round(distmat, 2).astype(np.float32)  # ~100 distinct values: many ties with positives
    fast = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, chunk_size=7)
    reference = evaluate_rank_reference(distmat, q_pids, g_pids, q_camids, g_camids)
    np.testing.assert_array_equal(fast.first_match_rank, reference.first_match_rank)
    np.testing.assert_array_equal(fast.cmc, reference.cmc)
    np.testing.assert_allclose(fast.all_AP, reference.all_AP, rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(fast.all_INP, reference.all_INP, rtol=0, atol=1e-12, equal_nan=True)
    assert abs(fast.mAP - reference.mAP) < 1e-12


# ------------------------------------------------------------------------------------------ hand-computed


def test_hand_computed_ap_cmc_inp():
    # Query pid 1 cam 0. Ranked: g0 (pos, 0.1), g2 (neg, 0.2), g4 (junk: pid 1 cam 0, dropped), g3 (pos, 0.4),
    # g1 (neg, 0.5). Kept ranks of the positives: 1 and 3.
    distmat = np.array([[0.1, 0.5, 0.2, 0.4, 0.3]])
    result = evaluate_rank(distmat, [1], [1, 2, 3, 1, 1], [0], [1, 1, 1, 1, 0], max_rank=5)
    assert result.all_AP[0] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert result.mINP == pytest.approx(2 / 3)
    assert result.first_match_rank.tolist() == [0]
    assert result.first_match_rank.dtype == np.int64 and result.valid.dtype == np.bool_
    assert result.all_AP.dtype == result.all_INP.dtype == result.cmc.dtype == np.float64
    assert type(result.mAP) is float and type(result.mINP) is float and type(result.num_valid) is int
    np.testing.assert_array_equal(result.cmc, [1.0] * 5)  # max_rank clipped to num_gallery, not to the kept size
    assert result.summary() == pytest.approx(
        {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * (1 + 2 / 3) / 2, "mINP": 100 * 2 / 3}
    )


def test_hand_computed_first_miss_and_minp():
    # Positives at kept ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4, CMC = [0, 1, 1, 1].
    distmat = np.array([[0.4, 0.2, 0.1, 0.3]])
    result = evaluate_rank(distmat, [5], [5, 5, 6, 7], [0], [1, 2, 1, 1], max_rank=4)
    assert result.all_AP[0] == pytest.approx(0.5)
    assert result.all_INP[0] == pytest.approx(0.5)
    assert result.first_match_rank.tolist() == [1]
    np.testing.assert_array_equal(result.cmc, [0.0, 1.0, 1.0, 1.0])


def test_hand_computed_cross_modal_two_queries_four_gallery_items():
    # No camids: nothing is dropped. Gallery pids [1, 2, 3, 1].
    # q0 (pid 1) ranks g0 (pos, 0.1), g2 (0.2), g3 (pos, 0.3), g1 (0.4): positives at ranks 1 and 3,
    #   AP = (1/1 + 2/3) / 2 = 5/6, INP = 2/3, first match at rank 1.
    # q1 (pid 2) ranks g0 (0.1), g3 (0.2), g2 (0.4), g1 (pos, 0.5): its only positive at rank 4,
    #   AP = 1/4, INP = 1/4, first match at rank 4.
    distmat = np.array([[0.1, 0.4, 0.2, 0.3], [0.1, 0.5, 0.4, 0.2]])
    for evaluate in (evaluate_rank, evaluate_rank_reference):
        result = evaluate(distmat, [1, 2], [1, 2, 3, 1], None, None, max_rank=4)
        np.testing.assert_allclose(result.all_AP, [5 / 6, 1 / 4], rtol=0, atol=1e-15)
        np.testing.assert_allclose(result.all_INP, [2 / 3, 1 / 4], rtol=0, atol=1e-15)
        assert result.first_match_rank.tolist() == [0, 3]
        assert result.cmc.tolist() == [0.5, 0.5, 0.5, 1.0]
        assert result.mAP == pytest.approx((5 / 6 + 1 / 4) / 2) and result.mINP == pytest.approx((2 / 3 + 1 / 4) / 2)
    # With camids, g0 (pid 1, camera 0, like q0) is junk for q0: its positive g3 moves to kept-rank 2.
    reid = evaluate_rank(distmat, [1, 2], [1, 2, 3, 1], [0, 0], [0, 1, 1, 1], max_rank=4)
    np.testing.assert_allclose(reid.all_AP, [1 / 2, 1 / 4], rtol=0, atol=1e-15)
    assert reid.first_match_rank.tolist() == [1, 3]


def test_camids_on_one_side_only_raise():
    args = (np.zeros((1, 3)), [1], [1, 2, 1])
    for evaluate in (evaluate_rank, evaluate_rank_reference):
        with pytest.raises(ValueError, match="g_camids is None"):
            evaluate(*args, [0], None)
        with pytest.raises(ValueError, match="q_camids is None"):
            evaluate(*args, None, [1, 1, 1])


@pytest.mark.parametrize(
    ("g_pids", "first", "ap"),
    [
        ([1, 2, 2], 0, 1.0),  # positive has the smallest index among equal distances: ranks first
        ([2, 1, 2], 1, 0.5),
        ([2, 2, 1], 2, 1 / 3),
        ([2, 1, 1], 1, (1 / 2 + 2 / 3) / 2),
    ],
)
def test_tie_rule_smaller_gallery_index_first(g_pids, first, ap):
    distmat = np.full((1, 3), 0.7, dtype=np.float32)
    for evaluate in (evaluate_rank, evaluate_rank_reference):
        result = evaluate(distmat, [1], g_pids, [0], [1, 1, 1])
        assert result.first_match_rank.tolist() == [first]
        assert result.all_AP[0] == pytest.approx(ap)


def test_skipped_queries_are_nan_and_excluded_from_means():
    # q0: positive at rank 1. q1: pid absent from the gallery. q2: only same-camera same-pid items (junk).
    distmat = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.4], [0.3, 0.2, 0.1]])
    result = evaluate_rank(distmat, [1, 8, 2], [1, 2, 2], [0, 0, 1], [1, 1, 1])
    np.testing.assert_array_equal(result.valid, [True, False, False])
    np.testing.assert_array_equal(result.first_match_rank, [0, -1, -1])
    assert np.isnan(result.all_AP[1:]).all() and np.isnan(result.all_INP[1:]).all()
    assert result.num_valid == 1 and result.mAP == 1.0 and result.mINP == 1.0


def test_summary_ranks_beyond_max_rank_use_first_match_rank():
    distmat = np.array([[0.4, 0.2, 0.1, 0.3], [0.1, 0.2, 0.3, 0.4]])
    result = evaluate_rank(distmat, [5, 6], [5, 5, 6, 7], [0, 0], [1, 2, 1, 1], max_rank=1)
    assert result.cmc.tolist() == [0.0]
    # q0 first positive at kept rank 2, q1 at kept rank 3.
    assert result.summary(ranks=(1, 2, 3)) == pytest.approx(
        {"R1": 0.0, "R2": 50.0, "R3": 100.0, "mAP": 100 * (0.5 + 1 / 3) / 2, "mINP": 100 * (0.5 + 1 / 3) / 2}
    )


# ------------------------------------------------------------------------------------------ input handling


def test_numpy_torch_dtypes_and_read_only_inputs_agree(tmp_path):
    distmat, q_pids, g_pids, q_camids, g_camids = random_case(11, kind="ties")
    expected = naive_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10)
    read_only = distmat.copy()
    read_only.setflags(write=False)
    np.save(tmp_path / "d.npy", distmat)
    memmap = np.load(tmp_path / "d.npy", mmap_mode="r")
    variants = [
        read_only,
        memmap,
        distmat.astype(np.float16),  # integer values: exact in half precision
        distmat.astype(np.float64),
        distmat.astype(np.int32),
        torch.from_numpy(distmat),
        torch.from_numpy(distmat).half(),
        torch.from_numpy(np.asfortranarray(distmat)).T.contiguous().T,  # non-contiguous layout
    ]
    ids = [
        (q_pids, g_pids, q_camids, g_camids),
        tuple(torch.from_numpy(x) for x in (q_pids, g_pids, q_camids, g_camids)),
        tuple(x.astype(np.int32).tolist() for x in (q_pids, g_pids, q_camids, g_camids)),
    ]
    for i, variant in enumerate(variants):
        result = evaluate_rank(variant, *ids[i % len(ids)], max_rank=10, chunk_size=5)
        assert_matches(result, expected)
    assert not read_only.flags.writeable and np.array_equal(read_only, distmat)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_finite_distances(dtype):
    # Spans that overflow the float range must not break the quantisation inside the sort-free path.
    big = np.finfo(dtype).max / 1.01
    distmat = np.array([[big, -big, 0.0, big / 2, -big / 2, big]], dtype=dtype)
    case = (distmat, [1], [1, 1, 2, 2, 2, 1], [0], [1] * 6)
    assert_matches(evaluate_rank(*case), naive_evaluate(*case, max_rank=50))


def test_max_rank_is_clipped_to_gallery_size():
    distmat = np.arange(8, dtype=np.float32)[None, :]
    result = evaluate_rank(distmat, [1], [2] * 7 + [1], [0], [1] * 8, max_rank=50)
    assert result.cmc.tolist() == [0.0] * 7 + [1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    case = random_case(6, num_query=30, num_gallery=200, kind="inf")
    cpu = evaluate_rank(*case)
    gpu = evaluate_rank(torch.from_numpy(case[0]).cuda(), *case[1:])
    np.testing.assert_array_equal(gpu.first_match_rank, cpu.first_match_rank)
    np.testing.assert_allclose(gpu.all_AP, cpu.all_AP, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_without_camids_matches_cpu():
    distmat, q_pids, g_pids, _, _ = random_case(6, num_query=30, num_gallery=200, kind="inf")
    cpu = evaluate_rank(distmat, q_pids, g_pids)
    gpu = evaluate_rank(torch.from_numpy(distmat).cuda(), q_pids, g_pids)
    np.testing.assert_array_equal(gpu.first_match_rank, cpu.first_match_rank)
    np.testing.assert_allclose(gpu.all_AP, cpu.all_AP, rtol=0, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------------------------------ errors


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(np.zeros((2, 3)), [1, 2], [3, 3, 1], [0, 0], [1, 1, 0])
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank_reference(np.zeros((2, 3)), [1, 2], [3, 3, 1], [0, 0], [1, 1, 0])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros(3), [1], [1, 2, 3], [0], [1, 1, 1]), "distmat must be 2-d"),
        ((np.zeros((0, 3)), [], [1, 2, 3], [], [1, 1, 1]), "empty"),
        ((np.zeros((1, 3)), [1, 2], [1, 2, 3], [0], [1, 1, 1]), r"q_pids must have shape \(1,\)"),
        ((np.zeros((1, 3)), [1], [1, 2], [0], [1, 1, 1]), r"g_pids must have shape \(3,\).*got \(2,\)"),
        ((np.zeros((1, 3)), [1], [1, 2, 3], [0], [1, 1]), r"g_camids must have shape \(3,\)"),
        ((np.zeros((1, 3)), [1], [1, 2, 3], [[0]], [1, 1, 1]), r"q_camids must have shape \(1,\)"),
        ((np.array([[0.1, np.nan, 0.2]]), [1], [1, 2, 1], [0], [1, 1, 1]), "NaN"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        evaluate_rank(*args)


def test_bad_types_and_options_raise():
    ids = ([1], [1, 2, 1], [0], [1, 1, 1])
    with pytest.raises(TypeError, match="q_pids must hold integers"):
        evaluate_rank(np.zeros((1, 3)), [1.5], *ids[1:])
    with pytest.raises(TypeError, match="distmat must hold real numbers"):
        evaluate_rank(np.zeros((1, 3), dtype=bool), *ids)
    with pytest.raises(TypeError, match="distmat must be a numpy array or torch tensor"):
        evaluate_rank([[0.0, 1.0, 2.0]], *ids)
    with pytest.raises(ValueError, match="max_rank must be an integer >= 1"):
        evaluate_rank(np.zeros((1, 3)), *ids, max_rank=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        evaluate_rank(np.zeros((1, 3)), *ids, chunk_size=0)


@pytest.mark.parametrize("kind", ["ties", "continuous", "inf"])
@pytest.mark.parametrize("path", ["dense", "relevant"])
def test_both_tile_counting_paths_match_naive(kind, path, monkeypatch):
    # BlockRanking counts a tile either through the cell histogram of every item or through the items at or
    # before their row's last positive only; each path alone must give the protocol's numbers (the other path
    # raises here, so the test proves which one ran).
    from reid_lab.metrics import ranking_engine
    from reid_lab.metrics.ranking_engine import BlockRanking

    other = "_add_relevant" if path == "dense" else "_add_dense"
    monkeypatch.setattr(ranking_engine, "CPU_KERNEL", False)  # the torch ops' two ways (the kernel has its own)
    monkeypatch.setattr(ranking_engine, "DENSE_ABOVE", -1.0 if path == "dense" else 1.0)
    monkeypatch.setattr(BlockRanking, other, lambda *args: pytest.fail(f"{other} ran"))
    case = random_case(11, num_query=40, num_gallery=300, kind=kind)
    for chunk_size in (3, None):
        assert_matches(evaluate_rank(*case, max_rank=20, chunk_size=chunk_size), naive_evaluate(*case, max_rank=20))


def test_items_far_outside_the_positives_spread_over_overflow_cells_exactly():
    # Most items lie far below the best or far above the worst positive (the overflow cells, spread by column),
    # a few tie exactly with the positives' distances; ranks must still follow (distance, gallery index).
    rng = np.random.default_rng(12)
    num_query, num_gallery = 6, 500
    g_pids = rng.integers(0, 4, num_gallery)
    q_pids = rng.integers(0, 4, num_query)
    distmat = np.where(rng.random((num_query, num_gallery)) < 0.5, -1e6, 1e6).astype(np.float32)
    same = q_pids[:, None] == g_pids[None, :]
    distmat[same] = rng.integers(0, 3, same.sum()).astype(np.float32)  # positives in [0, 2], tied
    middle = rng.random((num_query, num_gallery)) < 0.05
    distmat[middle & ~same] = rng.integers(0, 3, (middle & ~same).sum())  # items tied with positives
    case = (distmat, q_pids, g_pids, None, None)
    assert_matches(evaluate_rank(*case, max_rank=50), naive_evaluate(*case, max_rank=50))
