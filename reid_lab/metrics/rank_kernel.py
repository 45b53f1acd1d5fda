"""The CPU kernel of the ranking engine: a tile of distances straight to per-query bucket counts, row by row.

:class:`~reid_lab.metrics.ranking_engine.BlockRanking` needs, for every query row and every gallery item, the
*bucket* of the item: how many of the row's positives rank before it (smaller distance, or equal distance and
smaller gallery index: the tie rule of :mod:`reid_lab.metrics.rank`). Its torch path gets there through about nine
whole-tile tensor ops (3-5 ns per distance on one core). This kernel, compiled by numba, makes two to four passes
over each row while it is in the cache (0.4-3 ns per distance, by how much of the row comes before its last
positive), on as many threads as it is given (rows split between them, the GIL released). The counts are exact,
so every metric keeps its bits.

Per row (``P`` positives sorted by ``(distance, gallery index)``, first ``lo``, last ``hi``):

1. one vectorised pass flags the items with ``d <= hi`` and counts them (``n``) and the NaNs (an error). Items after
   the last positive change no kept-rank: for a good model or a large gallery they are nearly all of the row;
2. few flagged items (``n <= 128``), or positives at ``inf``: each is compared with the positives;
3. else ``cell(d) = trunc(clamp((d - lo) * scale + 1, 0, cells + 1))`` in float64 with
   ``scale = (cells - 0.5) / (hi - lo)`` and about 8 flagged items per cell. It is monotone in ``d``, so cells order
   like distances and the positives' own cells (from the same function) give each cell its first bucket. The
   cells of the flagged items (or, when over 1/8 of the row is flagged, of every item: one vectorised pass) go to
   a histogram without a branch, four interleaved copies so that a run of items in one cell does not wait on one
   counter; the few items that share a cell with a positive are marked on the way and compared with that cell's
   positives afterwards.

Flagged and marked items are compacted per 8-byte word of flags, skipping the words without one. Only the buckets
``0 .. P - 1`` are read by the caller; items after the last positive may or may not be counted in bucket ``P``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

__all__ = ["add_tile_counts"]

CELL_ITEMS = 8  # flagged items per quantisation cell (few then share a cell with a positive) ...
MIN_CELLS, MAX_CELLS = 64, 4096  # ... within these bounds
DENSE_SHARE = 8  # a row with over 1 / DENSE_SHARE of its items flagged puts every item through the cells


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _bucket_before(sorted_d, sorted_col, r, k, stop, d, col):  # pragma: no cover - compiled
    """First ``k`` in ``[k, stop)`` whose positive does not rank before item ``(d, col)`` (positives sorted)."""
    while k < stop:
        pd = sorted_d[r, k]
        if pd < d or (pd == d and sorted_col[r, k] < col):
            k += 1
        else:
            break
    return k


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _cell_of(d, lo, scale, cells):  # pragma: no cover - compiled
    """Cell ``trunc(clamp((d - lo) * scale + 1, 0, cells + 1))`` of distance ``d``, in float64."""
    x = (np.float64(d) - np.float64(lo)) * scale + 1.0
    x = x if x > 0.0 else 0.0
    top = np.float64(cells + 1)
    return np.int32(x if x < top else top)


@numba.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _compact(words, flags, out, num_words):  # pragma: no cover - compiled
    """Write the indices of the set bytes of ``flags`` (read as 8-byte ``words``, the first ``num_words``) to
    ``out``; returns how many. Words without a flag are skipped, the others compacted branch-free."""
    n = 0
    for w in range(num_words):
        if words[w] != 0:
            for j in range(8 * w, 8 * w + 8):
                out[n] = j
                n += flags[j]
    return n


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _count_rows(tile, col0, sorted_d, sorted_col, num_pos, counts, row0, row1):  # pragma: no cover - compiled
    """Add the buckets of rows ``row0:row1`` of ``tile`` to ``counts``; returns True if the tile holds a NaN."""
    cols = tile.shape[1]
    padded = cols + 8 - cols % 8
    flags = np.zeros(padded, dtype=np.uint8)  # per item: flagged (not after hi), then marked (in a positive's cell)
    words = flags.view(np.uint64)
    relevant = np.empty(padded, dtype=np.int32)  # the flagged columns, compacted
    marked = np.empty(padded, dtype=np.int32)  # the marked items, compacted
    keys = np.empty(padded, dtype=np.int32)  # cell per item
    start = np.empty(MAX_CELLS + 3, dtype=np.int64)  # start[c]: positives in cells before c
    shared = np.zeros(MAX_CELLS + 2, dtype=np.uint8)  # 1: the cell holds a positive
    hist = np.empty((4, MAX_CELLS + 2), dtype=np.int32)  # items per cell, four interleaved copies
    for r in range(row0, row1):
        row = tile[r]
        p = num_pos[r]
        hi = sorted_d[r, max(p - 1, 0)]
        if p == 0:
            hi = -np.inf
        # flag "not after the last positive": d <= hi, and NaN (found among the flagged items below)
        flagged = np.uint32(0)
        for j in range(cols):
            f = np.uint8(0) if row[j] > hi else np.uint8(1)
            flags[j] = f
            flagged += f
        n = np.int64(flagged)
        if n == 0:
            continue
        if p == 0:  # only -inf and NaN items are flagged
            for t in range(_compact(words, flags, relevant, padded // 8)):
                if row[relevant[t]] != row[relevant[t]]:
                    return True
            continue
        lo = sorted_d[r, 0]
        bucket = counts[r]
        cells = min(max(n // CELL_ITEMS, MIN_CELLS), MAX_CELLS)
        span = np.float64(hi) - np.float64(lo)
        scale = (cells - 0.5) / span if span > 0.0 else 0.0
        if n <= 2 * MIN_CELLS or not (np.isfinite(span) and np.isfinite(scale)):
            for t in range(_compact(words, flags, relevant, padded // 8)):
                j = relevant[t]
                d = row[j]
                if d != d:
                    return True
                bucket[0 if d < lo else _bucket_before(sorted_d, sorted_col, r, 0, p, d, col0 + j)] += 1
            continue
        # The positives' cells: the last one's is `cells` (its x is about cells + 0.5), so the top cell holds only
        # items after every positive; items below lo land in cell 0 (or, rounding, in the first positive's cell).
        start[: cells + 3] = 0
        for k in range(p):
            start[_cell_of(sorted_d[r, k], lo, scale, cells) + 1] += 1
        for c in range(cells + 2):
            start[c + 1] += start[c]
            shared[c] = start[c + 1] > start[c]
        dense = n * DENSE_SHARE > cols
        bad = False
        if dense:
            m = cols
            for j in range(cols):
                keys[j] = _cell_of(row[j], lo, scale, cells)
                bad |= row[j] != row[j]
        else:
            m = _compact(words, flags, relevant, padded // 8)
            for i in range(m):
                keys[i] = _cell_of(row[relevant[i]], lo, scale, cells)
                bad |= row[relevant[i]] != row[relevant[i]]
        if bad:
            return True  # the caller raises: no count matters any more
        hist[:, : cells + 2] = 0
        for i in range(m):
            c = keys[i]
            hist[i & 3, c] += 1
            flags[i] = shared[c]
        flags[m:padded] = 0
        for c in range(cells + 1):  # a cell without a positive: one bucket for all its items
            if not shared[c]:
                bucket[start[c]] += hist[0, c] + hist[1, c] + hist[2, c] + hist[3, c]
        for t in range(_compact(words, flags, marked, (m + 7) // 8)):  # a positive's cell: exact comparisons
            i = marked[t]
            j = i if dense else relevant[i]
            c = keys[i]
            bucket[_bucket_before(sorted_d, sorted_col, r, start[c], start[c + 1], row[j], col0 + j)] += 1
    return False


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
