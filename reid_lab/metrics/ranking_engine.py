"""The sort-free ranking engine: per-query kept-ranks of the positives, and AP / INP / first match from them.

Used by :func:`reid_lab.metrics.rank.evaluate_rank` and :func:`reid_lab.metrics.distance.evaluate_features`
(:class:`GalleryRanker`) and by :class:`reid_lab.metrics.backfill_rank.BackfillRanker` (its pid index, the
cell-prefix walk :func:`count_cell_prefix` and the AP/INP routine :func:`query_stats_from_kept_ranks`). The
protocol (junk removal, skipped queries, the tie rule) is stated in :mod:`reid_lab.metrics.rank`.

Only the kept-ranks of the positives matter, so instead of sorting whole rows the engine sorts the few positive
distances of each query, counts how many gallery items fall before each positive (a histogram over a monotone
quantisation of the row, exact comparisons, tie rule included, only for the few items sharing a cell with a
positive), and reads the kept-ranks off the cumulative counts. Work is O(num_gallery) per query, memory
O(chunk_size * num_gallery); no ``num_query x num_gallery`` index matrix is ever built. Runs on whatever device
the distance matrix lives on. On a Market-sized 3,368 x 15,913 matrix it takes ~0.3 s of one CPU core, ~1/5 of
``np.argsort`` of the matrix alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "GalleryRanker",
    "QueryStats",
    "count_cell_prefix",
    "flatnonzero",
    "float_distances",
    "query_stats_from_kept_ranks",
]


@dataclass(frozen=True)
class QueryStats:
    """Per-query ranking statistics for a block of queries, before averaging.

    Attributes:
        num_positives: ``(num_query,)`` int64, number of positives left after junk removal (0 = invalid query).
        first_match_rank: ``(num_query,)`` int64, 0-based kept-rank of the first positive, -1 if invalid.
        ap: ``(num_query,)`` float64 average precision, NaN if invalid.
        inp: ``(num_query,)`` float64 inverse negative penalty, NaN if invalid.
    """

    num_positives: np.ndarray
    first_match_rank: np.ndarray
    ap: np.ndarray
    inp: np.ndarray

    @staticmethod
    def concat(parts: Sequence[QueryStats]) -> QueryStats:
        """Concatenate the stats of consecutive query blocks."""
        return QueryStats(
            num_positives=np.concatenate([p.num_positives for p in parts]),
            first_match_rank=np.concatenate([p.first_match_rank for p in parts]),
            ap=np.concatenate([p.ap for p in parts]),
            inp=np.concatenate([p.inp for p in parts]),
        )



def query_stats_from_kept_ranks(kept_rank: torch.Tensor, num_pos: torch.Tensor) -> QueryStats:
    """Per-query first match, AP and INP from the 0-based kept-ranks of each query's positives.

    The one AP / INP routine of the engine (:class:`GalleryRanker` and
    :class:`~reid_lab.metrics.backfill_rank.BackfillRanker` both end here, so equal ranks give bit-identical
    numbers). With ``r_1 < ... < r_n`` the 1-based kept-ranks of a query's ``n = |G|`` positives:
    ``AP = (1/n) * sum_j j / r_j`` and ``INP = n / r_n`` (Ye et al., TPAMI 2021). float64 throughout.

    Args:
        kept_rank: ``(num_query, max_pos)`` integer; row ``i`` holds the ascending 0-based kept-ranks of its
            ``num_pos[i]`` positives in its first ``num_pos[i]`` entries (the rest is ignored).
        num_pos: ``(num_query,)`` int64 positives per query (0: the query is skipped, its stats are -1 / NaN).

    Returns:
        :class:`QueryStats` (numpy, on the CPU).

    Example:
        >>> s = query_stats_from_kept_ranks(torch.tensor([[0, 2], [1, 7]]), torch.tensor([2, 1]))
        >>> s.first_match_rank.tolist(), s.ap.round(4).tolist(), s.inp.round(4).tolist()
        ([0, 1], [0.8333, 0.5], [0.6667, 0.5])
    """
    num_query, max_pos = kept_rank.shape
    first = np.full(num_query, -1, dtype=np.int64)
    ap = np.full(num_query, np.nan, dtype=np.float64)
    inp = np.full(num_query, np.nan, dtype=np.float64)
    if max_pos == 0:
        return QueryStats(num_pos.cpu().numpy(), first, ap, inp)
    kept = kept_rank.to(torch.float64)
    j = torch.arange(1, max_pos + 1, device=kept.device, dtype=torch.float64)
    is_pos = j[None, :] <= num_pos[:, None]
    precision = torch.where(is_pos, j[None, :] / (kept + 1.0), torch.zeros((), dtype=torch.float64))
    num_pos_f = num_pos.to(torch.float64)
    ap_t = precision.sum(1) / num_pos_f
    last = kept.gather(1, (num_pos - 1).clamp(min=0)[:, None])[:, 0]
    inp_t = num_pos_f / (last + 1.0)
    valid = (num_pos > 0).cpu().numpy()
    first[valid] = kept_rank[:, 0].cpu().numpy().astype(np.int64)[valid]
    ap[valid] = ap_t.cpu().numpy()[valid]
    inp[valid] = inp_t.cpu().numpy()[valid]
    return QueryStats(num_pos.cpu().numpy(), first, ap, inp)


def float_distances(dist: torch.Tensor) -> torch.Tensor:
    """Contiguous float32/float64 view or copy of ``dist`` with the same ordering of values."""
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()  # exact: every half value is representable in float32
    elif not dist.dtype.is_floating_point:
        dist = dist.double()  # integer distances: exact below 2**53
    return dist.contiguous()

class GalleryRanker:
    """Sort-free per-query ranking statistics against one gallery; the core of
    :func:`reid_lab.metrics.rank.evaluate_rank`.

    Holds the gallery ids grouped by pid, so the positives and junk items of a query are found without a dense
    ``num_query x num_gallery`` comparison. Call it on blocks of query rows (also on distance blocks computed on
    the fly, see :func:`reid_lab.metrics.evaluate_features`).

    Algorithm, per query: sort its positives by ``(distance, gallery index)``; give every gallery item ``x`` the
    bucket ``b(x)`` = number of positives ranked before it. The items ranked before positive ``j`` (0-based in
    that order) are exactly the other items with ``b <= j``, so its 0-based kept-rank is
    ``#{x : b(x) <= j} - 1 - #{junk x : b(x) <= j}``. Only the histogram of ``b`` is needed. It is built from a
    monotone quantisation of each row into ``num_cells`` cells spanning the positives' distances: a cell without a
    positive maps to one bucket exactly (monotone map: cells order like distances), and only the few items that
    share a cell with a positive are compared with those positives one by one, with the tie rule (equal distance:
    smaller gallery index first). Blocks whose positives include an infinite distance take an exact dense
    ``torch.searchsorted`` path instead.

    Args:
        g_pids: ``(num_gallery,)`` int64 gallery pids.
        g_camids: ``(num_gallery,)`` int64 gallery camera ids, same device (ReID protocol: same-pid same-camera
            items are junk); ``None`` for the cross-modal protocol (no junk, queries carry no camera ids).
        num_cells: quantisation cells per row; ``None`` picks ``clamp(num_gallery // 8, 64, 4096)`` (fewer cells:
            smaller tables, more items to compare exactly; results never depend on it).

    Example:
        >>> ranker = GalleryRanker(torch.tensor([1, 2, 3, 1, 1]), torch.tensor([1, 1, 1, 1, 0]))
        >>> s = ranker(torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.3]]), torch.tensor([1]), torch.tensor([0]))
        >>> s.first_match_rank.tolist(), s.ap.round(4).tolist(), s.inp.round(4).tolist()
        ([0], [0.8333], [0.6667])
    """

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor | None, num_cells: int | None = None) -> None:
        self.num_gallery = int(g_pids.shape[0])
        self.g_camids = g_camids
        self.num_cells = num_cells or min(max(self.num_gallery // 8, 64), 4096)
        self._buffers: dict[str, torch.Tensor] = {}
        order = torch.argsort(g_pids, stable=True)  # within a pid, gallery indices stay ascending
        self._order = order
        self._uniq, counts = torch.unique_consecutive(g_pids[order], return_counts=True)
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    def _buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A reusable scratch tensor shaped like ``like`` (saves a page-faulting allocation per block)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < like.numel() or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(like.numel(), dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf[: like.numel()].view(like.shape)

    def same_pid_pairs(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, gallery index)`` of every pair of a query row and a gallery item of its pid (positives and
        junk alike), sorted by row then gallery index; found through the gallery grouped by pid, no dense
        ``(rows, num_gallery)`` comparison."""
        device = q_pids.device
        at = torch.searchsorted(self._uniq, q_pids).clamp(max=self._uniq.numel() - 1)
        count = torch.where(self._uniq[at] == q_pids, self._counts[at], 0)
        rows = torch.repeat_interleave(torch.arange(q_pids.numel(), device=device), count)
        offset = torch.arange(rows.numel(), device=device) - (torch.cumsum(count, 0) - count)[rows]
        return rows, self._order[self._starts[at][rows] + offset]

    def positive_and_junk_pairs(
        self, q_pids: torch.Tensor, q_camids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pos_rows, pos_cols, junk_rows, junk_cols)`` of a block of queries, each sorted by row then col.

        Junk = same pid and same camera (ReID protocol); without camera ids every same-pid pair is a positive.

        Raises:
            ValueError: if exactly one of the gallery and the queries has camera ids.
        """
        if (q_camids is None) != (self.g_camids is None):
            raise ValueError(
                "query and gallery camera ids must both be given (ReID protocol) or both be None (cross-modal "
                f"protocol), got q_camids {'None' if q_camids is None else 'given'} and g_camids "
                f"{'None' if self.g_camids is None else 'given'}"
            )
        rows, cols = self.same_pid_pairs(q_pids)
        if q_camids is None or self.g_camids is None:
            empty = rows[:0]
            return rows, cols, empty, empty
        junk = q_camids[rows] == self.g_camids[cols]
        return rows[~junk], cols[~junk], rows[junk], cols[junk]

    def __call__(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor | None = None) -> QueryStats:
        """Per-query stats of one block of query rows.

        Args:
            dist: ``(num_query, num_gallery)`` float32/float64 distances, on the gallery ids' device.
            q_pids: ``(num_query,)`` int64 query pids.
            q_camids: ``(num_query,)`` int64 query camera ids; ``None`` exactly when the gallery has none.
        """
        if dist.dim() != 2 or dist.shape[1] != self.num_gallery:
            raise ValueError(f"dist must have shape (num_query, {self.num_gallery}), got {tuple(dist.shape)}")
        dist = float_distances(dist)
        num_query, num_gallery = dist.shape
        device = dist.device
        pos_rows, pos_cols, junk_rows, junk_cols = self.positive_and_junk_pairs(q_pids, q_camids)
        num_pos = torch.bincount(pos_rows, minlength=num_query)
        max_pos = int(num_pos.max()) if pos_rows.numel() else 0
        if max_pos == 0:
            _check_no_nan(dist)
            return query_stats_from_kept_ranks(num_pos.new_zeros((num_query, 0)), num_pos)

        # Positives sorted by (row, distance, col): stable sort by distance, then stable sort by row.
        pos_d = dist[pos_rows, pos_cols]
        order = torch.argsort(pos_d, stable=True)
        order = order[torch.argsort(pos_rows[order], stable=True)]
        pos_rows, pos_cols, pos_d = pos_rows[order], pos_cols[order], pos_d[order]
        slot = torch.arange(pos_rows.numel(), device=device) - (torch.cumsum(num_pos, 0) - num_pos)[pos_rows]
        # Padding sorts after every real positive: +inf distance and gallery index num_gallery.
        sorted_d = torch.full((num_query, max_pos), float("inf"), dtype=dist.dtype, device=device)
        sorted_d[pos_rows, slot] = pos_d
        sorted_col = torch.full((num_query, max_pos), num_gallery, dtype=torch.int64, device=device)
        sorted_col[pos_rows, slot] = pos_cols

        if bool(torch.isfinite(pos_d).all()):
            counts, junk_bucket = self._cell_histogram(dist, sorted_d, sorted_col, num_pos, junk_rows, junk_cols)
        else:
            counts, junk_bucket = _searchsorted_histogram(dist, sorted_d, sorted_col, junk_rows, junk_cols)

        width = max_pos + 1
        junk_counts = torch.bincount(junk_rows * width + junk_bucket, minlength=num_query * width)
        before = counts.cumsum(1) - junk_counts.view(num_query, width).cumsum(1)
        return query_stats_from_kept_ranks(before[:, :max_pos] - 1, num_pos)

    def _cell_histogram(
        self,
        dist: torch.Tensor,
        sorted_d: torch.Tensor,
        sorted_col: torch.Tensor,
        num_pos: torch.Tensor,
        junk_rows: torch.Tensor,
        junk_cols: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket histogram ``(num_query, max_pos + 1)`` and the buckets of the junk items (finite positives)."""
        num_query, num_gallery = dist.shape
        max_pos = sorted_d.shape[1]
        device = dist.device
        cells = self.num_cells
        width = cells + 2  # cell 0: below the first positive's cell range, cell cells + 1: above
        has_pos = num_pos > 0
        lo = torch.where(has_pos, sorted_d[:, 0], 0)
        hi = torch.where(has_pos, sorted_d.gather(1, (num_pos - 1).clamp(min=0)[:, None])[:, 0], 0)
        span = (hi.double() - lo.double())
        finfo = torch.finfo(dist.dtype)
        # Any positive finite scale gives a monotone map; this one spreads [lo, hi] over cells 1 .. cells, so
        # cells 0 and cells + 1 (below / above all positives) hold no positive.
        scale = torch.where(span > 0, (cells - 1) / span, 1.0).clamp(finfo.tiny, finfo.max).to(dist.dtype)
        # key = trunc(clamp((d - lo) * scale + 1, 0, cells + 1)): every step is a correctly rounded, monotone
        # non-decreasing function of d, so d1 <= d2 implies key1 <= key2 exactly (no fused multiply-add).
        key_f = torch.sub(dist, lo[:, None], out=self._buffer("key_f", dist, dist.dtype))
        key_f.mul_(scale[:, None]).add_(1.0).clamp_(0.0, cells + 1.0)
        if bool(torch.isnan(key_f.max())):
            raise ValueError("distmat contains NaN; distances must be comparable numbers")
        key_dtype = torch.int32 if num_query * width < 2**31 else torch.int64
        key = self._buffer("key", dist, key_dtype).copy_(key_f)
        key.add_((torch.arange(num_query, device=device, dtype=key_dtype) * width)[:, None])
        flat_key = key.view(-1)

        cell_items = torch.bincount(flat_key, minlength=num_query * width)
        real = sorted_col < num_gallery
        row_base = torch.arange(num_query, device=device)[:, None] * num_gallery
        cell_pos = torch.bincount(flat_key[(row_base + sorted_col)[real]].long(), minlength=num_query * width)
        cell_lo = (cell_pos.view(num_query, width).cumsum(1) - cell_pos.view(num_query, width)).view(-1)

        # Cells without a positive: all their items share the bucket "positives in earlier cells".
        counts = torch.zeros((num_query, max_pos + 1), dtype=torch.int64, device=device)
        clear = torch.where(cell_pos == 0, cell_items, 0).view(num_query, width)
        counts.scatter_add_(1, cell_lo.view(num_query, width), clear)
        counts = counts.view(-1)

        # Items sharing a cell with a positive (the positives included): exact comparison.
        shared = flatnonzero(torch.index_select(cell_pos > 0, 0, flat_key))
        shared_keys = flat_key.index_select(0, shared).long()
        junk_flat = junk_rows * num_gallery + junk_cols
        junk_keys = flat_key.index_select(0, junk_flat).long()
        del key, flat_key
        tables = (dist.view(-1), sorted_d.view(-1), sorted_col.view(-1), cell_lo, cell_pos, max_pos)
        shared_rows = shared // num_gallery
        bucket = _exact_bucket(tables, shared_rows, shared - shared_rows * num_gallery, shared, shared_keys)
        counts.index_add_(0, shared_rows * (max_pos + 1) + bucket, torch.ones_like(bucket))
        junk_bucket = _exact_bucket(tables, junk_rows, junk_cols, junk_flat, junk_keys)
        return counts.view(num_query, max_pos + 1), junk_bucket


