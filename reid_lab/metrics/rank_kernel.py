"""The CPU kernel of the ranking engine: one pass over a tile of distances, straight to per-query bucket counts.

:class:`~reid_lab.metrics.ranking_engine.BlockRanking` needs, for every query row and every gallery item, the
*bucket* of the item: how many of the row's positives rank before it (smaller distance, or equal distance and
smaller gallery index: the tie rule of :mod:`reid_lab.metrics.rank`). Its torch path gets there through about nine
whole-tile tensor ops (about 3-4 ns per distance on one core). This kernel, compiled by numba, does it in one pass
per row, about 0.3-1 ns per distance, on as many threads as it is given (rows split between them; the GIL is
released). The counts it adds are exactly the torch path's, so every metric keeps its bits.

Per row (``P`` positives, sorted by ``(distance, gallery index)``, first ``lo``, last ``hi``):

- an item with ``d > hi`` ranks after every positive and changes no kept-rank: skipped after one comparison (the
  common case for a good model or a large gallery); NaN is detected on the way;
- an item with ``d < lo`` is in bucket 0;
- else ``cell = min(trunc((d - lo) * scale), CELLS - 1)`` with ``scale = CELLS / (hi - lo)``, in float64: a
  monotone map, so cells order like distances, and the positives' own cells (from the same function) give each
  cell its first bucket. Only an item that shares a cell with a positive compares with that cell's positives one by
  one. Rows whose positives include ``inf`` (or whose span cannot be scaled) compare every item with the positives.

Counts go to four interleaved histograms per row (by column) so that runs of items in one bucket do not wait on
one counter. Only the buckets ``0 .. P - 1`` are read by the caller; items after the last positive are not counted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

__all__ = ["CELLS", "add_tile_counts"]

CELLS = 256  # quantisation cells per row between its first and last positive


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _bucket_before(sorted_d, sorted_col, r, k, stop, d, col):  # pragma: no cover - compiled
    """First ``k`` in ``[k, stop)`` whose positive does not rank before item ``(d, col)``."""
    while k < stop:
        pd = sorted_d[r, k]
        if pd < d or (pd == d and sorted_col[r, k] < col):
            k += 1
        else:
            break
    return k


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _cell(d, lo, scale):  # pragma: no cover - compiled
    """Cell ``trunc(clamp((d - lo) * scale + 1, 0, CELLS + 1))`` of distance ``d`` in float64."""
    x = (np.float64(d) - np.float64(lo)) * scale + 1.0
    return np.int64(min(max(x, 0.0), np.float64(CELLS + 1)))


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _count_rows(tile, col0, sorted_d, sorted_col, num_pos, counts, row0, row1):  # pragma: no cover - compiled
    """Add the buckets of rows ``row0:row1`` of ``tile`` to ``counts``; returns True if a NaN was seen."""
    cols = tile.shape[1]
    nan = False
    flags = np.zeros(cols + 8 - cols % 8, dtype=np.uint8)  # 1: at or before the row's last positive, or NaN
    words = flags.view(np.uint64)
    relevant = np.empty(cols + 8, dtype=np.int32)  # the flagged columns
    start = np.empty(CELLS + 3, dtype=np.int64)  # start[c]: positives in cells before c
    hist = np.empty((4, CELLS + 2), dtype=np.int64)  # items per cell, for cells without a positive
    for r in range(row0, row1):
        row = tile[r]
        p = num_pos[r]
        hi = sorted_d[r, max(p - 1, 0)]
        if p == 0:
            hi = -np.inf
        # Flag d <= hi or NaN in one vectorised pass, then compact branch-free only the 8-item words with a flag
        # (for a good model or a large gallery, most words have none).
        for j in range(cols):
            d = row[j]
            flags[j] = (d <= hi) | (d != d)
        n = 0
        for w in range(words.shape[0]):
            if words[w] != 0:
                for j in range(8 * w, 8 * w + 8):
                    relevant[n] = j
                    n += flags[j]
        if n == 0:
            continue
        if p == 0:
            nan = True  # only NaNs were flagged
            continue
        lo = sorted_d[r, 0]
        bucket = counts[r]
        span = np.float64(hi) - np.float64(lo)
        scale = CELLS / span if span > 0.0 else 0.0
        if n <= 2 * CELLS or not (np.isfinite(span) and np.isfinite(scale)):
            # few items (or positives at inf): compare each with the positives
            for i in range(n):
                j = relevant[i]
                d = row[j]
                if d != d:
                    nan = True
                elif d < lo:
                    bucket[0] += 1
                else:
                    bucket[_bucket_before(sorted_d, sorted_col, r, 0, p, d, col0 + j)] += 1
            continue
        # cell(d) = trunc(clamp((d - lo) * scale + 1, 0, CELLS + 1)) is monotone in d, so every positive in an
        # earlier cell ranks before the item and every positive in a later cell after it; the positives' cells
        # come from the same function. Items below lo land in cell 0 (or, by rounding, in the first positive's
        # cell, where they are compared exactly).
        start[:] = 0
        for k in range(p):
            start[_cell(sorted_d[r, k], lo, scale) + 1] += 1
        for c in range(CELLS + 2):
            start[c + 1] += start[c]
        hist[:] = 0
        for i in range(n):
            j = relevant[i]
            d = row[j]
            if d != d:
                nan = True
                continue
            c = _cell(d, lo, scale)
            if start[c + 1] > start[c]:  # shares a cell with a positive: exact comparison
                bucket[_bucket_before(sorted_d, sorted_col, r, start[c], start[c + 1], d, col0 + j)] += 1
            else:  # four interleaved histograms: a run of items in one cell does not wait on one counter
                hist[i & 3, c] += 1
        for c in range(CELLS + 2):
            bucket[start[c]] += hist[0, c] + hist[1, c] + hist[2, c] + hist[3, c]
    return nan


def add_tile_counts(
    tile: torch.Tensor,
    col0: int,
    sorted_d: torch.Tensor,
    sorted_col: torch.Tensor,
    num_pos: torch.Tensor,
    counts: torch.Tensor,
    threads: int = 1,
) -> None:
    """Add to ``counts[r, b]`` the items of ``tile`` row ``r`` with ``b`` positives ranked before them.

    Args:
        tile: ``(rows, cols)`` contiguous float32/float64 CPU distances of gallery columns ``col0 : col0 + cols``.
        col0: gallery index of the tile's first column (the tie rule compares gallery indices).
        sorted_d: ``(rows, max_pos)`` the rows' positive distances sorted by ``(distance, gallery index)``, same
            dtype as ``tile``, bit-identical to what the tile holds for them; entries past ``num_pos[r]`` ignored.
        sorted_col: ``(rows, max_pos)`` int64 their gallery indices.
        num_pos: ``(rows,)`` int64 positives per row.
        counts: ``(rows, max_pos + 1)`` int64, added to in place (buckets ``0 .. num_pos[r] - 1`` are exact; items
            after a row's last positive are not counted).
        threads: rows are split between this many threads.

    Raises:
        ValueError: if the tile holds a NaN.
    """
    args = [t.numpy() for t in (tile, sorted_d, sorted_col, num_pos, counts)]
    rows = tile.shape[0]
    threads = max(1, min(threads, rows))
    if threads == 1:
        nan = _count_rows(args[0], col0, *args[1:], 0, rows)
    else:
        bounds = np.linspace(0, rows, threads + 1).astype(np.int64)
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda i: _count_rows(args[0], col0, *args[1:], bounds[i], bounds[i + 1]), range(threads))
            nan = any(list(parts))
    if nan:
        raise ValueError("distmat contains NaN; distances must be comparable numbers")
