"""ReID evaluation: CMC / mAP / mINP (Market-1501 protocol), distances, and a torchmetrics ``Metric``.

* :func:`evaluate_rank`: from a ``(num_query, num_gallery)`` distance matrix (sort-free, chunked).
* :func:`evaluate_features`: from query / gallery features, without the full distance matrix.
* :class:`ReIDMetric`: collects features in ``update`` (DDP-aware) and evaluates them in ``compute``.
"""

from __future__ import annotations

from reid_lab.metrics.distance import compute_distance, evaluate_features
from reid_lab.metrics.rank import (
    GalleryRanker,
    QueryStats,
    RankResult,
    evaluate_rank,
    evaluate_rank_reference,
)
from reid_lab.metrics.reid_metric import ReIDMetric

__all__ = [
    "GalleryRanker",
    "QueryStats",
    "RankResult",
    "ReIDMetric",
    "compute_distance",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_rank_reference",
]
