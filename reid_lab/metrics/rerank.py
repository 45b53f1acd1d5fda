"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017) that never builds an ``N x N`` matrix, ``N = num_query + num_gallery``.

What is reproduced: the numpy ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`` that
torchreid and fast-reid share (``shared/reference/reid-toolboxes.md`` §3), step by step:

1. ``D``: the caller's base distance over all ``N`` items (queries first). The reference squares what it
   is given, so ``d(p, x) = D(p, x)**2 / max_y D(p, y)**2`` (its column max of the symmetric matrix is the
   row max).
2. ``N(p, k)``: the ``k + 1`` items nearest to ``p`` under ``d`` (``p`` itself included).
   ``R(p, k) = {x in N(p, k) : p in N(x, k)}``.
3. ``R*(p) = R(p, k1)`` plus ``R(q, round(k1 / 2))`` for every ``q in R(p, k1)`` with
   ``|R(q, round(k1/2)) & R(p, k1)| > 2/3 |R(q, round(k1/2))|`` (``round`` is half-even, as ``np.around``).
4. ``V[p, x] = exp(-d(p, x)) / sum_{y in R*(p)} exp(-d(p, y))`` for ``x in R*(p)``, 0 elsewhere.
5. Local query expansion (skipped when ``k2 == 1``): ``V[p] <- mean of V[x]`` over the first ``k2``
   items of ``N(p, k1)``.
6. ``m(q, g) = sum_x min(V[q, x], V[g, x])``; Jaccard distance ``d_J = 1 - m / (2 - m)``
   (``= 1 - sum min / sum max`` because every row of ``V`` sums to 1).
7. ``final = (1 - lambda) * d_J + lambda * d``, returned for the query x gallery block only.

How it scales:

* One pass over ``N x N`` distance blocks (with features, only the upper triangle: ``D`` is symmetric)
  keeps each item's row maximum and ``k1 + 1`` nearest neighbours, and writes the raw query x gallery
  block straight into the output buffer. A row's first block goes through ``torch.topk``; later blocks
  only pass on the entries below the row's current ``(k1 + 1)``-th smallest, so the ``N^2`` part is one
  GEMM plus one comparison per distance. An off-diagonal block serves both its rows and (mirrored) its
  columns with a single threshold scan; diagonal blocks are cut into quarter blocks so that only a sliver of
  the Gram matrix is computed twice.
* ``V`` is a sparse CSR matrix with ``|R*(p)|`` (a few ``k1``) non-zeros per row; the distances it needs
  come from the neighbour lists, or from the features for the few pairs outside them.
* The query expansion is a sparse row gather + coalesce; ``m`` is accumulated through an inverted index
  (column -> gallery rows) for chunks of queries.
* Peak memory: the ``(num_query, num_gallery)`` output + O(``N * k1 * k2``) + one block. Measured on the
  synthetic MSMT17-scale set of ``benchmarks/rerank.py`` (11,659 x 82,161, 2048-d, CPU, 2 threads):
  6.6 GB peak RSS (3.8 GB of it the output), 143 s wall on a 2-core box, most of it the ``N^2 / 2``
  distance GEMM (18 TFLOP). Market scale: 7.2 s against 74 s for the numpy reference (distances
  included). Everything runs on the device of the features (GPU included).

Deliberate deviations from the numpy reference (all at the level of float rounding):

* Ties: the reference ranks with an unstable ``np.argsort``; here neighbour lists are ``torch.topk``
  merged over blocks. When two items sit at exactly the same float32 distance at a neighbour-list
  boundary, either may be kept (the reference is arbitrary too); a different choice spreads through ``V``.
  Likewise, :func:`k_reciprocal_rerank` computes its distances with torch, whose last-bit rounding differs
  from a numpy matmul, which can flip near-ties. Measured on the synthetic Market-scale set of
  ``benchmarks/rerank.py`` (3,368 x 15,913, 2048-d): fed the reference's own distances
  (:func:`re_ranking_from_distances`) the max abs difference is 3e-7; from features, 355 of 53.6M entries
  differ by > 1e-4 (max 0.095), with the same mAP to 0.01.
