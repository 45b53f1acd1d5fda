"""The compiled ranking kernel (rank_kernel.add_tile_counts) against a naive count of the tie rule.

For a row with positives sorted by (distance, gallery index), an item's bucket is the number of positives that rank
before it: a smaller distance, or an equal one with a smaller gallery index. The kernel must count every item's
bucket exactly for the buckets ``0 .. P - 1`` (those read by the kept-ranks), whatever the distances (ties, inf,
huge or tiny spans), the tiling, the thread count and the path inside the kernel (few items compared one by one,
or many through the cells).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_lab.metrics.rank_kernel import CELL_ITEMS, MIN_CELLS, add_tile_counts


def naive_buckets(dist: np.ndarray, pos_cols: list[np.ndarray]) -> list[np.ndarray]:
    """Per row, ``counts[b]`` for ``b < P``: items with exactly ``b`` positives before them, by (distance, col)."""
    out = []
    for r, cols in enumerate(pos_cols):
        keys = sorted((dist[r, c], c) for c in cols)
        counts = np.zeros(len(keys), dtype=np.int64)
        for j, d in enumerate(dist[r]):
            b = sum(1 for pd, pc in keys if pd < d or (pd == d and pc < j))
            if b < len(keys):
                counts[b] += 1
        out.append(counts)
    return out


def kernel_buckets(dist: np.ndarray, pos_cols: list[np.ndarray], tiles: int = 1, threads: int = 1) -> list:
    """add_tile_counts over ``tiles`` column tiles; per row the buckets ``0 .. P - 1``."""
    tile_all = torch.from_numpy(np.ascontiguousarray(dist))
    rows = len(pos_cols)
    max_pos = max(len(c) for c in pos_cols)
    sorted_d = torch.full((rows, max(max_pos, 1)), float("inf"), dtype=tile_all.dtype)
    sorted_col = torch.full((rows, max(max_pos, 1)), dist.shape[1], dtype=torch.int64)
    for r, cols in enumerate(pos_cols):
        keys = sorted((dist[r, c], c) for c in cols)
        sorted_d[r, : len(keys)] = torch.tensor([k[0] for k in keys], dtype=tile_all.dtype)
        sorted_col[r, : len(keys)] = torch.tensor([k[1] for k in keys], dtype=torch.int64)
    num_pos = torch.tensor([len(c) for c in pos_cols], dtype=torch.int64)
    counts = torch.zeros(rows, max(max_pos, 1) + 1, dtype=torch.int64)
    bounds = np.linspace(0, dist.shape[1], tiles + 1).astype(int)
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        add_tile_counts(tile_all[:, c0:c1].contiguous(), int(c0), sorted_d, sorted_col, num_pos, counts, threads)
    return [counts[r, : len(c)].numpy() for r, c in enumerate(pos_cols)]


def random_rows(seed: int, rows: int, cols: int, kind: str, dtype=np.float32):
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: most items tie with a positive
        dist = rng.integers(0, 5, (rows, cols)).astype(dtype)
    elif kind == "continuous":
        dist = rng.random((rows, cols)).astype(dtype)
    else:  # inf / -inf / negative values, ties among them
        dist = np.round(rng.normal(size=(rows, cols)) * 3).astype(dtype)
        dist[rng.random(dist.shape) < 0.1] = np.inf
        dist[rng.random(dist.shape) < 0.05] = -np.inf
    num_pos = rng.integers(0, 12, rows)
    pos_cols = [rng.choice(cols, k, replace=False) for k in num_pos]
    return dist, pos_cols


def assert_same(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("kind", ["ties", "continuous", "inf"])
@pytest.mark.parametrize("cols", [40, 3000])  # 3000 > 2 * MIN_CELLS items per row: the cell path
def test_kernel_counts_equal_the_tie_rule(kind, cols):
    dist, pos_cols = random_rows(0, 9, cols, kind)
    want = naive_buckets(dist, pos_cols)
    assert_same(kernel_buckets(dist, pos_cols), want)
    assert_same(kernel_buckets(dist, pos_cols, tiles=7, threads=2), want)  # col0 offsets reach the tie rule


def test_many_items_in_few_cells_and_more_positives_than_cells():
    # 600 positives per row, more than the row has cells: cells hold several positives, compared one by one.
    rng = np.random.default_rng(1)
    cols = 4000
    dist = rng.integers(0, 300, (3, cols)).astype(np.float32)
    pos_cols = [rng.choice(cols, 600, replace=False) for _ in range(3)]
    assert 600 > cols // CELL_ITEMS  # more positives than the cells a row of this width can get
    assert_same(kernel_buckets(dist, pos_cols), naive_buckets(dist, pos_cols))


@pytest.mark.parametrize(
    "lo, hi",
    [
        (1.0, 1.0 + 1e-7),  # a span of one float32 ulp
        (0.0, 1e-45),  # a subnormal span: its scale overflows, every item is compared exactly
        (-3e38, 3e38),  # a span near float32's limit
    ],
)
def test_extreme_spans(lo, hi):
    cols = 2000
    rng = np.random.default_rng(2)
    values = np.array([lo, hi, np.nextafter(np.float32(lo), np.float32(-np.inf)), 0.5 * (lo + hi)], np.float32)
    dist = values[rng.integers(0, len(values), (4, cols))]
    dist[:, :3] = np.array([lo, hi, lo], np.float32)
    pos_cols = [np.array([0, 1, 2])] * 4
    assert_same(kernel_buckets(dist, pos_cols), naive_buckets(dist, pos_cols))


def test_float64_span_that_overflows():
    cols = 1500
    rng = np.random.default_rng(3)
    dist = rng.choice(np.array([-1e308, 1e308, 0.0, 5.0]), (3, cols))
    pos_cols = [np.array([0, 7]), np.array([3]), np.array([1, 2, 9])]
    dist[0, [0, 7]] = [-1e308, 1e308]  # hi - lo overflows float64
    assert_same(kernel_buckets(dist, pos_cols), naive_buckets(dist, pos_cols))


def test_threads_do_not_change_the_counts():
    dist, pos_cols = random_rows(4, 37, 5000, "continuous")
    one = kernel_buckets(dist, pos_cols, threads=1)
    assert_same(kernel_buckets(dist, pos_cols, threads=2), one)
    assert_same(kernel_buckets(dist, pos_cols, threads=5), one)


def test_few_items_before_the_last_positive_in_many_columns():
    # 20,000 columns, about 5 % of them before the last positive: the flagged items alone go through the cells
    # (not every item), and with integer distances many of them share a cell with a positive.
    rng = np.random.default_rng(5)
    cols = 20_000
    dist = rng.integers(0, 400, (6, cols)).astype(np.float32)
    pos_cols = [rng.choice(cols, 9, replace=False) for _ in range(6)]
    for r, c in enumerate(pos_cols):
        dist[r, c] = rng.integers(0, 20, len(c))  # the last positive at 19 or below: about 5 % flagged
    flagged = [(dist[r] <= dist[r, c].max()).mean() for r, c in enumerate(pos_cols)]
    assert all(2 * MIN_CELLS / cols < share < 1 / 8 for share in flagged)
    assert_same(kernel_buckets(dist, pos_cols, tiles=3), naive_buckets(dist, pos_cols))


@pytest.mark.parametrize("num_pos", [0, 2])
@pytest.mark.parametrize("cols, last", [(64, 0.8), (3000, 0.8), (20_000, 0.05)])  # each way of counting a row
def test_nan_anywhere_is_an_error(num_pos, cols, last):
    # A NaN after the last positive (or in a row with none) changes no rank, yet it must not pass silently.
    dist = np.linspace(0, 1, cols, dtype=np.float32)[None, :].repeat(2, 0)
    at = [3, int(last * cols)]
    pos_cols = [np.array(at[:num_pos]), np.array(at[:num_pos])]
    for nan_at in (1, cols // 2, cols - 1):
        bad = dist.copy()
        bad[1, nan_at] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            kernel_buckets(bad, pos_cols)
