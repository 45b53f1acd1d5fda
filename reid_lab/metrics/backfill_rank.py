"""Per-query ranking statistics of a whole backfilling curve in one pass over the two distance blocks.

A backfilling curve evaluates the mixed gallery ``d_β[j] = d_new[j] if order-position(j) < ⌊β·N⌋ else
d_stored[j]`` at every β of a grid (``reid_lab.metrics.backfill``). Evaluating each β from scratch costs one full
evaluation per β. This module gets every β of every ordering for about the price of one or two evaluations, with
the protocol and tie rule of :mod:`reid_lab.metrics.rank` (junk = same pid and camera; equal distance: smaller
gallery index ranks first) and exactly its numbers.

Why it works, per query. Order gallery items by the key ``(distance, gallery index)``. The 0-based kept-rank of a
positive ``p`` at step β is ``#{kept x : key_β(x) < key_β(p)}``. A positive only ever carries two keys, its stored
one and its new one, so the query has at most ``2 P`` *thresholds*; sort them. Give every item and version the
bucket ``b_v(x) = #{thresholds < key_v(x)}``. If ``key_β(p)`` sits at sorted position ``k``, the items before it are
exactly the kept items with ``b_β(x) <= k``, ``p`` itself excluded (its own bucket is ``<= k``): the kept-rank is
``H_β[k] - 1`` with ``H_β`` the cumulative bucket histogram of the kept items at step β. Going from one step to the
next only moves the newly refreshed items from ``b_stored`` to ``b_new``, so

    hist_β = hist_stored + Σ_{steps s <= β} Σ_{x refreshed at s} (e[b_new(x)] − e[b_stored(x)]),

and an item with ``b_stored(x) == b_new(x)`` never matters. Items whose stored and new distances are both below
every threshold (bucket 0 both times) or both above (never counted) need no bucket at all, so only the *candidates*
(items with a distance inside the thresholds' range in at least one version) are bucketed, exactly: a monotone
quantisation into cells as in :class:`reid_lab.metrics.ranking_engine.GalleryRanker`, and one-by-one comparisons
(tie rule included) only against the thresholds sharing the item's cell. The dense work per block is a handful of
elementwise passes (max, min, two comparisons, a row count); orderings share all of it and differ only in the
step at which each moving candidate changes bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reid_lab.metrics.ranking_engine import (
    BlockRanking,
    GalleryRanker,
    QueryStats,
    count_cell_prefix,
    flatnonzero,
    query_stats_from_kept_ranks,
)

__all__ = ["BackfillBlock", "BackfillRanker", "refresh_steps"]


def refresh_steps(order: torch.Tensor, num_refreshed: Sequence[int]) -> torch.Tensor:
    """Index of the first grid step at which each gallery item carries its new feature.

    Args:
        order: ``(num_gallery,)`` int64 permutation π; item ``order[i]`` is refreshed ``i``-th.
        num_refreshed: non-decreasing refreshed counts ``⌊β_k · num_gallery⌋`` of the grid steps ``k``.

    Returns:
        ``(num_gallery,)`` int64 ``step[j]``: item ``j`` is refreshed at step ``k`` iff ``step[j] <= k``;
        ``len(num_refreshed)`` for items never refreshed.

    Example:
        >>> refresh_steps(torch.tensor([2, 0, 1]), [0, 1, 3]).tolist()
        [2, 2, 1]
    """
    counts = torch.as_tensor(list(num_refreshed), dtype=torch.int64, device=order.device)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    # first k with position < counts[k]  ==  #{k : counts[k] <= position}
    return torch.searchsorted(counts, position, right=True)


class BackfillRanker:
    """Per-query stats (:class:`~reid_lab.metrics.ranking_engine.QueryStats`) of every step of several backfill
    orderings.

    Call it on blocks of query rows of the stored-gallery and new-gallery distance matrices; the result equals
    ``GalleryRanker`` on ``torch.where(steps[o] <= k, d_new, d_stored)`` for every ordering ``o`` and step ``k``
    (see the module docstring for the algorithm).

    Args:
        g_pids: ``(num_gallery,)`` int64 gallery pids.
        g_camids: ``(num_gallery,)`` int64 gallery camera ids, same device; ``None`` for the cross-modal protocol
            (no junk removal; the queries then carry no camera ids either).
        steps: ``(num_orderings, num_gallery)`` int64, :func:`refresh_steps` of each ordering.
        num_steps: number of grid steps ``K`` (``steps == K``: never refreshed).
        num_cells: quantisation cells per row for bucketing the candidates; results never depend on it.

    Example:
        >>> gp, gc = torch.tensor([1, 2, 1, 1]), torch.tensor([1, 1, 1, 0])
        >>> ranker = BackfillRanker(gp, gc, refresh_steps(torch.tensor([2, 0, 1, 3]), [0, 2, 4])[None], 3)
        >>> d_old, d_new = torch.tensor([[0.1, 0.2, 0.9, 0.3]]), torch.tensor([[0.8, 0.1, 0.9, 0.6]])
        >>> [s.first_match_rank.tolist() for s in ranker(d_old, d_new, torch.tensor([1]), torch.tensor([0]))[0]]
        [[0], [1], [1]]
    """

    def __init__(
        self,
        g_pids: torch.Tensor,
        g_camids: torch.Tensor | None,
        steps: torch.Tensor,
        num_steps: int,
        num_cells: int | None = None,
    ) -> None:
        self.num_gallery = int(g_pids.shape[0])
        if steps.dim() != 2 or steps.shape[1] != self.num_gallery:
            raise ValueError(f"steps must have shape (num_orderings, {self.num_gallery}), got {tuple(steps.shape)}")
        self.g_camids = g_camids
        self.steps = steps.to(device=g_pids.device, dtype=torch.int64)
        self.num_steps = int(num_steps)
        self.num_cells = num_cells or min(max(self.num_gallery // 8, 64), 4096)
        # its pid index finds the positives; its exact path serves blocks with non-finite positive distances
        self._ranker = GalleryRanker(g_pids, g_camids)

    def __call__(
        self,
        d_stored: torch.Tensor,
        d_new: torch.Tensor,
        q_pids: torch.Tensor,
        q_camids: torch.Tensor | None = None,
    ) -> list[list[QueryStats]]:
        """Stats of one block of query rows at every step of every ordering.

        Args:
            d_stored: ``(num_query, num_gallery)`` distances to the stored (old or transformed) gallery features.
            d_new: ``(num_query, num_gallery)`` distances to the new gallery features, same device. Neither is
                written.
            q_pids: ``(num_query,)`` int64 query pids.
            q_camids: ``(num_query,)`` int64 query camera ids; ``None`` exactly when the gallery has none.

        Returns:
            ``stats[o][k]``: :class:`QueryStats` of the block for ordering ``o`` at step ``k``.
        """
        for name, dist in (("d_stored", d_stored), ("d_new", d_new)):
            if dist.dim() != 2 or dist.shape[1] != self.num_gallery:
                raise ValueError(f"{name} must have shape (num_query, {self.num_gallery}), got {tuple(dist.shape)}")
        if d_stored.shape != d_new.shape:
            raise ValueError(f"d_stored and d_new must have equal shapes, got {tuple(d_stored.shape)} and {tuple(d_new.shape)}")
        dtype = torch.promote_types(_float_dtype(d_stored.dtype), _float_dtype(d_new.dtype))
        d_old, d_new = d_stored.detach().to(dtype).contiguous(), d_new.detach().to(dtype).contiguous()
        pairs = self._ranker.positive_and_junk_pairs(q_pids, q_camids)
        pos_rows, pos_cols = pairs[0], pairs[1]
        block = self.start(d_old.shape[0], pairs, d_old[pos_rows, pos_cols], d_new[pos_rows, pos_cols],
                           d_old[pairs[2], pairs[3]], d_new[pairs[2], pairs[3]])
        block.add_tile(d_old, d_new, 0)
        return block.finish()

    def start(
        self,
        num_query: int,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        pos_stored: torch.Tensor,
        pos_new: torch.Tensor,
        junk_stored: torch.Tensor,
        junk_new: torch.Tensor,
    ) -> BackfillBlock:
        """A :class:`BackfillBlock` for ``num_query`` rows whose gallery columns arrive in tiles.

        Args:
            num_query: rows of the block.
            pairs: ``GalleryRanker.positive_and_junk_pairs`` of the block's queries.
            pos_stored, pos_new: the positive pairs' distances in both versions (the tiles' bits).
            junk_stored, junk_new: the junk pairs' distances in both versions.
        """
        return BackfillBlock(self, num_query, pairs, (pos_stored, pos_new), (junk_stored, junk_new))


class BackfillBlock:
    """One block of query rows of :class:`BackfillRanker`, fed gallery-column tile by tile.

    The thresholds (both keys of every positive) are known up front; every tile only adds to per-row counts
    (items below every threshold, the stored-version bucket histogram) and to the list of candidates that change
    bucket when refreshed, all additive over columns. :meth:`finish` replays the orderings.
    """

    def __init__(
        self,
        ranker: BackfillRanker,
        num_query: int,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        pos_d: tuple[torch.Tensor, torch.Tensor],
        junk_d: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.ranker, self.num_query = ranker, num_query
        pos_rows, pos_cols, junk_rows, junk_cols = pairs
        self.pairs, self.junk_d = pairs, junk_d
        num_gallery = ranker.num_gallery
        dtype = torch.promote_types(pos_d[0].dtype, pos_d[1].dtype)
        device = pos_rows.device
        self.num_pos = num_pos = torch.bincount(pos_rows, minlength=num_query)
        self.max_pos = max_pos = int(num_pos.max()) if pos_rows.numel() else 0
        self.fallback: list[list[BlockRanking]] | None = None
        if max_pos == 0:
            return
        # Thresholds: the stored and the new key of every positive, sorted per row by (distance, gallery index).
        num_thr = 2 * pos_rows.numel()
        thr_rows = torch.cat([pos_rows, pos_rows])
        thr_cols = torch.cat([pos_cols, pos_cols])
        thr_d = torch.cat([pos_d[0].to(dtype), pos_d[1].to(dtype)])
        if not bool(torch.isfinite(thr_d).all()):
            # exact per-step rankings of the mixed gallery (a positive with a non-finite distance)
            self.fallback = [
                [ranker._ranker.start(num_query, pairs, torch.where(steps[pos_cols] <= k, pos_d[1], pos_d[0]),
                                      torch.where(steps[junk_cols] <= k, junk_d[1], junk_d[0]))
                 for k in range(ranker.num_steps)]
                for steps in ranker.steps
            ]
            return
        order = torch.argsort(thr_cols, stable=True)
        order = order[torch.argsort(thr_d[order], stable=True)]
        order = order[torch.argsort(thr_rows[order], stable=True)]
        self.width = width = 2 * max_pos  # threshold slots per row; padding (+inf, num_gallery) sorts after all
        num_thr_row = 2 * num_pos
        slot = torch.arange(num_thr, device=device) - (torch.cumsum(num_thr_row, 0) - num_thr_row)[thr_rows[order]]
        sorted_d = torch.full((num_query, width), float("inf"), dtype=dtype, device=device)
        sorted_d[thr_rows[order], slot] = thr_d[order]
        sorted_col = torch.full((num_query, width), num_gallery, dtype=torch.int64, device=device)
        sorted_col[thr_rows[order], slot] = thr_cols[order]
        self.thr_slot = torch.empty_like(slot)
        self.thr_slot[order] = slot  # sorted position of threshold i (i < P: stored key of positive i, else new)

        self.has_pos = has_pos = num_pos > 0
        self.lo = torch.where(has_pos, sorted_d[:, 0], float("inf"))
        self.hi = torch.where(has_pos, sorted_d.gather(1, (num_thr_row - 1).clamp(min=0)[:, None])[:, 0],
                              -float("inf"))
        self.cells = _CellTable(sorted_d, sorted_col, self.lo[has_pos].min(), self.hi[has_pos].max(),
                                ranker.num_cells)
        self.hist_width = width + 1
        self.num_below = torch.zeros(num_query, dtype=torch.int64, device=device)
        self.hist_old = torch.zeros(num_query * self.hist_width, dtype=torch.int64, device=device)
        # Per ordering, the (row, step, bucket) histogram of the items that change bucket when refreshed (+1 at
        # the new bucket, -1 at the stored one, at the step they are refreshed); the extra step ``num_steps``
        # collects the items never refreshed and is dropped. Folded tile by tile: memory stays O(tile).
        self.step_size = (ranker.num_steps + 1) * self.hist_width
        self.delta = [torch.zeros(num_query * self.step_size, dtype=torch.int64, device=device)
                      for _ in range(ranker.steps.shape[0])]

    def add_tile(self, d_old: torch.Tensor, d_new: torch.Tensor, col0: int) -> None:
        """Count the gallery columns ``col0 : col0 + cols`` of the block.

        Args:
            d_old: ``(num_query, cols)`` contiguous stored-gallery distances of those columns (not written).
            d_new: ``(num_query, cols)`` new-gallery distances, same dtype.
        """
        num_query, cols = d_old.shape
        if self.max_pos == 0:
            if bool(torch.isnan(d_old).any() or torch.isnan(d_new).any()):
                raise ValueError("distmat contains NaN; distances must be comparable numbers")
            return
        if self.fallback is not None:
            for steps, per_step in zip(self.ranker.steps, self.fallback):
                for k, block in enumerate(per_step):
                    mask = steps[col0 : col0 + cols] <= k
                    block.add_tile(torch.where(mask, d_new, d_old), col0)
            return
        junk_rows, junk_cols = self.pairs[2], self.pairs[3]
        inside = flatnonzero((junk_cols >= col0) & (junk_cols < col0 + cols))
        junk_rows, junk_cols = junk_rows.index_select(0, inside), junk_cols.index_select(0, inside) - col0
        # Items below every threshold in both versions sit in bucket 0 at every step; items above every
        # threshold in both versions are never counted; only the others (candidates) are bucketed. NaN lands in
        # candidates.
        extreme = torch.maximum(d_old, d_new)
        below = extreme < self.lo[:, None]
        torch.minimum(d_old, d_new, out=extreme)
        outside = extreme > self.hi[:, None]
        del extreme
        outside |= below
        below[junk_rows, junk_cols] = False  # junk is dropped whatever its distance
        outside[junk_rows, junk_cols] = True
        self.num_below += below.view(torch.uint8).sum(1, dtype=torch.int32).long()
        del below
        cand = flatnonzero(outside.view(-1).logical_not_())
        del outside
        cand_old = d_old.reshape(-1).index_select(0, cand)
        cand_new = d_new.reshape(-1).index_select(0, cand)
        if bool(torch.isnan(cand_old).any() or torch.isnan(cand_new).any()):
            raise ValueError("distmat contains NaN; distances must be comparable numbers")
        cand_rows = _floor_div(cand, cols)
        cand_cols = cand - cand_rows * cols + col0
        if not bool(self.has_pos.all()):  # rows without positives: only inf/-inf pairs can be candidates there
            keep = flatnonzero(self.has_pos.index_select(0, cand_rows))
            cand_rows, cand_cols, cand_old, cand_new = (
                t.index_select(0, keep) for t in (cand_rows, cand_cols, cand_old, cand_new)
            )
        cell_rows = cand_rows * self.cells.cell_width
        b_old = self.cells.bucket(cand_old, cand_rows, cand_cols, cell_rows)
        b_new = self.cells.bucket(cand_new, cand_rows, cand_cols, cell_rows)
        del cell_rows, cand_old, cand_new
        self.hist_old += torch.bincount(cand_rows * self.hist_width + b_old, minlength=num_query * self.hist_width)
        moved = flatnonzero(b_old != b_new)
        mv_cols = cand_cols.index_select(0, moved)
        mv_base = cand_rows.index_select(0, moved).mul_(self.step_size)
        mv_old = b_old.index_select(0, moved).add_(mv_base)
        mv_new = b_new.index_select(0, moved).add_(mv_base)
        del mv_base, b_old, b_new
        size = num_query * self.step_size
        for steps, delta in zip(self.ranker.steps, self.delta):
            offset = steps.index_select(0, mv_cols).mul_(self.hist_width)
            delta += torch.bincount(mv_new + offset, minlength=size)
            delta -= torch.bincount(mv_old + offset, minlength=size)

    def finish(self) -> list[list[QueryStats]]:
        """``stats[o][k]``: :class:`QueryStats` of the block for ordering ``o`` at step ``k``."""
        ranker, num_query, num_pos, max_pos = self.ranker, self.num_query, self.num_pos, self.max_pos
        num_steps, num_gallery = ranker.num_steps, ranker.num_gallery
        if max_pos == 0:
            empty = query_stats_from_kept_ranks(num_pos.new_zeros((num_query, 0)), num_pos)
            return [[empty] * num_steps for _ in range(ranker.steps.shape[0])]
        if self.fallback is not None:
            return [[block.finish() for block in per_step] for per_step in self.fallback]
        device = num_pos.device
        hist_width = self.hist_width
        hist_old = self.hist_old.view(num_query, hist_width)
        hist_old[:, 0] += self.num_below
        # Positives in (row, slot) layout with the sorted positions of their two keys.
        pos_rows, pos_cols = self.pairs[0], self.pairs[1]
        pos_slot = torch.arange(pos_rows.numel(), device=device) - (torch.cumsum(num_pos, 0) - num_pos)[pos_rows]
        num_p = pos_rows.numel()
        at_old = torch.zeros((num_query, max_pos), dtype=torch.int64, device=device)
        at_new = torch.zeros((num_query, max_pos), dtype=torch.int64, device=device)
        at_old[pos_rows, pos_slot] = self.thr_slot[:num_p]
        at_new[pos_rows, pos_slot] = self.thr_slot[num_p:]
        pos_col = torch.zeros((num_query, max_pos), dtype=torch.int64, device=device)
        pos_col[pos_rows, pos_slot] = pos_cols
        is_pos = torch.arange(max_pos, device=device)[None, :] < num_pos[:, None]

        step_ids = torch.arange(num_steps, device=device)
        out: list[list[QueryStats]] = []
        for steps, delta in zip(ranker.steps, self.delta):
            hist = delta.view(num_query, num_steps + 1, hist_width)[:, :num_steps].cumsum(1).add_(hist_old[:, None])
            before = hist.cumsum(2)  # before[r, k, t]: kept items with bucket <= t at step k
            refreshed = steps[pos_col][:, None, :] <= step_ids[None, :, None]  # (num_query, K, max_pos)
            at = torch.where(refreshed, at_new[:, None, :], at_old[:, None, :])
            kept_rank = before.gather(2, at) - 1
            kept_rank = torch.where(is_pos[:, None, :], kept_rank, num_gallery).sort(dim=2).values
            out.append([query_stats_from_kept_ranks(kept_rank[:, k], num_pos) for k in range(num_steps)])
        return out


class _CellTable:
    """Exact ``#{thresholds of the row < (value, col)}`` through a monotone quantisation of ``[lo, hi]`` into cells.

    ``key = trunc(clamp((d - lo) · scale + 1, 0, cells + 1))`` is computed by the same correctly rounded,
    non-decreasing steps for thresholds and items (no fused multiply-add; one ``lo`` and ``scale`` for the whole
    block, so no per-item gathers), as in ``GalleryRanker``. Thresholds in earlier cells of the item's row are all
    smaller, those in later cells all larger; only the thresholds sharing the item's cell are compared one by one,
    with the tie rule (equal distance: smaller gallery index first).

    Args:
        sorted_d: ``(num_query, width)`` thresholds per row, sorted by (distance, gallery index), +inf padded.
        sorted_col: ``(num_query, width)`` their gallery indices; padding holds the gallery size.
        lo: smallest finite threshold of the block (0-d tensor); hi: largest.
        cells: cells per row.
    """

    def __init__(
        self, sorted_d: torch.Tensor, sorted_col: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cells: int
    ) -> None:
        num_query, self.width = sorted_d.shape
        device = sorted_d.device
        self.cells = cells
        self.cell_width = cells + 2  # cell 0: below every threshold, cell cells + 1: above
        finfo = torch.finfo(sorted_d.dtype)
        span = float(hi.double() - lo.double())
        self.lo = lo.to(sorted_d.dtype)
        self.scale = torch.tensor((cells - 1) / span if span > 0 else 1.0, dtype=torch.float64)
        self.scale = self.scale.clamp(finfo.tiny, finfo.max).to(sorted_d.dtype)
        real = torch.isfinite(sorted_d)  # padding is +inf; real thresholds are finite (else the exact fallback)
        row_base = torch.arange(num_query, device=device)[:, None] * self.cell_width
        cell_key = (row_base + self.key(sorted_d))[real]
        self.cell_pos = torch.bincount(cell_key, minlength=num_query * self.cell_width)
        cell_pos = self.cell_pos.view(num_query, self.cell_width)
        cell_lo = (cell_pos.cumsum(1) - cell_pos).view(-1)
        # One gather per item: a cell without threshold gives the bucket, a shared cell -1 - (thresholds before it).
        self.table = torch.where(self.cell_pos > 0, -1 - cell_lo, cell_lo)
        self.thr_d, self.thr_col = sorted_d.reshape(-1), sorted_col.reshape(-1)

    def key(self, d: torch.Tensor) -> torch.Tensor:
        return torch.sub(d, self.lo).mul_(self.scale).add_(1.0).clamp_(0.0, self.cells + 1.0).to(torch.int64)

    def bucket(
        self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cell_rows: torch.Tensor
    ) -> torch.Tensor:
        """Buckets of items ``(rows, cols)`` with distances ``values``; ``cell_rows = rows * cell_width``."""
        key = self.key(values).add_(cell_rows)
        bucket = self.table.index_select(0, key)
        shared = flatnonzero(bucket < 0)
        if shared.numel() == 0:
            return bucket
        key = key.index_select(0, shared)
        base = bucket.index_select(0, shared).neg_().sub_(1)
        remaining = self.cell_pos.index_select(0, key)  # thresholds of the item's cell not yet compared
        at = rows.index_select(0, shared) * self.width + base
        value, col = values.index_select(0, shared), cols.index_select(0, shared)
        # The thresholds of a cell that precede the item form a prefix of the cell (sorted by distance, then col).
        active = torch.arange(shared.numel(), device=values.device)
        count_cell_prefix(self.thr_d, self.thr_col, at, remaining, value, col, active, base)
        bucket.index_copy_(0, shared, base)
        return bucket


def _floor_div(index: torch.Tensor, divisor: int) -> torch.Tensor:
    """``index // divisor`` for non-negative int64 indices (numpy's is ~3x faster than torch's on CPU)."""
    if index.device.type == "cpu":
        return torch.from_numpy(index.numpy() // divisor)
    return torch.div(index, divisor, rounding_mode="floor")


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32/float64 holding ``dtype`` exactly (half -> float32, integers -> float64), as ``evaluate_rank``."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64