* Neighbours are ranked by ``D`` and the row maximum is ``max(D)**2``; the reference ranks
  ``D**2 / max D**2``. Same order and same maximum for ``D >= 0``; they can differ only among values
  within rounding of 0 (e.g. a ``-1e-7`` self-distance from ``|x|^2 + |y|^2 - 2 x.y``), i.e. duplicates.
* Sums (row normalisation of ``V``, query-expansion mean, ``m``) are accumulated in another order:
  differences ~1e-7 in float32.
* A row whose maximum distance is 0 (all items identical) is divided by 1, not 0 (the reference: NaN).
* The computation is float32 (float64 when an input is float64); float16/bfloat16 inputs are upcast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from reid_lab.metrics.ranking_engine import ranking_threads

__all__ = ["k_reciprocal_rerank", "re_ranking_from_distances"]

# Default rows/columns of one distance block: 1536^2 float32 = 9 MB on CPU (2-core EPYC, 2048-d: 172 GFLOPS
# against 160 at 2048, whose 16 MB block spills the cache), 8192^2 = 256 MB on GPU.
_CPU_CHUNK = 1536
_GPU_CHUNK = 8192
# Elements per flattened intermediate of the sparse steps (expansion joins, Jaccard triples). Moderate on
# CPU: a freshly mmap-ed 64 MB buffer costs more in page faults than the arithmetic on it (measured ~10x
# slower per element at 8M than at 1M elements); large on GPU to amortise kernel launches.
_CPU_BUDGET = 1 << 20
_GPU_BUDGET = 1 << 24


# ----------------------------------------------------------------------------------------- distance sources


