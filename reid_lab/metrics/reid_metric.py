"""Torchmetrics wrappers that collect query and gallery embeddings and report CMC / mAP / mINP.

* :class:`RetrievalMetric` takes the protocol as an argument: ``"reid"`` (Market-1501: camera ids, same-pid
  same-camera gallery items dropped) or ``"cross_modal"`` (no camera ids, nothing dropped: text-to-image search,
  query and gallery embeddings from different encoders of one space).
* :class:`ReIDMetric` is the ReID protocol (``RetrievalMetric`` with ``protocol="reid"``).

Both evaluate through :func:`~reid_lab.metrics.distance.evaluate_features`, the one evaluation path.

Each protocol has a short tag that metric keys and printed lines carry (:data:`PROTOCOL_TAGS`): ``i2i`` for
image -> image ReID, ``t2i`` for caption -> image retrieval, ``i2t`` for image -> caption retrieval (a caption
matches when it describes the image's identity) and ``t2t`` for caption -> caption retrieval, so
``val/i2i/mAP`` and ``test/t2i/R1`` cannot be mistaken for one another.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from reid_lab.metrics.distance import DistanceMetric, evaluate_features
from reid_lab.metrics.rank import RankResult

__all__ = ["PROTOCOLS", "PROTOCOL_DESCRIPTIONS", "PROTOCOL_TAGS", "ReIDMetric", "RetrievalMetric"]

Protocol = Literal["reid", "cross_modal", "image_to_text", "text_to_text"]
PROTOCOLS: tuple[str, ...] = ("reid", "cross_modal", "image_to_text", "text_to_text")
# The tag a protocol's metric keys carry (``val/i2i/mAP``): what the queries and the gallery are. In reid_lab the
# cross-modal protocol ranks caption queries against an image gallery (text-to-person retrieval); the two
# caption-gallery protocols are reported beside it on caption data.
PROTOCOL_TAGS: dict[str, str] = {"reid": "i2i", "cross_modal": "t2i", "image_to_text": "i2t", "text_to_text": "t2t"}
PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "reid": "image queries vs image gallery, same-identity same-camera gallery items removed",
    "cross_modal": "caption queries vs image gallery, nothing removed",
    "image_to_text": "image queries vs caption gallery (a match: a caption of the same identity), nothing removed",
    "text_to_text": "caption queries vs the other captions (a match: same identity), the query itself removed",
}


def _signature(*names: str) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])


# What ``update`` takes under each protocol: the cross-modal protocol has no camera ids.
_UPDATE_SIGNATURES = {
    "reid": _signature("features", "pids", "camids", "is_query"),
    "cross_modal": _signature("features", "pids", "is_query"),
    "image_to_text": _signature("features", "pids", "is_query"),
    "text_to_text": _signature("features", "pids"),
}


class RetrievalMetric(Metric):
    """Retrieval metric over a query set and a gallery set, under the ReID or the cross-modal protocol.

    ``update`` stores embeddings with their pids, a query/gallery flag and, under the ReID protocol, camera ids
    (list states, concatenated across processes under DDP); ``compute`` evaluates every query against every
    gallery item with :func:`~reid_lab.metrics.distance.evaluate_features` (queries without a positive are
    skipped; ties: smaller gallery index first, where the gallery order is the order of ``update`` calls).

    Protocols (``shared/reference/reid-toolboxes.md`` §3):

    * ``"reid"``: ``update(features, pids, camids, is_query)``; same-pid same-camera gallery items are dropped
      per query (Market-1501).
    * ``"cross_modal"``: ``update(features, pids, is_query)``; nothing is dropped (IRRA's text-to-image
      protocol). Query and gallery embeddings may come from different modalities (e.g. caption queries, image
      gallery) but must share one embedding space and dimension. A query is never removed from the gallery,
      so do not flag the same item as both a query and a gallery item.
    * ``"image_to_text"``: as ``"cross_modal"`` with image queries and a caption gallery (tag ``i2t``).
    * ``"text_to_text"``: ``update(features, pids)``; every item (a caption) is a query and a gallery item,
      and each query is ranked against all items but itself (tag ``t2t``). Computed by the same engine as the
      ReID protocol, with every item its own "camera", so the one item removed per query is the query itself.

    Args:
        protocol: ``"reid"``, ``"cross_modal"``, ``"image_to_text"`` or ``"text_to_text"``.
        metric: ``"cosine"`` (``1 - cos``) or ``"euclidean"`` (squared euclidean).
        max_rank: length of the CMC curve kept in :attr:`last_result`.
        normalize: L2-normalise embeddings before the distance; ``None``: True for cosine, False for euclidean.
        chunk_size: query rows per evaluation block; ``None`` picks one from the gallery size and device.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Attributes:
        tag: the protocol's tag in metric keys (:data:`PROTOCOL_TAGS`: ``i2i``, ``t2i``, ``i2t`` or ``t2t``).
        last_result: the :class:`~reid_lab.metrics.rank.RankResult` of the last ``compute`` (per-query AP/INP,
            first-match ranks, full CMC), or ``None`` before the first one.
        last_sizes: ``(num_query, num_gallery)`` of the last ``compute``, or ``None`` before the first one.

    Example:
        >>> m = RetrievalMetric(protocol="cross_modal")
        >>> text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # caption embeddings: the queries
        >>> m.update(text, torch.tensor([1, 2]), True)
        >>> images = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.2, 1.0]])  # image embeddings: the gallery
        >>> m.update(images, torch.tensor([1, 1, 2]), False)
        >>> {k: round(float(v), 2) for k, v in m.compute().items()}
        {'R1': 50.0, 'R5': 100.0, 'R10': 100.0, 'mAP': 66.67, 'mINP': 58.33}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    features: list[torch.Tensor]
    pids: list[torch.Tensor]
    camids: list[torch.Tensor]
    is_query: list[torch.Tensor]

    def __init__(
        self,
        protocol: Protocol = "reid",
        metric: DistanceMetric = "cosine",
        max_rank: int = 50,
        normalize: bool | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
        self.protocol = protocol
        self.tag = PROTOCOL_TAGS[protocol]
        self.metric = metric
        self.max_rank = max_rank
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.last_result: RankResult | None = None
        self.last_sizes: tuple[int, int] | None = None
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("pids", default=[], dist_reduce_fx="cat")
        if protocol == "reid":
            self.add_state("camids", default=[], dist_reduce_fx="cat")
        self.add_state("is_query", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, pids: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Store a batch: ``update(features, pids, camids, is_query)`` (reid), ``update(features, pids,
        is_query)`` (cross_modal, image_to_text) or ``update(features, pids)`` (text_to_text); positional or
        keyword.

        Args:
            features: ``(batch, dim)`` embeddings (any modality, one shared space).
            pids: ``(batch,)`` integer identities.
            camids: reid protocol only, ``(batch,)`` integer camera ids.
            is_query: ``(batch,)`` bool, True for query items, False for gallery items; a Python bool applies
                to the whole batch.

        Raises:
            TypeError: on arguments that do not fit the protocol (e.g. camids under ``cross_modal``).
        """
        signature = _UPDATE_SIGNATURES[self.protocol]
        try:
            bound = signature.bind(features, pids, *args, **kwargs).arguments
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}(protocol={self.protocol!r}).update{signature}: {err}") from None
        features = bound["features"]
        is_query = bound.get("is_query", False)  # text_to_text: stored as gallery items, each also a query
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a 2-d tensor (batch, dim), got {shape}")
        batch = features.shape[0]
        if self.features and features.shape[1] != self.features[0].shape[1]:
            raise ValueError(
                f"features has dim {features.shape[1]} but earlier batches had dim {self.features[0].shape[1]}"
            )
        pids = self._ids(bound["pids"], "pids", batch)
        camids = self._ids(bound["camids"], "camids", batch) if self.protocol == "reid" else None
        if isinstance(is_query, bool):
            is_query = torch.full((batch,), is_query, dtype=torch.bool, device=features.device)
        if not isinstance(is_query, torch.Tensor) or is_query.dtype != torch.bool or is_query.shape != (batch,):
            got = f"{is_query.dtype} {tuple(is_query.shape)}" if isinstance(is_query, torch.Tensor) else repr(is_query)
            raise ValueError(f"is_query must be a bool tensor of shape ({batch},) or a Python bool, got {got}")
        self.features.append(features.detach())
        self.pids.append(pids)
        if camids is not None:
            self.camids.append(camids)
        self.is_query.append(is_query)

    @staticmethod
    def _ids(ids: Any, name: str, batch: int) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {ids.dtype}")
        if ids.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},) to match features, got {tuple(ids.shape)}")
        return ids.to(torch.int64)

    def describe(self) -> str:
        """What the last ``compute`` ranked, for a printed result line: protocol, queries with a match, gallery.

        >>> m = RetrievalMetric(protocol="cross_modal")
        >>> m.update(torch.eye(2), torch.tensor([1, 3]), True)
        >>> m.update(torch.eye(2), torch.tensor([1, 2]), False)
        >>> _ = m.compute()
        >>> m.describe()
        'caption queries vs image gallery, nothing removed; 1 of 2 queries have a match, 2 gallery items'
        """
        if self.last_result is None or self.last_sizes is None:
            return PROTOCOL_DESCRIPTIONS[self.protocol]
        num_query, num_gallery = self.last_sizes
        return (f"{PROTOCOL_DESCRIPTIONS[self.protocol]}; {self.last_result.num_valid} of {num_query} queries "
                f"have a match, {num_gallery} gallery items")

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"R1", "R5", "R10", "mAP", "mINP"}`` in percent (R@k = CMC@k), as float tensors on the metric's device.

        Raises:
            ValueError: if nothing was stored, there is no query or no gallery item, or no query has a positive.
        """
        name = type(self).__name__
        # after a DDP sync the list states are single concatenated tensors: test for "no update" explicitly
        if isinstance(self.features, list) and not self.features:
            raise ValueError(f"{name}.compute() called before any update()")
        features = dim_zero_cat(self.features)
        # a DDP rank without data contributes torchmetrics' empty float placeholder, which promotes the cat
        pids = dim_zero_cat(self.pids).long()
        if self.protocol == "text_to_text":
            return self._compute_all_against_all(features, pids)
        is_query = dim_zero_cat(self.is_query).bool()
        num_query = int(is_query.sum())
        if num_query == 0 or num_query == is_query.numel():
            raise ValueError(
                f"{name} needs both query and gallery items, got {num_query} query and "
                f"{is_query.numel() - num_query} gallery items"
            )
        is_gallery = ~is_query
        q_camids = g_camids = None
        if self.protocol == "reid":
            camids = dim_zero_cat(self.camids).long()
            q_camids, g_camids = camids[is_query], camids[is_gallery]
        result = evaluate_features(
            features[is_query],
            features[is_gallery],
            pids[is_query],
            pids[is_gallery],
            q_camids,
            g_camids,
            metric=self.metric,
            max_rank=self.max_rank,
            chunk_size=self.chunk_size,
            normalize=self.normalize,
        )
        self.last_result = result
        self.last_sizes = (num_query, is_query.numel() - num_query)
        return self._summary(result)

    def _summary(self, result: RankResult) -> dict[str, torch.Tensor]:
        return {
            key: torch.tensor(value, dtype=torch.float32, device=self.device)
            for key, value in result.summary().items()
        }

    def _compute_all_against_all(self, features: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``text_to_text``: every item against the others. Each item gets a camera id of its own, so the ReID
        rule (same identity and same camera: removed) removes exactly the query from its own gallery."""
        if features.shape[0] < 2:
            raise ValueError(f"{type(self).__name__}(protocol='text_to_text') needs at least 2 items, "
                             f"got {features.shape[0]}")
        own = torch.arange(features.shape[0], device=features.device)
        result = evaluate_features(features, features, pids, pids, own, own, metric=self.metric,
                                   max_rank=self.max_rank, chunk_size=self.chunk_size, normalize=self.normalize)
        self.last_result = result
        self.last_sizes = (features.shape[0], features.shape[0] - 1)
        return self._summary(result)


class ReIDMetric(RetrievalMetric):
    """The ReID (Market-1501) protocol: :class:`RetrievalMetric` with ``protocol="reid"``.

    ``update(features, pids, camids, is_query)``; same-pid same-camera gallery items are dropped per query.

    Args:
        metric: ``"cosine"`` (``1 - cos``) or ``"euclidean"`` (squared euclidean).
        max_rank: length of the CMC curve kept in :attr:`last_result`.
        normalize: L2-normalise features before the distance; ``None``: True for cosine, False for euclidean.
        chunk_size: query rows per evaluation block; ``None`` picks one from the gallery size and device.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> m = ReIDMetric()
        >>> m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 2]), torch.tensor([0, 0]), True)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.2, 1.0]]), torch.tensor([1, 2, 2]),
        ...          torch.tensor([1, 1, 1]), False)
        >>> {k: round(float(v), 2) for k, v in m.compute().items()}
        {'R1': 100.0, 'R5': 100.0, 'R10': 100.0, 'mAP': 100.0, 'mINP': 100.0}
    """

    def __init__(
        self,
        metric: DistanceMetric = "cosine",
        max_rank: int = 50,
        normalize: bool | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__("reid", metric=metric, max_rank=max_rank, normalize=normalize, chunk_size=chunk_size,
                         **kwargs)
