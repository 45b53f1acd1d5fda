"""ReID models: backbones, pooling, the BNNeck head and the :class:`ReIDModel` that combines them."""

from __future__ import annotations

from reid_lab.models.backbones import (
    BACKBONE_NAMES,
    Backbone,
    ResNetBackbone,
    TimmBackbone,
    build_backbone,
    load_weights,
)
from reid_lab.models.heads import BNNeckHead
from reid_lab.models.ibn import IBN, resnet50_ibn_a
from reid_lab.models.pooling import (
    POOLINGS,
    GeM,
    GlobalAvgMaxPool,
    GlobalAvgPool,
    GlobalMaxPool,
    build_pooling,
)
from reid_lab.models.reid_model import ReIDModel

__all__ = [
    "BACKBONE_NAMES",
    "BNNeckHead",
    "Backbone",
    "GeM",
    "GlobalAvgMaxPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "IBN",
    "POOLINGS",
    "ReIDModel",
    "ResNetBackbone",
    "TimmBackbone",
    "build_backbone",
    "build_pooling",
    "load_weights",
    "resnet50_ibn_a",
]
