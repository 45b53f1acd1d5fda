"""CMC, mAP and mINP of a query x gallery ranking: the ReID protocol (Market-1501) and the cross-modal protocol.

Protocol (``shared/reference/reid-toolboxes.md`` §3; torchreid / fast-reid ``evaluate_rank``):

1. Each query row of the distance matrix is ranked ascending (smaller distance = more similar).
2. Junk removal, per query, only when camera ids are given (ReID protocol): gallery items with the same pid AND
   the same camera as the query are dropped. Different-id items from the query's camera stay (valid negatives);
   distractors (pid 0) stay as negatives. Without camera ids (cross-modal protocol, §3 item 10: e.g. caption
   queries against an image gallery, as IRRA) nothing is dropped: every same-pid gallery item is a positive.
3. A query with no positive left is skipped ("invalid"); means are over valid queries.
4. CMC@k: fraction of valid queries whose first positive sits at kept-rank <= k (1-based), k = 1..max_rank.
5. AP (non-interpolated) = (1/|G|) * sum over positives of precision at the positive's kept-rank.
6. INP (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI 2021)
   = |G| / R_hard, R_hard the 1-based kept-rank of the last positive.

Without camera ids a query is never removed from its gallery: for image-to-image search with the query images
inside the gallery, pass camera ids (the query's own entry is then junk) or remove the query from the gallery,
else every query finds itself at rank 1.

Tie rule (deterministic, unlike the peers' unstable ``np.argsort``): among equal distances the gallery item with
the smaller gallery index ranks first, i.e. what a stable argsort of the row does.

Two implementations share this contract:

* :func:`evaluate_rank` runs the sort-free engine (:class:`reid_lab.metrics.ranking_engine.GalleryRanker`) on
  blocks of query rows; it never sorts whole rows nor builds a ``num_query x num_gallery`` index matrix.
* :func:`evaluate_rank_reference` is the plain per-query stable-argsort loop, kept as an obviously-correct
  baseline for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reid_lab.metrics.ranking_engine import GalleryRanker, QueryStats, float_distances, ranking_threads

__all__ = [
    "RankResult",
    "check_chunk_size",
    "clip_max_rank",
    "evaluate_rank",
    "evaluate_rank_reference",
    "ids_tensor",
    "optional_camids",
]

# Elements of one (chunk_size, num_gallery) block when chunk_size is not given. The core keeps ~9 bytes of
# scratch per element (float keys, int32 keys, a bool mask): ~19 MB per block on CPU (cache-friendly; larger
# blocks measured slower), ~150 MB on GPU.
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 24}


@dataclass(frozen=True)
class RankResult:
    """Result of a ReID evaluation. Means are over valid queries; all values are fractions in ``[0, 1]``.

    Attributes:
        cmc: ``(max_rank,)`` float64, ``cmc[k - 1]`` = CMC@k.
        mAP: mean average precision.
        mINP: mean inverse negative penalty.
        all_AP: ``(num_query,)`` float64 per-query AP, NaN for skipped queries.
        all_INP: ``(num_query,)`` float64 per-query INP, NaN for skipped queries.
        valid: ``(num_query,)`` bool, True for queries with at least one positive after junk removal.
        first_match_rank: ``(num_query,)`` int64, 0-based kept-rank of the first positive (0 = rank-1 hit),
            -1 for skipped queries.
        num_valid: number of valid queries.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    all_AP: np.ndarray
    all_INP: np.ndarray
    valid: np.ndarray
    first_match_rank: np.ndarray
    num_valid: int

    @classmethod
    def from_query_stats(cls, stats: QueryStats, max_rank: int) -> RankResult:
        """Average per-query stats into a result.

        Args:
            stats: per-query stats of all queries.
            max_rank: length of the CMC curve (already clipped to the gallery size).

        Raises:
            ValueError: if no query has a positive left after junk removal.
        """
        valid = stats.num_positives > 0
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError(
                f"no valid query: none of the {valid.size} queries has a positive in the gallery (a gallery item "
                "with its pid; with camera ids, same-pid same-camera items are dropped first), so CMC/mAP are "
                "undefined"
            )
        first = stats.first_match_rank[valid]
        hits = np.bincount(first[first < max_rank], minlength=max_rank).astype(np.float64)
        cmc = np.cumsum(hits) / num_valid
        return cls(
            cmc=cmc,
            mAP=float(stats.ap[valid].mean()),
            mINP=float(stats.inp[valid].mean()),
            all_AP=stats.ap,
            all_INP=stats.inp,
            valid=valid,
            first_match_rank=stats.first_match_rank,
            num_valid=num_valid,
        )

    def summary(self, ranks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
        """Headline numbers in percent: ``{"R1", "R5", "R10", "mAP", "mINP"}`` for the default ``ranks``.

        A rank beyond ``len(cmc)`` is computed from ``first_match_rank`` (exact whatever ``max_rank`` was).
        """
        out: dict[str, float] = {}
        first = self.first_match_rank[self.valid]
        for k in ranks:
            if k < 1:
                raise ValueError(f"ranks must be >= 1, got {k}")
            value = self.cmc[k - 1] if k <= len(self.cmc) else float(np.mean(first < k))
            out[f"R{k}"] = 100.0 * float(value)
        out["mAP"] = 100.0 * self.mAP
        out["mINP"] = 100.0 * self.mINP
        return out


# ----------------------------------------------------------------------------------------------- input checks


def ids_tensor(ids: Any, name: str, length: int, device: torch.device) -> torch.Tensor:
    """Validate 1-d integer ids of length ``length``; return them as int64 on ``device`` (numpy input is copied)."""
    if isinstance(ids, torch.Tensor):
        t = ids.detach()
    else:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got numpy dtype {arr.dtype}")
        t = torch.from_numpy(np.array(arr, dtype=np.int64, copy=True))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), one id per item, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def _check_distmat(distmat: Any) -> tuple[int, int]:
    if not isinstance(distmat, (torch.Tensor, np.ndarray)):
        raise TypeError(f"distmat must be a numpy array or torch tensor, got {type(distmat).__name__}")
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-d (num_query, num_gallery), got shape {tuple(distmat.shape)}")
    if isinstance(distmat, np.ndarray):
        real = distmat.dtype.kind in "fiu"
    else:
        real = not (distmat.dtype.is_complex or distmat.dtype == torch.bool)
    if not real:
        raise TypeError(f"distmat must hold real numbers, got dtype {distmat.dtype}")
    num_query, num_gallery = distmat.shape
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"distmat is empty: shape {tuple(distmat.shape)}, no valid query")
    return int(num_query), int(num_gallery)


