"""Searching a gallery index with query features, refusing incompatible embedding spaces.

:func:`search_features` is the one entry point that respects the upgrade contract: before any vector is
compared it calls :func:`reid_lab.embedding.space.check_compatible` on the query and gallery space records,
so a gallery embedded by another model is only searched under a verified compatibility claim (or the
explicit ``allow_unverified`` override).

The metrics of :class:`SearchResult` follow the protocol of the data, as ``reid_lab.metrics.evaluate_rank``
does: when the queries and the gallery carry camera ids (ReID protocol, Market-1501) the hits with the query's
pid AND camera are junk and dropped from each top-``k`` list before ranking (a query inside the gallery is its
own junk); without camera ids (cross-modal protocol) nothing is dropped. The metrics are then
:func:`reid_lab.metrics.topk.topk_retrieval_metrics` of the kept lists: with ``k`` = gallery size, R1 and mAP@k
are ``evaluate_rank``'s R1 and mAP (tied scores aside: ``evaluate_rank`` ranks the smaller gallery index first,
faiss has its own order); with a smaller ``k``, mAP@k is the truncated AP@k of the top-``k`` list, not
the full-ranking mAP (see that module). How far an approximate index is from exact search is
:func:`neighbour_overlap_at_k`, a property of the index, not a retrieval metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reid_lab.atomic import atomic_torch_save, atomic_write_json
from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import check_compatible
from reid_lab.metrics.topk import topk_retrieval_metrics
from reid_lab.retrieval.index import GalleryIndex

#: One line per protocol, for the header of every table that shows search metrics.
PROTOCOL_DESCRIPTIONS = {
    "reid": "ReID protocol (feature files carry camids): same-pid same-camera hits are junk, dropped before "
            "ranking, as evaluate_rank",
    "cross_modal": "cross-modal protocol (feature files carry no camids): nothing dropped, every same-pid hit "
                   "is a positive (a query inside the gallery finds itself)",
}


def neighbour_overlap_at_k(approx_ids: Tensor, exact_ids: Tensor, k: int | None = None) -> float:
    """Overlap of approximate and exact top-``k`` neighbour sets: mean over queries of ``|A ∩ E| / k``.

    The ANN literature calls this "recall@k" of an index; it compares two searches and ignores identities, so
    it is not the retrieval R@k (a relevant item within the top ``k``) of :mod:`reid_lab.metrics.topk`.

    Args:
        approx_ids: ``(num_query, >= k)`` ids from an approximate search (``-1`` never matches).
        exact_ids: ``(num_query, >= k)`` ids from exact search.
        k: cut-off; defaults to ``exact_ids.shape[1]``.

    Returns:
        A fraction in ``[0, 1]``.

    Example:
        >>> neighbour_overlap_at_k(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[2, 1], [3, 5]]))
        0.75
    """
    k = exact_ids.shape[1] if k is None else k
    if approx_ids.ndim != 2 or exact_ids.ndim != 2 or approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"approx_ids and exact_ids must be (num_query, k) with the same num_query, got "
                         f"{tuple(approx_ids.shape)} and {tuple(exact_ids.shape)}")
    if not 1 <= k <= min(approx_ids.shape[1], exact_ids.shape[1]):
        raise ValueError(f"k={k} must be between 1 and the number of returned neighbours "
                         f"{min(approx_ids.shape[1], exact_ids.shape[1])}")
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    hits = ((a.unsqueeze(2) == e.unsqueeze(1)) & (a.unsqueeze(2) >= 0)).any(dim=2).sum(dim=1)
    return float(hits.float().mean() / k)


@dataclass
class SearchResult:
    """Top-``k`` hits of ``num_query`` queries in a gallery index.

    Attributes:
        ids: ``(num_query, k)`` int64 gallery rows (``-1``: no hit).
        scores: ``(num_query, k)`` float32 cosine similarities, descending.
        gallery_pids: ``(num_query, k)`` int64 pids of the hits (``-1`` for no hit).
        gallery_camids: ``(num_query, k)`` int64 camids of the hits.
        query_pids: ``(num_query,)`` int64, or ``None`` when unknown.
        query_camids: ``(num_query,)`` int64 under the ReID protocol (junk = same pid and camera); ``None``
            for the cross-modal protocol (nothing dropped).
        query_paths: ``num_query`` query image paths.
        num_positives: ``(num_query,)`` gallery items sharing each query's pid, or ``None``.
        gallery_paths: the index's path list (row ``i`` is gallery item ``i``); not copied.
        query_space, gallery_space: space ids of both sides.
    """

    ids: Tensor
    scores: Tensor
    gallery_pids: Tensor
    gallery_camids: Tensor
    query_pids: Tensor | None = None
    query_camids: Tensor | None = None
    query_paths: list[str] = field(default_factory=list)
    num_positives: Tensor | None = None
    gallery_paths: list[str] = field(default_factory=list, repr=False)
    query_space: str = "<unknown>"
    gallery_space: str = "<unknown>"

    @property
    def k(self) -> int:
        """Neighbours returned per query."""
        return int(self.ids.shape[1])

    @property
    def protocol(self) -> str:
        """``"reid"`` (query camids known: same-camera junk dropped) or ``"cross_modal"`` (nothing dropped)."""
        return "cross_modal" if self.query_camids is None else "reid"

    def neighbour_overlap_at_k(self, exact: SearchResult | Tensor, k: int | None = None) -> float:
        """:func:`neighbour_overlap_at_k` of these ids against an exact result (a SearchResult or its ``ids``)."""
        exact_ids = exact.ids if isinstance(exact, SearchResult) else exact
        return neighbour_overlap_at_k(self.ids, exact_ids, self.k if k is None else k)

    def matches(self) -> Tensor:
        """``(num_query, k)`` bool: hit shares the query's pid (a negative pid means unknown: no match)."""
        if self.query_pids is None:
            raise ValueError("query pids are unknown; retrieval metrics need them")
        query_pids = self.query_pids.unsqueeze(1)
        return (self.gallery_pids == query_pids) & (self.ids >= 0) & (query_pids >= 0)

    def junk(self) -> Tensor:
        """``(num_query, k)`` bool: hit shares the query's pid AND camera (ReID protocol); all False without camids."""
        matches = self.matches()
        if self.query_camids is None:
            return torch.zeros_like(matches)
        return matches & (self.gallery_camids == self.query_camids.unsqueeze(1))

    def metrics(self) -> dict[str, float]:
        """R1, R@k, P@k and mAP@k in percent: :func:`~reid_lab.metrics.topk.topk_retrieval_metrics` of the hits
        after the protocol's junk (:meth:`junk`) is dropped.

        Queries without a positive in the gallery (junk excluded) are skipped, as in ``evaluate_rank``; without
        gallery positive counts every query with a known pid counts. Returns ``{}`` when query pids are unknown,
        ``{"num_valid_queries": 0.0}`` when no query has a positive.
        """
        if self.query_pids is None:
            return {}
        ranks = (1,) if self.k == 1 else (1, self.k)
        if self.num_positives is None:
            known = self.query_pids >= 0
            return topk_retrieval_metrics(self.matches()[known], None, ranks=ranks, junk=self.junk()[known])
        return topk_retrieval_metrics(self.matches(), self.num_positives, ranks=ranks, junk=self.junk())

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for JSON: per-query ids, scores, pids and paths of the hits, and the metrics."""
        hit_paths = [[self.gallery_paths[i] if 0 <= i < len(self.gallery_paths) else "" for i in row]
                     for row in self.ids.tolist()]
        return {
            "k": self.k,
            "protocol": self.protocol,
            "query_space": self.query_space,
            "gallery_space": self.gallery_space,
            "query_paths": list(self.query_paths),
            "query_pids": None if self.query_pids is None else self.query_pids.tolist(),
            "ids": self.ids.tolist(),
            "scores": [[s if s != float("-inf") else None for s in row] for row in self.scores.tolist()],
            "gallery_pids": self.gallery_pids.tolist(),
            "gallery_paths": hit_paths,
            "metrics": self.metrics(),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``.json`` (:meth:`to_dict`) or ``.pt`` (tensors), atomically."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_json(path, self.to_dict())
            return path
        if path.suffix == ".pt":
            payload = {
                "format": "reid_lab.search_result/1", "protocol": self.protocol,
                "ids": self.ids, "scores": self.scores, "gallery_pids": self.gallery_pids,
                "gallery_camids": self.gallery_camids, "query_pids": self.query_pids,
                "query_camids": self.query_camids, "query_paths": list(self.query_paths),
                "num_positives": self.num_positives, "query_space": self.query_space,
                "gallery_space": self.gallery_space, "metrics": self.metrics(),
            }
            return atomic_torch_save(payload, path)
        raise ValueError(f"search results go to a .json or .pt file, got {path}")


def search_features(index: GalleryIndex, queries: FeatureSet, k: int = 10, *,
                    allow_unverified: bool = False) -> SearchResult:
    """Search ``index`` with every row of ``queries`` after checking the two embedding spaces agree.

    Args:
        index: the gallery index.
        queries: query embeddings with their pids, camids, paths and space (select the query part first,
            e.g. ``FeatureSet.split()[0]``).
        k: neighbours per query.
        allow_unverified: search even without a verified compatibility claim (logged as a warning).

    The protocol of the result's metrics follows the data: camids on both sides give the ReID protocol
    (same-pid same-camera hits are junk), camids on neither the cross-modal one (nothing dropped).

    Returns:
        The :class:`SearchResult`; its ``num_positives`` count each query's gallery positives, junk excluded.

    Raises:
        IncompatibleSpacesError: the spaces differ and no claim of ``queries.space`` names ``index.space``.
        ValueError: the query dimension is not the index's, ``k`` is out of range, or only one side has camids.
    """
    check_compatible(queries.space, index.space, allow_unverified=allow_unverified)
    if queries.features.ndim != 2 or queries.features.shape[1] != index.dim:
        raise ValueError(f"queries have shape {tuple(queries.features.shape)} but the index holds "
                         f"{index.dim}-d vectors")
    if (queries.camids is not None) != index.has_camids:
        # As evaluate_rank: junk removal needs the cameras of both sides, and guessing a protocol would
        # report a number of the other one.
        raise ValueError(
            f"the queries {'carry' if queries.camids is not None else 'carry no'} camids but the index's gallery "
            f"{'has' if index.has_camids else 'has none'}: search metrics need camids on both sides (ReID "
            "protocol) or on neither (cross-modal protocol); embed both with the same data")
    scores, ids = index.search(queries.features, k)
    safe = ids.clamp(min=0)
    gallery_pids = torch.where(ids >= 0, index.pids[safe], -1)
    gallery_camids = torch.where(ids >= 0, index.camids[safe], -1)
    query_pids = queries.pids.long()
    query_camids = None if queries.camids is None else queries.camids.long()
    num_positives = _count_gallery_items(index.pids, query_pids)
    if query_camids is not None:
        num_positives -= _count_gallery_items(*_pid_camera_keys(index.pids, index.camids, query_pids, query_camids))
    num_positives = torch.where(query_pids >= 0, num_positives, 0)
    return SearchResult(
        ids=ids, scores=scores, gallery_pids=gallery_pids, gallery_camids=gallery_camids,
        query_pids=query_pids, query_camids=query_camids, query_paths=list(queries.paths),
        num_positives=num_positives, gallery_paths=index.paths,
        query_space=queries.space.get("space_id", "<unknown>"),
        gallery_space=index.space.get("space_id", "<unknown>"),
    )


def _count_gallery_items(gallery_keys: Tensor, query_keys: Tensor) -> Tensor:
    """``(num_query,)`` int64: how many gallery items have each query's key."""
    unique, counts = torch.unique(gallery_keys, return_counts=True)
    if len(unique) == 0:
        return torch.zeros_like(query_keys)
    pos = torch.searchsorted(unique, query_keys).clamp(max=len(unique) - 1)
    return torch.where(unique[pos] == query_keys, counts[pos], 0)


def _pid_camera_keys(g_pids: Tensor, g_camids: Tensor, q_pids: Tensor, q_camids: Tensor) -> tuple[Tensor, Tensor]:
    """One int64 key per (pid, camid) pair, the same encoding on both sides (gallery keys, query keys)."""
    low = min(int(g_camids.min()), int(q_camids.min())) if len(g_camids) and len(q_camids) else 0
    high = max(int(g_camids.max()), int(q_camids.max())) if len(g_camids) and len(q_camids) else 0
    width = high - low + 1
    return g_pids * width + (g_camids - low), q_pids * width + (q_camids - low)