def _exact_bucket(
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
    rows: torch.Tensor,
    cols: torch.Tensor,
    flat: torch.Tensor,
    keys: torch.Tensor,
) -> torch.Tensor:
    """Number of positives ranked before each item (``rows``, ``cols``; ``flat`` = row * num_gallery + col).

    ``keys`` are the items' flat cell indices. Positives in earlier cells all rank before; the ``cell_pos[key]``
    positives of the item's own cell (contiguous in sorted order from ``cell_lo[key]``) are compared one by one:
    a positive ranks first if its distance is smaller, or equal with a smaller gallery index.
    ``tables`` = (flat distances, flat sorted positive distances, flat sorted positive cols, cell_lo, cell_pos,
    max_pos); 1-d ``index_select`` everywhere because 2-d advanced indexing is several times slower on CPU.
    """
    dist_flat, sorted_d, sorted_col, cell_lo, cell_pos, max_pos = tables
    base = cell_lo.index_select(0, keys)
    remaining = cell_pos.index_select(0, keys)  # positives of the item's cell not yet compared
    value = dist_flat.index_select(0, flat)
    at = rows * max_pos + base
    bucket = base
    # The positives of a cell that rank before the item form a prefix of the cell (sorted by distance, then
    # col), so an item leaves the loop at its first "not before" or when its cell is exhausted.
    count_cell_prefix(sorted_d, sorted_col, at, remaining, value, cols, flatnonzero(remaining > 0), bucket)
    return bucket