def _distance_block(distmat: np.ndarray | torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as a float32/float64 tensor; numpy (also memory-mapped, read-only) is never written."""
    if isinstance(distmat, torch.Tensor):
        block = distmat[start:stop].detach()
    else:
        arr = distmat[start:stop]
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, copy=True, order="C")  # torch.from_numpy refuses to alias read-only memory
        block = torch.from_numpy(arr)
    return float_distances(block)


def clip_max_rank(max_rank: int, num_gallery: int) -> int:
    """Validate ``max_rank`` (an integer >= 1) and clip it to ``num_gallery``."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    return min(int(max_rank), num_gallery)


def check_chunk_size(chunk_size: int | None, num_gallery: int, device: torch.device) -> int:
    """Validate ``chunk_size`` (query rows per block); ``None`` picks a block of ~2M (CPU) / ~16M (GPU) elements."""
    if chunk_size is None:
        elements = _AUTO_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "cuda"]
        return max(1, elements // num_gallery)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    return int(chunk_size)


def optional_camids(
    q_camids: Any, g_camids: Any, num_query: int, num_gallery: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Camera ids of both sides as int64 on ``device`` (ReID protocol), or ``(None, None)`` (cross-modal protocol).

    Raises:
        ValueError: if only one side has camera ids (ambiguous: junk removal needs both).
    """
    if q_camids is None and g_camids is None:
        return None, None
    if q_camids is None or g_camids is None:
        missing = "q_camids" if q_camids is None else "g_camids"
        raise ValueError(
            f"{missing} is None but the other side has camera ids; pass both (ReID protocol: same-pid same-camera "
            "gallery items are dropped) or neither (cross-modal protocol: nothing is dropped)"
        )
    return ids_tensor(q_camids, "q_camids", num_query, device), ids_tensor(g_camids, "g_camids", num_gallery, device)


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    max_rank: int = 50,
    *,
    chunk_size: int | None = None,
) -> RankResult:
    """CMC, mAP and mINP of a query x gallery distance matrix (protocol: see the module docstring).

    With camera ids: the ReID (Market-1501) protocol, same-pid same-camera gallery items are dropped per query.
    Without (``q_camids = g_camids = None``): the cross-modal protocol (text-to-image search), nothing is dropped.
    A query is then never removed from its gallery, so for image-to-image search with the queries inside the
    gallery pass camera ids, or remove each query from the gallery, else every query finds itself at rank 1.

    Sort-free and chunked over queries: extra memory is O(chunk_size * num_gallery). Works on numpy arrays
    (also read-only / memory-mapped; never written) and torch tensors on any device (computed there).
    Ties: the smaller gallery index ranks first (a stable argsort). Accumulation is float64.

    Args:
        distmat: ``(num_query, num_gallery)`` distances, smaller = more similar. float16/32/64 or integer.
        q_pids: ``(num_query,)`` integer query pids.
        g_pids: ``(num_gallery,)`` integer gallery pids.
        q_camids: ``(num_query,)`` integer query camera ids, or ``None`` (cross-modal protocol).
        g_camids: ``(num_gallery,)`` integer gallery camera ids, or ``None``; ``None`` exactly when ``q_camids`` is.
        max_rank: length of the CMC curve; clipped to ``num_gallery``.
        chunk_size: query rows per block; ``None`` picks ~2M (CPU) / ~16M (GPU) distances per block.

    Returns:
        :class:`RankResult` (fractions, not percent).

    Raises:
        ValueError: on shape mismatches, NaN distances, bad ``max_rank``/``chunk_size``, camera ids on one side
            only, or no valid query.
        TypeError: on non-numeric distances or non-integer ids.

    Example:
        >>> d = np.array([[0.1, 0.5, 0.2, 0.4, 0.3]])
        >>> r = evaluate_rank(d, [1], [1, 2, 3, 1, 1], [0], [1, 1, 1, 1, 0], max_rank=5)
        >>> r.cmc.tolist(), round(r.mAP, 4), round(r.mINP, 4)
        ([1.0, 1.0, 1.0, 1.0, 1.0], 0.8333, 0.6667)
        >>> round(evaluate_rank(d, [1], [1, 2, 3, 1, 1]).mAP, 4)  # no camids: g4 is a positive, not junk
        0.8056
    """
    num_query, num_gallery = _check_distmat(distmat)
    max_rank = clip_max_rank(max_rank, num_gallery)
    device = distmat.device if isinstance(distmat, torch.Tensor) else torch.device("cpu")
    chunk = check_chunk_size(chunk_size, num_gallery, device)
    qp = ids_tensor(q_pids, "q_pids", num_query, device)
    gp = ids_tensor(g_pids, "g_pids", num_gallery, device)
    qc, gc = optional_camids(q_camids, g_camids, num_query, num_gallery, device)
    ranker = GalleryRanker(gp, gc)
    parts = []
    with ranking_threads():  # the cores left free by other jobs (results do not depend on threads)
        for start in range(0, num_query, chunk):
            stop = min(start + chunk, num_query)
            block_camids = None if qc is None else qc[start:stop]
            parts.append(ranker(_distance_block(distmat, start, stop), qp[start:stop], block_camids))
    return RankResult.from_query_stats(QueryStats.concat(parts), max_rank)


# ------------------------------------------------------------------------------------------ reference path


def evaluate_rank_reference(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    max_rank: int = 50,
) -> RankResult:
    """Same contract as :func:`evaluate_rank`, computed the obvious way: a stable argsort of each row.

    Slow (one ``np.argsort(kind="stable")`` per query); meant as the baseline for tests and benchmarks.

    Example:
        >>> d = np.array([[0.1, 0.5, 0.2, 0.4, 0.3]])
        >>> round(evaluate_rank_reference(d, [1], [1, 2, 3, 1, 1], [0], [1, 1, 1, 1, 0]).mAP, 4)
        0.8333
    """
    num_query, num_gallery = _check_distmat(distmat)
    max_rank = clip_max_rank(max_rank, num_gallery)
    cpu = torch.device("cpu")
    qp = ids_tensor(q_pids, "q_pids", num_query, cpu).numpy()
    gp = ids_tensor(g_pids, "g_pids", num_gallery, cpu).numpy()
    qc, gc = optional_camids(q_camids, g_camids, num_query, num_gallery, cpu)
    num_pos = np.zeros(num_query, dtype=np.int64)
    first = np.full(num_query, -1, dtype=np.int64)
    ap = np.full(num_query, np.nan)
    inp = np.full(num_query, np.nan)
    for i in range(num_query):
        row = _distance_block(distmat, i, i + 1)[0].cpu().numpy()
        if np.isnan(row).any():
            raise ValueError("distmat contains NaN; distances must be comparable numbers")
        order = np.argsort(row, kind="stable")
        if qc is None:
            keep = np.ones(num_gallery, dtype=bool)
        else:
            keep = ~((gp[order] == qp[i]) & (gc.numpy()[order] == int(qc[i])))
        matches = gp[order][keep] == qp[i]
        hit_ranks = np.flatnonzero(matches)  # 0-based kept-ranks of the positives
        if hit_ranks.size == 0:
            continue
        n = hit_ranks.size
        num_pos[i] = n
        first[i] = hit_ranks[0]
        ap[i] = float(np.mean(np.arange(1, n + 1, dtype=np.float64) / (hit_ranks + 1.0)))
        inp[i] = n / (hit_ranks[-1] + 1.0)
    return RankResult.from_query_stats(QueryStats(num_pos, first, ap, inp), max_rank)
