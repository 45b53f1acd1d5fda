"""The model's own ReID losses, as composable weighted plugins.

Each loss is called as ``loss(outputs, pids)`` on a :class:`reid_lab.models.ReIDModel` output dict and
returns an unweighted scalar; the host adds ``loss.weight * loss(outputs, pids)`` over its list of losses
and calls ``loss.bind(num_classes, feature_dim)`` once after building the model. The short names of
:data:`LOSSES` are the ones scenario configs use. Compatible-upgrade losses are in
:mod:`reid_lab.losses.compatible`.
"""

from __future__ import annotations

import inspect
from typing import Any

from reid_lab.losses.base import ReIDLoss
from reid_lab.losses.center import CenterLoss
from reid_lab.losses.circle import CircleLoss, circle_loss
from reid_lab.losses.cross_entropy import CrossEntropyLoss, label_smoothing_cross_entropy
from reid_lab.losses.margin_classifiers import ArcFaceLoss, CosFaceLoss
from reid_lab.losses.triplet import TripletLoss, batch_hard_mining, euclidean_distances

LOSSES: dict[str, type[ReIDLoss]] = {
    "ce": CrossEntropyLoss,
    "triplet": TripletLoss,
    "circle": CircleLoss,
    "arcface": ArcFaceLoss,
    "cosface": CosFaceLoss,
    "center": CenterLoss,
}


def build_loss(name: str, **kwargs: Any) -> ReIDLoss:
    """Build one of the model's own losses by short name.

    Args:
        name: a key of :data:`LOSSES`.
        **kwargs: constructor arguments of that loss (e.g. ``margin=0.3, weight=1.0``).

    Example:
        >>> build_loss("triplet", margin=None)
        TripletLoss(margin=soft, normalize_features=False, feature_key='features', weight=1.0)
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    cls = LOSSES[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        allowed = [p for p in inspect.signature(cls).parameters]
        raise TypeError(
            f"bad arguments {sorted(kwargs)} for loss {name!r} ({cls.__name__}): {err}; it accepts {allowed}"
        ) from None
    return cls(**kwargs)


__all__ = [
    "LOSSES",
    "ArcFaceLoss",
    "CenterLoss",
    "CircleLoss",
    "CosFaceLoss",
    "CrossEntropyLoss",
    "ReIDLoss",
    "TripletLoss",
    "batch_hard_mining",
    "build_loss",
    "circle_loss",
    "euclidean_distances",
    "label_smoothing_cross_entropy",
]
