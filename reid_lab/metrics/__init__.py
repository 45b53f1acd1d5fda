"""Retrieval evaluation: CMC / mAP / mINP under the ReID (Market-1501) or the cross-modal protocol.

* :func:`evaluate_rank`: from a ``(num_query, num_gallery)`` distance matrix (sort-free, chunked); camera ids
  optional (``None``: the cross-modal protocol, nothing is dropped).
* :func:`evaluate_features`: from query / gallery features, without the full distance matrix.
* :class:`GalleryRanker`: the sort-free ranking engine behind both (:mod:`reid_lab.metrics.ranking_engine`).
* :class:`RetrievalMetric` (``protocol="reid" | "cross_modal"``) and :class:`ReIDMetric` (the ReID protocol):
  torchmetrics wrappers that collect embeddings in ``update`` (DDP-aware) and evaluate them in ``compute``.
* :func:`topk_retrieval_metrics`: R@k, P@k and the truncated mAP@k of top-``k`` search results.
"""

from __future__ import annotations

from reid_lab.metrics.distance import compute_distance, evaluate_features
from reid_lab.metrics.rank import RankResult, evaluate_rank, evaluate_rank_reference
from reid_lab.metrics.ranking_engine import GalleryRanker, QueryStats
from reid_lab.metrics.reid_metric import ReIDMetric, RetrievalMetric
from reid_lab.metrics.topk import topk_retrieval_metrics

__all__ = [
    "GalleryRanker",
    "QueryStats",
    "RankResult",
    "ReIDMetric",
    "RetrievalMetric",
    "compute_distance",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_rank_reference",
    "topk_retrieval_metrics",
]