def count_cell_prefix(
    sorted_d: torch.Tensor,
    sorted_col: torch.Tensor,
    at: torch.Tensor,
    remaining: torch.Tensor,
    value: torch.Tensor,
    col: torch.Tensor,
    active: torch.Tensor,
    count: torch.Tensor,
) -> None:
    """Add to ``count[i]`` how many sorted entries of item ``i``'s cell rank before it, in place.

    Item ``i`` (distance ``value[i]``, gallery index ``col[i]``) starts at sorted position ``at[i]`` with
    ``remaining[i]`` entries of its cell left; entries are sorted by (distance, gallery index), so those before
    the item form a prefix and an item leaves the loop at its first "not before" or when its cell is exhausted.
    ``at`` and ``remaining`` are advanced in place; only the items listed in ``active`` are walked.
    """
    while active.numel():
        at_a = at.index_select(0, active)
        pd, pc = sorted_d.index_select(0, at_a), sorted_col.index_select(0, at_a)
        v = value.index_select(0, active)
        before = (pd < v) | ((pd == v) & (pc < col.index_select(0, active)))
        active = active[before]
        count.index_add_(0, active, torch.ones_like(active))
        at.index_add_(0, active, torch.ones_like(active))
        remaining.index_add_(0, active, torch.full_like(active, -1))
        active = active[remaining.index_select(0, active) > 0]


def flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a 1-d bool tensor (numpy's is ~3x faster than torch's on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero()[:, 0]


def _searchsorted_histogram(
    dist: torch.Tensor,
    sorted_d: torch.Tensor,
    sorted_col: torch.Tensor,
    junk_rows: torch.Tensor,
    junk_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dense fallback of the cell histogram for blocks whose positives include inf distances."""
    _check_no_nan(dist)
    num_query = dist.shape[0]
    max_pos = sorted_d.shape[1]
    bucket = torch.searchsorted(sorted_d, dist)  # positives with a strictly smaller distance
    # Ties with positives: the tied positives are contiguous and sorted by col; count those with a smaller col.
    tie_rows, tie_cols = (sorted_d.gather(1, bucket.clamp(max=max_pos - 1)) == dist).nonzero(as_tuple=True)
    tie_bucket = bucket[tie_rows, tie_cols]
    extra = torch.zeros_like(tie_bucket)
    active = torch.ones_like(tie_bucket, dtype=torch.bool)
    value = dist[tie_rows, tie_cols]
    for step in range(max_pos):
        at = (tie_bucket + step).clamp(max=max_pos - 1)
        active &= (tie_bucket + step < max_pos) & (sorted_d[tie_rows, at] == value)
        active &= sorted_col[tie_rows, at] < tie_cols
        if not bool(active.any()):
            break
        extra += active
    bucket[tie_rows, tie_cols] = tie_bucket + extra
    junk_bucket = bucket[junk_rows, junk_cols]
    width = max_pos + 1
    flat = bucket + (torch.arange(num_query, device=dist.device) * width)[:, None]
    counts = torch.bincount(flat.view(-1), minlength=num_query * width).view(num_query, width)
    return counts, junk_bucket


def _check_no_nan(dist: torch.Tensor) -> None:
    if bool(torch.isnan(dist).any()):
        raise ValueError("distmat contains NaN; distances must be comparable numbers")
