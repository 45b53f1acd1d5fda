"""The sort-free ranking engine: per-query kept-ranks of the positives, and AP / INP / first match from them.

Used by :func:`reid_lab.metrics.rank.evaluate_rank` and :func:`reid_lab.metrics.distance.evaluate_features`
(:class:`GalleryRanker`) and by :class:`reid_lab.metrics.backfill_rank.BackfillRanker` (its pid index, the
cell-prefix walk :func:`count_cell_prefix` and the AP/INP routine :func:`query_stats_from_kept_ranks`). The
protocol (junk removal, skipped queries, the tie rule) is stated in :mod:`reid_lab.metrics.rank`.

Only the kept-ranks of the positives matter, so instead of sorting whole rows the engine sorts the few positive
distances of each query, counts how many gallery items fall before each positive (a histogram over a monotone
quantisation of the row, exact comparisons, tie rule included, only for the few items sharing a cell with a
positive), and reads the kept-ranks off the cumulative counts. Work is O(num_gallery) per query; the counts are
additive over gallery columns, so a block of queries can be fed its distances tile by tile (:class:`BlockRanking`:
memory O(rows * tile), whatever the gallery size); no ``num_query x num_gallery`` index matrix is ever built.
Items after a row's last positive change no kept-rank: when they are most of a tile (a good model, a large
gallery), only the others are bucketed. Ranking paths run on the cores other jobs leave free
(:func:`ranking_threads`). Runs on whatever device the distance matrix lives on: CPU tiles are counted by the
compiled kernel of :mod:`reid_lab.metrics.rank_kernel` (a few passes per row, ~0.4-3 ns per distance), other
devices by torch ops (~9 whole-tile ops, 3-5 ns per distance on a CPU); both give the same counts. On a
Market-sized 3,368 x 15,913 matrix the kernel counts every tile in ~0.13 s of one CPU core (2.5 % of the 2048-d
distance product); the torch path took ~0.24 s + its cell tables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from reid_lab.metrics.rank_kernel import add_tile_counts

__all__ = [
    "THREADS_ENV",
    "BlockRanking",
    "GalleryRanker",
    "QueryStats",
    "count_cell_prefix",
    "flatnonzero",
    "float_distances",
    "query_stats_from_kept_ranks",
    "ranking_threads",
    "shared_machine_threads",
]

THREADS_ENV = "REID_LAB_RANK_THREADS"
CELL_ITEMS, MAX_CELLS = 16, 4096  # default quantisation: a cell per CELL_ITEMS gallery items, at most MAX_CELLS
DENSE_ABOVE = 0.1  # share of relevant items in a tile above which the next tile is counted densely
SPREAD = 8  # overflow cells on each side of a row's positive cells (BlockRanking)
CPU_KERNEL = True  # CPU tiles are counted by the compiled kernel (rank_kernel); False: by the torch ops


def shared_machine_threads(requested: int | None = None) -> int:
    """Threads for a ranking path: ``min(torch's threads, cores left free by the 1-minute load average)``.

    On a 2-core box shared with other jobs, torch's default of one OpenMP thread per core made evaluation from
    features 1.7-2x slower than one thread (the threads spin-wait for a core at every parallel region; measured
    in ``benchmarks/README.md``), so a ranking path takes only the cores nobody else uses. This process counts as
    one busy core once it has run for a minute, hence the ``+ 1``. ``$REID_LAB_RANK_THREADS`` overrides: an
    integer, or ``torch`` (keep ``torch.get_num_threads()``). Results never depend on the thread count.
    """
    setting = os.environ.get(THREADS_ENV, "auto").strip().lower()
    torch_threads = torch.get_num_threads() if requested is None else requested
    if setting == "torch":
        return torch_threads
    if setting not in ("", "auto"):
        try:
            value = int(setting)
        except ValueError:
            raise ValueError(f"${THREADS_ENV} must be 'auto', 'torch' or a positive integer, got {setting!r}") from None
        if value < 1:
            raise ValueError(f"${THREADS_ENV} must be 'auto', 'torch' or a positive integer, got {setting!r}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    free = int(cores - os.getloadavg()[0] + 0.5) + 1
    return max(1, min(torch_threads, free))


@contextmanager
def ranking_threads() -> Iterator[int]:
    """Run the body with :func:`shared_machine_threads` torch threads, then restore torch's setting."""
    before = torch.get_num_threads()
    threads = shared_machine_threads(before)
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if threads != before:
            torch.set_num_threads(before)


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
    # A left-to-right running sum, read at the last positive: the same bits whatever max_pos is (a vectorised
    # row sum groups its terms by the row's length, so the AP would depend on which queries share a block).
    ap_t = precision.cumsum(1).gather(1, (num_pos - 1).clamp(min=0)[:, None])[:, 0] / num_pos_f
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
    smaller gallery index first). The items below / above every positive of a row go to ``SPREAD`` overflow cells
    on each side, by gallery column, so the bulk of a row does not hammer one histogram counter. Items after the
    row's last positive change no kept-rank: a tile where at most ``DENSE_ABOVE`` of the items come before it is
    counted from those items alone (one comparison pass over the tile), else every item is bucketed; the previous
    tile's share picks which way is tried first. Blocks whose positives include an infinite distance take an exact
    dense ``torch.searchsorted`` path instead.

    Args:
        g_pids: ``(num_gallery,)`` int64 gallery pids.
        g_camids: ``(num_gallery,)`` int64 gallery camera ids, same device (ReID protocol: same-pid same-camera
            items are junk); ``None`` for the cross-modal protocol (no junk, queries carry no camera ids).
        num_cells: quantisation cells per row of the torch path; ``None``: :meth:`default_cells` (fewer cells:
            smaller tables, more items to compare exactly; results never depend on it).
        kernel: count CPU tiles with the compiled kernel (:mod:`reid_lab.metrics.rank_kernel`, one pass per row,
            3-5x fewer nanoseconds per distance) instead of the torch ops, which stay the path for other devices;
            ``None``: ``CPU_KERNEL``. Both give the same counts, hence the same bits.

    Example:
        >>> ranker = GalleryRanker(torch.tensor([1, 2, 3, 1, 1]), torch.tensor([1, 1, 1, 1, 0]))
        >>> s = ranker(torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.3]]), torch.tensor([1]), torch.tensor([0]))
        >>> s.first_match_rank.tolist(), s.ap.round(4).tolist(), s.inp.round(4).tolist()
        ([0], [0.8333], [0.6667])
    """

    def __init__(
        self,
        g_pids: torch.Tensor,
        g_camids: torch.Tensor | None,
        num_cells: int | None = None,
        kernel: bool | None = None,
    ) -> None:
        self.num_gallery = int(g_pids.shape[0])
        self.kernel = CPU_KERNEL if kernel is None else kernel
        self.g_camids = g_camids
        self.num_cells = num_cells or self.default_cells(self.num_gallery)
        self._buffers: dict[str, torch.Tensor] = {}
        self._bounds: dict[str, object] = {}
        self._dense_next = False  # how BlockRanking counts the next tile (from the last one's relevant share)
        order = torch.argsort(g_pids, stable=True)  # within a pid, gallery indices stay ascending
        self._order = order
        self._uniq, counts = torch.unique_consecutive(g_pids[order], return_counts=True)
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    @staticmethod
    def default_cells(num_gallery: int) -> int:
        """Quantisation cells per row when none are given: ``clamp(num_gallery // CELL_ITEMS, 64, MAX_CELLS)``."""
        return min(max(num_gallery // CELL_ITEMS, 64), MAX_CELLS)

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
        pairs = self.positive_and_junk_pairs(q_pids, q_camids)
        pos_rows, pos_cols, junk_rows, junk_cols = pairs
        block = self.start(dist.shape[0], pairs, dist[pos_rows, pos_cols], dist[junk_rows, junk_cols])
        block.add_tile(dist, 0)
        return block.finish()

    def start(
        self,
        num_query: int,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        pos_d: torch.Tensor,
        junk_d: torch.Tensor,
    ) -> BlockRanking:
        """A :class:`BlockRanking` for a block of ``num_query`` rows whose gallery columns arrive in tiles.

        Args:
            num_query: rows of the block.
            pairs: :meth:`positive_and_junk_pairs` of the block's queries.
            pos_d: distances of the positive pairs, bit-identical to what the tiles will hold for them.
            junk_d: distances of the junk pairs, likewise.
        """
        return BlockRanking(self, num_query, pairs, pos_d, junk_d)


class BlockRanking:
    """The ranking of one block of query rows, fed gallery-column tile by tile (bounded memory at any gallery).

    The positives' (and junk items') distances are known up front, so the thresholds (sorted positives) and the
    quantisation of each row are fixed before any tile arrives; each tile then only adds to per-row histograms
    (the cell counts, and the exact buckets of the items sharing a cell with a positive), which are additive over
    columns. :meth:`finish` turns the histograms into kept-ranks. The result does not depend on the tiling.
    Built by :meth:`GalleryRanker.start`.
    """

    def __init__(
        self,
        ranker: GalleryRanker,
        num_query: int,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        pos_d: torch.Tensor,
        junk_d: torch.Tensor,
    ) -> None:
        pos_rows, pos_cols, junk_rows, junk_cols = pairs
        self.ranker = ranker
        self.num_query = num_query
        num_gallery = ranker.num_gallery
        device = pos_rows.device
        self.num_pos = num_pos = torch.bincount(pos_rows, minlength=num_query)
        self.max_pos = max_pos = int(num_pos.max()) if pos_rows.numel() else 0
        self.junk_rows, self.junk_cols, self.junk_d = junk_rows, junk_cols, junk_d
        if max_pos == 0:
            return
        # Positives sorted by (row, distance, col): stable sort by distance, then stable sort by row.
        order = torch.argsort(pos_d, stable=True)
        order = order[torch.argsort(pos_rows[order], stable=True)]
        pos_rows, pos_cols, pos_d = pos_rows[order], pos_cols[order], pos_d[order]
        slot = torch.arange(pos_rows.numel(), device=device) - (torch.cumsum(num_pos, 0) - num_pos)[pos_rows]
        # Padding sorts after every real positive: +inf distance and gallery index num_gallery.
        self.sorted_d = torch.full((num_query, max_pos), float("inf"), dtype=pos_d.dtype, device=device)
        self.sorted_d[pos_rows, slot] = pos_d
        self.sorted_col = torch.full((num_query, max_pos), num_gallery, dtype=torch.int64, device=device)
        self.sorted_col[pos_rows, slot] = pos_cols
        self.counts = torch.zeros(num_query * (max_pos + 1), dtype=torch.int64, device=device)
        # The compiled kernel counts buckets directly (any distances, inf included): no cell tables to build.
        self.kernel = ranker.kernel and device.type == "cpu"
        self.finite = bool(torch.isfinite(pos_d).all())
        if not self.finite or self.kernel:
            return
        cells = ranker.num_cells
        # Cells SPREAD .. SPREAD + cells - 1 span the positives' distances; the SPREAD cells on each side hold the
        # items below / above every positive, spread over SPREAD cells by gallery column so that the bulk of a
        # row (typically after its last positive) does not fall into one hot histogram cell.
        self.width = width = cells + 2 * SPREAD
        sorted_d = self.sorted_d
        dtype = sorted_d.dtype
        has_pos = num_pos > 0
        lo = torch.where(has_pos, sorted_d[:, 0], 0)
        hi = torch.where(has_pos, sorted_d.gather(1, (num_pos - 1).clamp(min=0)[:, None])[:, 0], 0)
        span = (hi.double() - lo.double())
        finfo = torch.finfo(dtype)
        # Any positive finite scale gives a monotone map; this one spreads [lo, hi] over [0, cells - 1].
        scale = torch.where(span > 0, (cells - 1) / span, 1.0).clamp(finfo.tiny, finfo.max).to(dtype)
        self.lo, self.scale = lo, scale
        # Spreading needs every positive inside the bounds: a span that overflows the dtype makes (d - lo) infinite
        # for the farthest positives, which must then share the top cell (exact comparisons), as items at inf do.
        self.spread = bool(torch.isfinite(hi - lo).all())
        self.last = torch.where(has_pos, hi, float("-inf"))  # the last positive's distance (-inf: no positive)
        # The row offset is added in the float key when the flat key stays exactly representable (one pass
        # fewer), else to the integer key.
        rows = torch.arange(num_query, device=device)
        self.float_offset = dtype == torch.float64 or num_query * width <= 2**24
        self.float_add = (SPREAD + rows * width if self.float_offset else torch.full_like(rows, SPREAD)).to(dtype)
        self.int_add = None if self.float_offset else rows * width
        self.key_dtype = torch.int32 if num_query * width < 2**31 else torch.int64
        # The positives' cells, from their distances through the same elementwise steps as the tiles' items.
        self.cell_pos = torch.bincount(self._keys(pos_d, pos_rows, pos_cols), minlength=num_query * width)
        self.cell_lo = (self.cell_pos.view(num_query, width).cumsum(1) - self.cell_pos.view(num_query, width)).view(-1)
        self.shared_cell = self.cell_pos > 0
        self.cell_items: torch.Tensor | None = None

    def _clamp_bounds(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per gallery column, the bounds of the scaled distance ``(d - lo) * scale``: ``[s - SPREAD, cells + s]``
        with ``s = col % SPREAD``. They never bind inside ``[lo, hi]`` (scaled ``[0, cells - 1]``), so a clamped
        item lies strictly below / above every positive of its row, whichever overflow cell it lands in. When
        ``hi - lo`` overflows the dtype, ``s = SPREAD - 1`` for every column (one overflow cell per side)."""
        spread = (cols % SPREAD if self.spread else torch.full_like(cols, SPREAD - 1)).to(self.lo.dtype)
        return spread - SPREAD, spread + self.ranker.num_cells

    def _keys(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """Flat cell index ``row * width + key`` of items with distances ``values`` in rows ``rows`` and gallery
        columns ``cols`` (1-d): the elementwise steps of :meth:`_add_dense`, item by item. ``cols=None`` (items at
        or before their row's last positive only) clamps to the overflow cell next to the positives' range instead
        of spreading by column: the same buckets, since no positive lies in an overflow cell."""
        key_f = (values - self.lo.index_select(0, rows)).mul_(self.scale.index_select(0, rows))
        if cols is None and self.spread:
            key_f = key_f.clamp_(-1.0, self.ranker.num_cells)
        else:  # without spreading (an overflowing span) the bounds do not depend on the column
            low, high = self._clamp_bounds(cols if cols is not None else rows.new_zeros(()))
            key_f = torch.clamp(key_f, low, high)
        key_f = key_f.add_(self.float_add.index_select(0, rows))
        key = key_f.to(torch.int64)
        return key if self.int_add is None else key.add_(self.int_add.index_select(0, rows))

    def add_tile(self, tile: torch.Tensor, col0: int) -> None:
        """Count the gallery columns ``col0 : col0 + tile.shape[1]`` of the block.

        Args:
            tile: ``(num_query, cols)`` contiguous float32/float64 distances of those columns (not written).
            col0: gallery index of the tile's first column.
        """
        if self.max_pos == 0:
            _check_no_nan(tile)
        elif self.kernel:
            add_tile_counts(tile, col0, self.sorted_d, self.sorted_col, self.num_pos,
                            self.counts.view(self.num_query, self.max_pos + 1), torch.get_num_threads())
        elif self.finite:
            self._add_cells(tile, col0)
        else:
            self._add_searchsorted(tile, col0)

    def _add_cells(self, tile: torch.Tensor, col0: int) -> None:
        if tile.numel() and bool(torch.isnan(tile.max())):
            raise ValueError("distmat contains NaN; distances must be comparable numbers")
        ranker = self.ranker
        # Two exact ways to count a tile: only the relevant items (those at or before their row's last positive)
        # when they are few, else every item through the cell histogram. The previous tile's share of relevant
        # items picks which to try first; the relevant-only way falls back before allocating anything per item.
        if not ranker._dense_next:
            relevant = torch.le(tile, self.last[:, None], out=ranker._buffer("relevant", tile, torch.bool))
            count = int(np.count_nonzero(relevant.numpy())) if relevant.device.type == "cpu" else int(relevant.sum())
            if count <= DENSE_ABOVE * tile.numel():
                self._add_relevant(tile, col0, relevant)
                return
        ranker._dense_next = self._add_dense(tile, col0) > DENSE_ABOVE * tile.numel()

    def _add_dense(self, tile: torch.Tensor, col0: int) -> int:
        """Bucket every item of the tile; returns how many are not in a row's top overflow cells."""
        num_query, cols = tile.shape
        width, ranker = self.width, self.ranker
        # key = trunc(clamp((d - lo) * scale, low, high) + offset): every step is a correctly rounded, monotone
        # non-decreasing function of d, so d1 <= d2 implies key1 <= key2 within a column (no fused multiply-add);
        # the column-wise bounds only move items that are below / above every positive (see _clamp_bounds).
        key_f = torch.sub(tile, self.lo[:, None], out=ranker._buffer("key_f", tile, tile.dtype))
        key_f.mul_(self.scale[:, None])
        low, high = self._tile_bounds(col0, cols, tile.device)
        key_f.clamp_(low, high).add_(self.float_add[:, None])
        key = ranker._buffer("key", tile, self.key_dtype).copy_(key_f)
        if self.int_add is not None:
            key.add_(self.int_add.to(self.key_dtype)[:, None])
        flat_key = key.view(-1)
        counted = self._count(flat_key)
        # Items sharing a cell with a positive (the positives included): exact comparison.
        shared = flatnonzero(torch.index_select(self.shared_cell, 0, flat_key))
        if shared.numel():
            rows = shared // cols
            self._add_exact(rows, shared - rows * cols + col0, tile.view(-1).index_select(0, shared),
                            flat_key.index_select(0, shared).long())
        return tile.numel() - int(counted.view(num_query, width)[:, width - SPREAD :].sum())

    def _add_relevant(self, tile: torch.Tensor, col0: int, relevant: torch.Tensor) -> None:
        """Bucket only the items at or before their row's last positive (``relevant``, ``d <= hi``): the others
        rank after every positive and change no kept-rank."""
        cols = tile.shape[1]
        index = flatnonzero(relevant.view(-1))
        if index.numel() == 0:
            return
        rows = torch.div(index, cols, rounding_mode="floor")
        gallery_cols = index - rows * cols + col0
        values = tile.view(-1).index_select(0, index)
        keys = self._keys(values, rows, None)  # few items: no hot cell to spread
        self._count(keys)
        shared = flatnonzero(torch.index_select(self.shared_cell, 0, keys))
        if shared.numel():
            self._add_exact(rows.index_select(0, shared), gallery_cols.index_select(0, shared),
                            values.index_select(0, shared), keys.index_select(0, shared))

    def _count(self, flat_keys: torch.Tensor) -> torch.Tensor:
        """Add the items of flat cell indices ``flat_keys`` to the cell histogram; returns this tile's counts."""
        counted = torch.bincount(flat_keys, minlength=self.num_query * self.width)
        if self.cell_items is None:
            self.cell_items = counted
        else:
            self.cell_items += counted
        return counted

    def _add_exact(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, keys: torch.Tensor) -> None:
        """Count items sharing a cell with a positive (row, gallery column, distance, int64 flat key) in their
        exact buckets."""
        bucket = self._exact_bucket(rows, cols, values, keys)
        self.counts.index_add_(0, rows * (self.max_pos + 1) + bucket, torch.ones_like(bucket))

    def _tile_bounds(self, col0: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_clamp_bounds` of gallery columns ``col0 : col0 + cols`` as ``(1, cols)`` rows (cached)."""
        cache = self.ranker._bounds
        at = (col0, cols, self.lo.dtype, self.ranker.num_cells, self.spread, device)
        if cache.get("at") != at:
            low, high = self._clamp_bounds(torch.arange(col0, col0 + cols, device=device))
            cache.update(at=at, low=low[None, :], high=high[None, :])
        return cache["low"], cache["high"]

    def _exact_bucket(
        self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """Number of positives ranked before each item (``rows``, gallery index ``cols``, distance ``values``).

        ``keys`` are the items' flat cell indices. Positives in earlier cells all rank before; the ``cell_pos[key]``
        positives of the item's own cell (contiguous in sorted order from ``cell_lo[key]``) are compared one by
        one: a positive ranks first if its distance is smaller, or equal with a smaller gallery index. 1-d
        ``index_select`` everywhere because 2-d advanced indexing is several times slower on CPU.
        """
        base = self.cell_lo.index_select(0, keys)
        remaining = self.cell_pos.index_select(0, keys)  # positives of the item's cell not yet compared
        at = rows * self.max_pos + base
        bucket = base
        # The positives of a cell that rank before the item form a prefix of the cell (sorted by distance, then
        # col), so an item leaves the loop at its first "not before" or when its cell is exhausted.
        count_cell_prefix(self.sorted_d.view(-1), self.sorted_col.view(-1), at, remaining, values, cols,
                          flatnonzero(remaining > 0), bucket)
        return bucket

    def _add_searchsorted(self, tile: torch.Tensor, col0: int) -> None:
        """Exact dense path for blocks whose positives include inf distances."""
        _check_no_nan(tile)
        num_query = tile.shape[0]
        bucket = torch.searchsorted(self.sorted_d, tile)  # positives with a strictly smaller distance
        tie_rows, tie_cols = (self.sorted_d.gather(1, bucket.clamp(max=self.max_pos - 1)) == tile).nonzero(
            as_tuple=True)
        tie_bucket = bucket[tie_rows, tie_cols]
        bucket[tie_rows, tie_cols] = self._tie_bucket(tie_rows, tie_cols + col0, tile[tie_rows, tie_cols], tie_bucket)
        width = self.max_pos + 1
        flat = bucket + (torch.arange(num_query, device=tile.device) * width)[:, None]
        self.counts += torch.bincount(flat.view(-1), minlength=num_query * width)

    def _tie_bucket(
        self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, bucket: torch.Tensor
    ) -> torch.Tensor:
        """Add to ``bucket`` (positives strictly closer) the tied positives with a smaller gallery index."""
        max_pos = self.max_pos
        extra = torch.zeros_like(bucket)
        active = torch.ones_like(bucket, dtype=torch.bool)
        for step in range(max_pos):
            at = (bucket + step).clamp(max=max_pos - 1)
            active &= (bucket + step < max_pos) & (self.sorted_d[rows, at] == values)
            active &= self.sorted_col[rows, at] < cols
            if not bool(active.any()):
                break
            extra += active
        return bucket + extra

    def finish(self) -> QueryStats:
        """Per-query stats once every gallery column was added."""
        num_query, max_pos, num_pos = self.num_query, self.max_pos, self.num_pos
        if max_pos == 0:
            return query_stats_from_kept_ranks(num_pos.new_zeros((num_query, 0)), num_pos)
        width = max_pos + 1
        counts = self.counts.view(num_query, width)
        junk_rows, junk_cols, junk_d = self.junk_rows, self.junk_cols, self.junk_d
        if self.finite and not self.kernel:
            # Cells without a positive: all their items share the bucket "positives in earlier cells".
            items = self.cell_items if self.cell_items is not None else torch.zeros_like(self.cell_pos)
            clear = torch.where(self.cell_pos == 0, items, 0).view(num_query, self.width)
            counts.scatter_add_(1, self.cell_lo.view(num_query, self.width), clear)
            junk_bucket = self._exact_bucket(junk_rows, junk_cols, junk_d, self._keys(junk_d, junk_rows, junk_cols))
        else:
            rows_d = self.sorted_d.index_select(0, junk_rows)
            junk_bucket = torch.searchsorted(rows_d, junk_d[:, None])[:, 0]
            junk_bucket = self._tie_bucket(junk_rows, junk_cols, junk_d, junk_bucket)
        junk_counts = torch.bincount(junk_rows * width + junk_bucket, minlength=num_query * width)
        before = counts.cumsum(1) - junk_counts.view(num_query, width).cumsum(1)
        return query_stats_from_kept_ranks(before[:, :max_pos] - 1, num_pos)


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


def _check_no_nan(dist: torch.Tensor) -> None:
    if dist.numel() and bool(torch.isnan(dist.max())):  # max propagates NaN; one pass, ~10x isnan().any()
        raise ValueError("distmat contains NaN; distances must be comparable numbers")