class _FeatureDistances:
    """Base distance ``D`` between ``N`` feature rows (queries first), computed on demand.

    ``metric="euclidean"`` is the squared euclidean distance (torchreid's ``compute_distance_matrix``),
    ``metric="cosine"`` is ``1 - cos``.
    """

    symmetric = True

    def __init__(self, features: Tensor, metric: str, budget: int) -> None:
        self.budget = budget
        if metric == "cosine":
            features = torch.nn.functional.normalize(features, dim=1)
        self.features = features
        self.metric = metric
        self.sqnorm = features.pow(2).sum(1)

    def block(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """``(r1 - r0, c1 - c0)`` distances ``D[r0:r1, c0:c1]``."""
        x, y = self.features[r0:r1], self.features[c0:c1]
        if self.metric == "cosine":
            return torch.addmm(torch.ones((), dtype=x.dtype, device=x.device), x, y.T, beta=1, alpha=-1)
        base = self.sqnorm[r0:r1, None] + self.sqnorm[None, c0:c1]
        return torch.addmm(base, x, y.T, beta=1, alpha=-2)

    def pairs(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``D[rows[i], cols[i]]`` for each ``i``."""
        out = torch.empty(rows.shape[0], dtype=self.features.dtype, device=rows.device)
        step = max(1, self.budget // max(1, self.features.shape[1]))
        for s in range(0, rows.shape[0], step):
            r, c = rows[s : s + step], cols[s : s + step]
            dot = (self.features[r] * self.features[c]).sum(1)
            if self.metric == "cosine":
                out[s : s + step] = 1 - dot
            else:
                out[s : s + step] = self.sqnorm[r] + self.sqnorm[c] - 2 * dot
        return out


class _GivenDistances:
    """Base distance from the reference's three blocks, without assembling the ``N x N`` matrix.

    The reference's row ``p`` after its transpose is column ``p`` of ``M = [[qq, qg], [qg.T, gg]]``, so
    ``block(r, c) = M[c, r].T``; blocks never straddle the query/gallery boundary.
    """

    symmetric = False

    def __init__(self, q_g: Tensor, q_q: Tensor, g_g: Tensor) -> None:
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query = q_g.shape[0]

    def block(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        nq = self.num_query
        if r0 < nq and c0 < nq:
            return self.q_q[c0:c1, r0:r1].T
        if r0 < nq:
            return self.q_g[r0:r1, c0 - nq : c1 - nq]
        if c0 < nq:
            return self.q_g[c0:c1, r0 - nq : r1 - nq].T
        return self.g_g[c0 - nq : c1 - nq, r0 - nq : r1 - nq].T

    def pairs(self, rows: Tensor, cols: Tensor) -> Tensor:
        nq = self.num_query
        out = torch.empty(rows.shape[0], dtype=self.q_g.dtype, device=rows.device)
        rq, cq = rows < nq, cols < nq
        for sel, vals in (
            (rq & cq, lambda r, c: self.q_q[c, r]),
            (rq & ~cq, lambda r, c: self.q_g[r, c - nq]),
            (~rq & cq, lambda r, c: self.q_g[c, r - nq]),
            (~rq & ~cq, lambda r, c: self.g_g[c - nq, r - nq]),
        ):
            out[sel] = vals(rows[sel], cols[sel])
        return out


# ------------------------------------------------------------------------------------------------ helpers


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, stop)) for s in range(start, stop, step)]


def _block_pairs(
    spans: list[tuple[int, int]], symmetric: bool, split: int
) -> Iterator[tuple[int, int, int, int, bool]]:
    """Distance blocks ``(r0, r1, c0, c1, mirrored)`` that together cover every ``(row, column)`` pair of the
    ``N x N`` matrix cut at ``spans``. A symmetric source is walked over its upper triangle only: an
    off-diagonal block is ``mirrored`` (it also serves as the transposed block); a diagonal block is itself cut
    into ``split``-sized sub-blocks walked the same way, so at most ``split / (2 * chunk)`` of the work is
    duplicated instead of half of every diagonal block."""
    for bi, (r0, r1) in enumerate(spans):
        for bj, (c0, c1) in enumerate(spans):
            if not symmetric:
                yield r0, r1, c0, c1, False
            elif bj > bi:
                yield r0, r1, c0, c1, True
            elif bj == bi:
                sub = _spans(r0, r1, split)
                for si, (a0, a1) in enumerate(sub):
                    for b0, b1 in sub[si:]:
                        yield a0, a1, b0, b1, b0 != a0


def _segments(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """For segments of the given lengths: (segment id, offset inside the segment) of every element."""
    seg = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    return seg, torch.arange(seg.shape[0], device=lengths.device) - starts[seg]


def _budget_chunks(cost: Tensor, budget: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges whose summed ``cost`` stays under ``budget`` (at least one row each)."""
    csum = torch.cumsum(cost, 0).cpu()
    n, s = cost.shape[0], 0
    while s < n:
        base = int(csum[s - 1]) if s else 0
        e = int(torch.searchsorted(csum, base + budget, right=True))
        e = min(max(e, s + 1), s + max_rows, n)
        yield s, e
        s = e


class _NearestNeighbours:
    """Running per-row maximum and ``k`` smallest values (with column ids) of rows fed block by block.

    The first block a row sees goes through ``torch.topk``; later blocks only keep the entries below the
    row's current k-th smallest value (after a few blocks, ~``k * block / seen`` per row), so the ``N^2``
    part of the work is one comparison per distance instead of a partial sort.
    """

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.value = torch.full((n, k), math.inf, dtype=dtype, device=device)
        self.index = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.rowmax = torch.full((n,), -math.inf, dtype=dtype, device=device)
        self.started = torch.zeros(n, dtype=torch.bool, device=device)

    def update(self, r0: int, r1: int, block: Tensor, c0: int, dim: int) -> None:
        """Feed ``block``: its rows (``dim=0``) or its columns (``dim=1``) are items ``r0:r1``, the other axis
        holds the distances to items ``c0, c0 + 1, ...``."""
        other = 1 - dim
        self.rowmax[r0:r1] = torch.maximum(self.rowmax[r0:r1], block.amax(dim=other))
        if bool(self.started[r0:r1].all()):
            tau = self.value[r0:r1].amax(1)
            mask = block < (tau[:, None] if dim == 0 else tau[None, :])
            hit_b, hit_o = (mask if dim == 0 else mask.T.contiguous()).nonzero(as_tuple=True)  # by item
            vals = block[hit_b, hit_o] if dim == 0 else block[hit_o, hit_b]
            self._add_hits(r0, r1, hit_b, hit_o, vals, block, c0, dim)
            return
        self._topk(r0, r1, block, c0, dim)

    def update_symmetric(self, r0: int, r1: int, c0: int, c1: int, block: Tensor) -> None:
        """Feed ``block = D[r0:r1, c0:c1]`` (disjoint ranges) to both items ``r0:r1`` and items ``c0:c1``.

        Equivalent to ``update(r0, r1, block, c0, 0)`` then ``update(c0, c1, block, r0, 1)``; once both sides
        have started, one pass finds the entries below either side's threshold (a transposed mask scan costs
        ~4x a row-major one).
        """
        if not bool(self.started[r0:r1].all() and self.started[c0:c1].all()):
            self.update(r0, r1, block, c0, dim=0)
            self.update(c0, c1, block, r0, dim=1)
            return
        self.rowmax[r0:r1] = torch.maximum(self.rowmax[r0:r1], block.amax(dim=1))
        self.rowmax[c0:c1] = torch.maximum(self.rowmax[c0:c1], block.amax(dim=0))
        tau_r, tau_c = self.value[r0:r1].amax(1), self.value[c0:c1].amax(1)
        hit_r, hit_c = (block < torch.maximum(tau_r[:, None], tau_c[None, :])).nonzero(as_tuple=True)
        vals = block[hit_r, hit_c]
        row_side = vals < tau_r[hit_r]  # hits are grouped by row already
        self._add_hits(r0, r1, hit_r[row_side], hit_c[row_side], vals[row_side], block, c0, dim=0)
        col_side = vals < tau_c[hit_c]
        item, other, vals = hit_c[col_side], hit_r[col_side], vals[col_side]
        order = torch.argsort(item, stable=True)
        self._add_hits(c0, c1, item[order], other[order], vals[order], block, r0, dim=1)

    def _add_hits(
        self, r0: int, r1: int, item: Tensor, other: Tensor, vals: Tensor, block: Tensor, c0: int, dim: int
    ) -> None:
        """Merge the candidate entries ``(item - r0, other + c0, vals)`` (grouped by item) into rows
        ``r0:r1``; many candidates in one row (an early block) go through ``torch.topk`` of ``block``."""
        if item.shape[0] == 0:
            return
        rows = r1 - r0
        counts = torch.bincount(item, minlength=rows)
        width = int(counts.max())
        if width > 4 * self.k:
            self._topk(r0, r1, block, c0, dim)
            return
        pos = torch.arange(item.shape[0], device=block.device) - (torch.cumsum(counts, 0) - counts)[item]
        val = torch.full((rows, width), math.inf, dtype=block.dtype, device=block.device)
        idx = torch.full((rows, width), -1, dtype=torch.long, device=block.device)
        val[item, pos] = vals
        idx[item, pos] = other + c0
        self._merge(r0, r1, val, idx)

    def _topk(self, r0: int, r1: int, block: Tensor, c0: int, dim: int) -> None:
        other = 1 - dim
        kk = min(self.k, block.shape[other])
        val, idx = torch.topk(block, kk, dim=other, largest=False, sorted=False)
        if dim == 1:
            val, idx = val.T, idx.T
        self._merge(r0, r1, val, idx + c0)
        self.started[r0:r1] = True

    def _merge(self, r0: int, r1: int, val: Tensor, idx: Tensor) -> None:
        val = torch.cat([self.value[r0:r1], val], 1)
        idx = torch.cat([self.index[r0:r1], idx], 1)
        val, pos = torch.topk(val, self.k, dim=1, largest=False, sorted=False)
        self.value[r0:r1] = val
        self.index[r0:r1] = torch.gather(idx, 1, pos)

    def sorted(self) -> tuple[Tensor, Tensor]:
        value, order = torch.sort(self.value, dim=1, stable=True)
        return value, torch.gather(self.index, 1, order)


def _reciprocal_mask(knn: Tensor, k: int, chunk: int) -> Tensor:
    """``(N, k + 1)`` bool: ``knn[p, j]`` belongs to ``R(p, k)`` (``p`` is among its ``k + 1`` nearest)."""
    fwd = knn[:, : k + 1]
    mask = torch.empty(fwd.shape, dtype=torch.bool, device=knn.device)
    for r0, r1 in _spans(0, fwd.shape[0], chunk):
        rows = torch.arange(r0, r1, device=knn.device)
        mask[r0:r1] = (fwd[fwd[r0:r1]] == rows[:, None, None]).any(-1)
    return mask


# ----------------------------------------------------------------------------------------------- core


def _rerank(
    source: Any,
    n: int,
    num_query: int,
    k1: int,
    k2: int,
    lambda_value: float,
    chunk: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The algorithm of the module docstring; ``source`` yields base-distance blocks and pairs."""
    budget = _budget(device)
    num_gallery = n - num_query
    K = k1 + 1
    kh = int(round(k1 / 2))  # round-half-even, as np.around in the reference
    H = kh + 1

    # 1-2. One pass over distance blocks: row maxima, k1 + 1 nearest neighbours, raw query x gallery block.
    nn = _NearestNeighbours(n, K, dtype, device)
    out = torch.empty((num_query, num_gallery), dtype=dtype, device=device)
    spans = _spans(0, num_query, chunk) + _spans(num_query, n, chunk)
    for r0, r1, c0, c1, mirrored in _block_pairs(spans, source.symmetric, max(1, chunk // 4)):
        block = source.block(r0, r1, c0, c1).to(dtype)  # a view of the input for given distances
        if mirrored:
            nn.update_symmetric(r0, r1, c0, c1, block)
        else:
            nn.update(r0, r1, block, c0, dim=0)
        if r0 < num_query <= c0:
            out[r0:r1, c0 - num_query : c1 - num_query] = block
        del block
    rowmax = nn.rowmax.square()
    rowmax = torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax))
    knn_val, knn = nn.sorted()
    del nn
    knn_d = knn_val.square() / rowmax[:, None]

    # 3. k-reciprocal sets and their expansion R*(p), then the sparse V rows.
    row_chunk = max(64, budget // (K * H * K))
    mask_k1 = _reciprocal_mask(knn, k1, row_chunk)
    mask_kh = _reciprocal_mask(knn, kh, row_chunk)
    v_rows, v_cols, v_vals = [], [], []
    for r0, r1 in _spans(0, n, row_chunk):
        cand, cand_ok = knn[r0:r1], mask_k1[r0:r1]  # (c, K): R(p, k1) = cand[cand_ok]
        half, half_ok = knn[cand, :H], mask_kh[cand]  # (c, K, H): R(q, kh) for each candidate q
        # Where each x of R(q, kh) sits in p's neighbour list (if at all): gives x in R(p, k1) and d(p, x).
        found, where_in_p = (half[..., None] == cand[:, None, None, :]).to(torch.uint8).max(-1)  # (c, K, H)
        found = found.bool()
        where_in_p = where_in_p.flatten(1)
        in_r = found & torch.gather(cand_ok, 1, where_in_p).view_as(found)
        overlap = (in_r & half_ok).sum(-1).double()
        accept = cand_ok & (overlap > (2.0 / 3) * half_ok.sum(-1).double())
        members = torch.cat(
            [torch.where(cand_ok, cand, -1), torch.where(accept[..., None] & half_ok, half, -1).flatten(1)], 1
        )
        p_d = knn_d[r0:r1]
        dist = torch.cat([p_d, torch.gather(p_d, 1, where_in_p)], 1)
        known = torch.cat([torch.ones_like(cand_ok), found.flatten(1)], 1)
        members, order = torch.sort(members, dim=1)
        dist, known = torch.gather(dist, 1, order), torch.gather(known, 1, order)
        valid = members >= 0
        valid[:, 1:] &= members[:, 1:] != members[:, :-1]
        # d(p, x) for x outside p's own neighbour list: computed for the pair.
        missing = valid & ~known
        if bool(missing.any()):
            prow, pcol = missing.nonzero(as_tuple=True)
            prow_g = prow + r0
            dist[prow, pcol] = source.pairs(prow_g, members[prow, pcol]).to(dtype).square() / rowmax[prow_g]
        weight = torch.where(valid, torch.exp(-dist), torch.zeros((), dtype=dtype, device=device))
        weight = weight / weight.sum(1, keepdim=True)
        prow, pcol = valid.nonzero(as_tuple=True)
        v_rows.append(prow + r0)
        v_cols.append(members[prow, pcol])
        v_vals.append(weight[prow, pcol])
    del mask_k1, mask_kh, knn_d, knn_val
    v_row, v_col, v_val = torch.cat(v_rows), torch.cat(v_cols), torch.cat(v_vals)
    del v_rows, v_cols, v_vals
    counts = torch.bincount(v_row, minlength=n)

    # 5. Local query expansion: V[p] <- mean of the V rows of p's k2 nearest (sparse gather + coalesce).
    if k2 != 1:
        crow = torch.cumsum(counts, 0) - counts
        nbr = knn[:, :k2]
        cost = counts[nbr].sum(1)
        q_rows, q_cols, q_vals = [], [], []
        for r0, r1 in _budget_chunks(cost, budget, n):
            src = nbr[r0:r1].reshape(-1)
            owner = torch.arange(r0, r1, device=device).repeat_interleave(k2)
            seg, offset = _segments(counts[src])
            pos = crow[src][seg] + offset
            key = owner[seg] * n + v_col[pos]
            uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
            summed = torch.zeros(uniq.shape[0], dtype=dtype, device=device).index_add_(0, inverse, v_val[pos])
            q_rows.append(torch.div(uniq, n, rounding_mode="floor"))
            q_cols.append(uniq % n)
            q_vals.append(summed / k2)
        v_row, v_col, v_val = torch.cat(q_rows), torch.cat(q_cols), torch.cat(q_vals)
        del q_rows, q_cols, q_vals
        counts = torch.bincount(v_row, minlength=n)
    del knn

    # 6. Inverted index over the gallery rows of V: column x -> (gallery row, value).
    is_gallery = v_row >= num_query
    g_row, g_col, g_val = v_row[is_gallery], v_col[is_gallery], v_val[is_gallery]
    order = torch.argsort(g_col, stable=True)
    g_row, g_col, g_val = g_row[order] - num_query, g_col[order], g_val[order]
    col_count = torch.bincount(g_col, minlength=n)
    col_start = torch.cumsum(col_count, 0) - col_count
    del order, g_col, is_gallery

    num_q_entries = int(counts[:num_query].sum())
    q_row, q_col, q_val = v_row[:num_q_entries], v_col[:num_q_entries], v_val[:num_q_entries]
    q_counts = counts[:num_query]
    q_start = torch.cumsum(q_counts, 0) - q_counts
    entry_cost = col_count[q_col]
    query_cost = torch.zeros(num_query, dtype=torch.long, device=device).index_add_(0, q_row, entry_cost)
    max_rows = max(1, budget // max(1, num_gallery))
    for r0, r1 in _budget_chunks(query_cost, budget, max_rows):
        e0 = int(q_start[r0])
        e1 = int(q_start[r1 - 1] + q_counts[r1 - 1])
        # Entry e = (query row, column x, V value) of the chunk meets every gallery entry of column x.
        lens = entry_cost[e0:e1]
        delta = col_start[q_col[e0:e1]] - (torch.cumsum(lens, 0) - lens)
        entry = torch.repeat_interleave(lens)
        pos = torch.arange(entry.shape[0], device=device) + delta[entry]
        flat = ((q_row[e0:e1] - r0) * num_gallery)[entry] + g_row[pos]
        m = torch.zeros((r1 - r0) * num_gallery, dtype=dtype, device=device)
        m.scatter_add_(0, flat, torch.minimum(q_val[e0:e1][entry], g_val[pos]))
        m = m.view(r1 - r0, num_gallery)
        # d_J = 1 - m / (2 - m), then 7. final = d_J (1 - lambda) + d lambda, in place, same rounding order as
        # the reference; the raw D of this block sits in `out` since step 1.
        m.div_(2 - m).neg_().add_(1).mul_(1 - lambda_value)
        block = out[r0:r1]
        block.square_().div_(rowmax[r0:r1, None]).mul_(lambda_value).add_(m)
    return out


# -------------------------------------------------------------------------------------------- public API


def _check_params(k1: Any, k2: Any, lambda_value: Any, n: int, chunk_size: Any) -> None:
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if k2 > k1:
        raise ValueError(
            f"k2 must be <= k1 (query expansion uses k1's neighbour lists), got k1={k1}, k2={k2}"
        )
    if k1 >= n:
        raise ValueError(f"k1 must be < num_query + num_gallery = {n}, got {k1}")
    if not isinstance(lambda_value, (int, float)) or not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _default_chunk(device: torch.device) -> int:
    return _GPU_CHUNK if device.type == "cuda" else _CPU_CHUNK


def _budget(device: torch.device) -> int:
    return _GPU_BUDGET if device.type == "cuda" else _CPU_BUDGET


def k_reciprocal_rerank(
    query_features: Tensor,
    gallery_features: Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """k-reciprocal re-ranked query x gallery distance (Zhong et al., CVPR 2017), sparse and chunked.

    Equals the torchreid / fast-reid numpy ``re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)`` fed with
    ``metric`` distances of these features (see the module docstring for the algorithm and the rounding-level
    deviations). Input convention, exactly as torchreid's engine does it: the base distance ``D`` is
    ``metric="euclidean"``: the squared euclidean distance ``|x - y|^2``; ``metric="cosine"``:
    ``1 - cos(x, y)``; the algorithm then squares ``D`` and divides each row by its maximum over all ``N``
    items. On L2-normalised features both metrics give the same result (``|x - y|^2 = 2 (1 - cos)`` and the
    factor 2 cancels), which is fast-reid's default cosine setting.

    Never materialises an ``N x N`` matrix; memory is the ``(num_query, num_gallery)`` output plus
    O(``chunk_size^2 + N * k1 * k2``).

    Args:
        query_features: ``(num_query, dim)`` features.
        gallery_features: ``(num_gallery, dim)`` features.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: size of the local query expansion, ``1 <= k2 <= k1``; 1 disables it (paper: 6).
        lambda_value: weight of the original distance in the final blend, in ``[0, 1]`` (paper: 0.3).
            1 returns the normalised original distance ``D^2 / rowmax``; 0 the Jaccard distance alone.
        metric: ``"euclidean"`` (squared euclidean) or ``"cosine"`` (``1 - cos``) base distance.
        chunk_size: rows/columns of one distance block; ``None``: 1536 on CPU, 8192 on GPU.
        device: where to compute; ``None``: the device of ``query_features``.

    Returns:
        ``(num_query, num_gallery)`` re-ranked distance on ``device``, float32 (float64 if an input is
        float64).

    Raises:
        ValueError: on non-2-D or mismatched features, empty sets, non-finite values, or bad parameters.

    Example:
        >>> g = torch.randn(40, 8)
        >>> k_reciprocal_rerank(g[:5] + 0.01, g, k1=6, k2=3).shape
        torch.Size([5, 40])
    """
    for name, feats in (("query_features", query_features), ("gallery_features", gallery_features)):
        if not isinstance(feats, Tensor) or feats.ndim != 2 or feats.shape[0] == 0:
            shape = tuple(feats.shape) if hasattr(feats, "shape") else type(feats).__name__
            raise ValueError(f"{name} must be a non-empty 2-D tensor (n, dim), got {shape}")
        if not feats.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {feats.dtype}")
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"feature dims differ: query {query_features.shape[1]} vs gallery {gallery_features.shape[1]}"
        )
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    num_query, num_gallery = query_features.shape[0], gallery_features.shape[0]
    n = num_query + num_gallery
    _check_params(k1, k2, lambda_value, n, chunk_size)
    device = torch.device(device) if device is not None else query_features.device
    dtype = _compute_dtype(query_features, gallery_features)
    features = torch.cat(
        [query_features.detach().to(device, dtype), gallery_features.detach().to(device, dtype)]
    )
    chunk = chunk_size or _default_chunk(device)
    with torch.no_grad():
        source = _FeatureDistances(features, metric, _budget(device))
        # A NaN or inf anywhere makes its row's squared norm non-finite: one pass over (N,) instead of (N, dim).
        if not bool(torch.isfinite(source.sqnorm).all()):
            if not bool(torch.isfinite(features).all()):
                raise ValueError("features contain NaN or inf")
            raise ValueError(
                f"features too large: a squared norm overflows {dtype} (max |value| "
                f"{float(features.abs().max()):.3g}); rescale them"
            )
        with ranking_threads():  # the cores left free by other jobs (see shared_machine_threads)
            return _rerank(source, n, num_query, k1, k2, float(lambda_value), chunk, dtype, device)


def re_ranking_from_distances(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk_size: int | None = None,
) -> Tensor:
    """Drop-in for the torchreid / fast-reid numpy ``re_ranking`` on precomputed distances.

    Same algorithm and sparse machinery as :func:`k_reciprocal_rerank` (the inputs are squared inside, as in
    the reference), reading the three blocks in place instead of concatenating the ``N x N`` matrix. Memory is
    therefore dominated by ``g_g_dist`` itself: prefer :func:`k_reciprocal_rerank` at scale.

    Args:
        q_g_dist: ``(num_query, num_gallery)`` base distances (numpy array or tensor).
        q_q_dist: ``(num_query, num_query)`` base distances.
        g_g_dist: ``(num_gallery, num_gallery)`` base distances.
        k1: k-reciprocal neighbourhood size.
        k2: query expansion size, ``1 <= k2 <= k1``.
        lambda_value: weight of the original distance, in ``[0, 1]``.
        chunk_size: rows/columns of one block; ``None``: 1536 on CPU, 8192 on GPU.

    Returns:
        ``(num_query, num_gallery)`` re-ranked distance, float32 (float64 for float64 inputs), on the
        device of ``q_g_dist``.

    Raises:
        ValueError: on inconsistent shapes, non-finite values or bad parameters.
    """
    q_g, q_q, g_g = (torch.as_tensor(x) for x in (q_g_dist, q_q_dist, g_g_dist))
    if q_g.ndim != 2 or q_g.shape[0] == 0 or q_g.shape[1] == 0:
        raise ValueError(f"q_g_dist must be a non-empty 2-D matrix, got {tuple(q_g.shape)}")
    num_query, num_gallery = q_g.shape
    if tuple(q_q.shape) != (num_query, num_query):
        raise ValueError(f"q_q_dist must be ({num_query}, {num_query}), got {tuple(q_q.shape)}")
    if tuple(g_g.shape) != (num_gallery, num_gallery):
        raise ValueError(f"g_g_dist must be ({num_gallery}, {num_gallery}), got {tuple(g_g.shape)}")
    n = num_query + num_gallery
    _check_params(k1, k2, lambda_value, n, chunk_size)
    device = q_g.device
    dtype = _compute_dtype(q_g, q_q, g_g)
    q_g, q_q, g_g = (x.to(device) for x in (q_g, q_q, g_g))
    for name, x in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
    chunk = chunk_size or _default_chunk(device)
    with torch.no_grad(), ranking_threads():
        return _rerank(
            _GivenDistances(q_g, q_q, g_g), n, num_query, k1, k2, float(lambda_value), chunk, dtype, device
        )
