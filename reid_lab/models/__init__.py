"""ReID models: backbones, pooling, the BNNeck head and the :class:`ReIDModel` that combines them."""

from __future__ import annotations

from reid_lab.models.backbones import (
    BACKBONE_NAMES,
    Backbone,
    MobileNetV2Backbone,
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
from reid_lab.models.pretrained import SOURCES, PretrainedWeightsError, pretrained_weights
from reid_lab.models.reid_model import ReIDModel
from reid_lab.models.text import TEXT_MODELS, SentenceEncoder, mean_pool, text_model_dir

__all__ = [
    "BACKBONE_NAMES",
    "BNNeckHead",
    "Backbone",
    "GeM",
    "GlobalAvgMaxPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "IBN",
    "MobileNetV2Backbone",
    "POOLINGS",
    "PretrainedWeightsError",
    "ReIDModel",
    "ResNetBackbone",
    "SOURCES",
    "SentenceEncoder",
    "TEXT_MODELS",
    "TimmBackbone",
    "build_backbone",
    "build_pooling",
    "load_weights",
    "mean_pool",
    "pretrained_weights",
    "resnet50_ibn_a",
    "text_model_dir",
]
