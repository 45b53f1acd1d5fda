"""The ReID encoder: backbone -> global pooling -> BNNeck head (fast-reid's ``Baseline`` meta-architecture).

With the defaults (ResNet-50, ``last_stride=1``, average pooling, BNNeck, test feature after BN) this is
the BoT model of Luo et al. (CVPRW'19).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.encoder import Encoder
from reid_lab.models.backbones import build_backbone
from reid_lab.models.basis_transform import BasisTransform
from reid_lab.models.heads import BNNeckHead
from reid_lab.models.pooling import build_pooling


class ReIDModel(Encoder):
    """Backbone + pooling + BNNeck head; an image :class:`~reid_lab.embedding.encoder.Encoder`.

    Args:
        backbone: backbone name (see :func:`reid_lab.models.build_backbone`).
        num_classes: training identities; 0 builds no classifier.
        last_stride: stride of the backbone's last stage (1 as in BoT, or 2).
        pooling: ``"avg"``, ``"max"``, ``"gem"`` or ``"avgmax"``; unused for non-spatial (token) backbones.
        embedding_dim: optional reduced embedding dimension (a bias-free linear layer before the BN).
        neck_feat: test embedding ``"before"`` or ``"after"`` the BNNeck.
        weights: optional local file with backbone weights (ImageNet or a previous ReID backbone).
        pretrained: ``"imagenet"``: backbone weights shipped in an installed package (``mobilenet_v2``,
            ``timm:efficientnet_lite0``, ``timm:tf_efficientnet_lite0``; :mod:`reid_lab.models.pretrained`).
            Like ``weights`` it only matters before a checkpoint's state dict is loaded, so a checkpoint never
            needs the package to rebuild; :attr:`pretrained_source` says what the weights started from.
        timm_kwargs: extra ``timm.create_model`` arguments for ``"timm:<name>"`` backbones.
        last_activation: False: pooled features before the backbone's last activation (``mobilenet_v2``, timm's
            EfficientNet / MobileNet family; :func:`reid_lab.models.build_backbone`).
        input_norm: ``{"mean": [r, g, b], "std": [r, g, b]}`` the backbone's weights expect. Images arrive
            normalised with the ImageNet mean / std (:mod:`reid_lab.data.transforms`) and are re-normalised
            to this before the backbone. ``None``: as they arrive, or, with ``pretrained``, what the weights'
            source declares (EfficientNet-Lite0: mean = std = 0.5; a CLIP tower with ``weights``: OpenAI's).
            Recorded in :meth:`spec` as resolved.
        clip_kwargs: options of a ``"clip"`` / ``"clip:<open_clip name>"`` backbone (the CLIP image tower, e.g.
            ``{"image_size": [256, 128], "feature": "cls+proj"}`` as CLIP-ReID; :class:`~reid_lab.models.backbones.
            CLIPViTBackbone`); ``last_stride`` does not apply to it.
        classifier: ``"linear"`` (learned) or ``"simplex"``: the fixed d-Simplex of CoReS with ``num_classes``
            pre-allocated vertices (``0``: ``D + 1``, CoReS's ``d = K - 1``; :class:`~reid_lab.models.heads.BNNeckHead`).
        basis_transform: BT²'s basis transformation on top of the BNNeck, ``{"old_dim": d_old, "add_dim": 32,
            "scale": 2.0, "orthogonal_map": "matrix_exp"}`` (:class:`~reid_lab.models.basis_transform.BasisTransform`):
            the test embedding becomes ``(B, D + add_dim)`` whose first ``old_dim`` coordinates are the
            old-compatible ones; the BNNeck's embedding stays the classifier's feature and is returned as
            ``"branch"``.

    Example:
        >>> import torch
        >>> model = ReIDModel("resnet18", num_classes=10)
        >>> out = model(torch.zeros(2, 3, 64, 32))
        >>> sorted(out), out["embedding"].shape
        (['bn_features', 'embedding', 'features', 'logits'], torch.Size([2, 512]))
        >>> sorted(model.eval().encode({"image": torch.zeros(2, 3, 64, 32)}))
        ['image', 'logits']
    """

    modalities = ("image",)
    init_only_args = ("weights", "pretrained")  # the checkpoint holds every weight

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 0,
        last_stride: int = 1,
        pooling: str = "avg",
        embedding_dim: int | None = None,
        neck_feat: str = "after",
        weights: str | Path | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        input_norm: Mapping[str, Sequence[float]] | None = None,
        last_activation: bool = True,
        clip_kwargs: Mapping[str, Any] | None = None,
        classifier: str = "linear",
        basis_transform: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(
            backbone, last_stride=last_stride, weights=weights, pretrained=pretrained, timm_kwargs=timm_kwargs,
            last_activation=last_activation, clip_kwargs=clip_kwargs,
        )
        self.pretrained_source: str | None = self.backbone.pretrained_source
        clip_tower = str(backbone) == "clip" or str(backbone).startswith("clip:")
        # pretrained weights expect their own pixel statistics (a CLIP tower: OpenAI's mean / std)
        if input_norm is None and (pretrained is not None or (clip_tower and weights is not None)):
            input_norm = {"mean": list(self.backbone.input_mean), "std": list(self.backbone.input_std)}
        input_norm = _check_input_norm(input_norm)
        self.record_init_args(
            backbone=backbone, num_classes=num_classes, last_stride=last_stride, pooling=pooling,
            embedding_dim=embedding_dim, neck_feat=neck_feat, weights=None if weights is None else str(weights),
            timm_kwargs=None if timm_kwargs is None else dict(timm_kwargs),
            pretrained=pretrained, input_norm=input_norm, last_activation=bool(last_activation),
            clip_kwargs=None if clip_kwargs is None else dict(clip_kwargs),
            **({"classifier": classifier} if classifier != "linear" else {}),
            **({"basis_transform": dict(basis_transform)} if basis_transform is not None else {}),
        )
        self.renormalize = input_norm is not None and (
            tuple(input_norm["mean"]) != IMAGENET_MEAN or tuple(input_norm["std"]) != IMAGENET_STD
        )
        if self.renormalize:
            assert input_norm is not None
            mean, std = torch.tensor(input_norm["mean"]), torch.tensor(input_norm["std"])
            imnet_mean, imnet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            # x_weights = (x_pixels - mean) / std with x_pixels = x_imagenet * imnet_std + imnet_mean;
            # not persistent: the state dict's keys do not depend on it (the spec records it)
            self.register_buffer("_renorm_scale", (imnet_std / std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("_renorm_shift", ((imnet_mean - mean) / std).view(1, 3, 1, 1), persistent=False)
        pool = build_pooling(pooling)  # validates the name even where a token backbone does not need it
        self.pooling: nn.Module = pool if self.backbone.is_spatial else nn.Identity()
        if classifier == "simplex" and num_classes == 0:
            num_classes = (embedding_dim or self.backbone.num_features) + 1
        self.head = BNNeckHead(
            self.backbone.num_features,
            num_classes=num_classes,
            embedding_dim=embedding_dim,
            neck_feat=neck_feat,
            classifier=classifier,
        )
        self.basis: BasisTransform | None = None
        if basis_transform is not None:
            if classifier == "simplex":
                raise ValueError("basis_transform and classifier: simplex do not combine: the simplex vertices are "
                                 "the compatible space there, BT² trains one against the old model")
            options = dict(basis_transform)
            allowed = {"old_dim", "add_dim", "scale", "orthogonal_map"}
            if set(options) - allowed or "old_dim" not in options:
                raise ValueError(f"basis_transform takes {sorted(allowed)} (old_dim required: the old model's "
                                 f"embedding dimension), got {sorted(options)}")
            self.basis = BasisTransform(self.backbone.num_features, self.head.embedding_dim, **options)

    @property
    def embedding_dim(self) -> int:
        """Dimension of ``embedding``: ``D``, or ``D + add_dim`` with a basis transformation."""
        return self.basis.out_dim if self.basis is not None else self.head.embedding_dim

    @property
    def feature_dim(self) -> int:
        """Dimension ``D`` of ``features`` and ``bn_features`` (what the classifier and metric losses see)."""
        return self.head.embedding_dim

    @property
    def num_classes(self) -> int:
        """Number of classifier outputs (0 when there is no classifier)."""
        return self.head.num_classes

    @property
    def classifier_weight(self) -> Tensor | None:
        """The ``(num_classes, D)`` learned classifier matrix (applied to ``bn_features``), or None without one.

        None for a simplex head too: its rows are indexed by identity, not by this model's training classes, so
        plugins that read an old classifier per class (BCT, LCE) cannot use it as one.
        """
        return None if self.head.classifier is None else self.head.classifier.weight

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Encode a batch of images.

        Args:
            images: ``(B, 3, H, W)``.

        Returns:
            ``"features"`` ``(B, D)`` pooled feature before the BN (for triplet / center losses),
            ``"bn_features"`` ``(B, D)`` after the BNNeck, ``"embedding"`` ``(B, D)`` the test feature
            (``neck_feat`` choice, not L2-normalised) and, when ``num_classes > 0``, ``"logits"``
            ``(B, num_classes)``. With a basis transformation, ``"embedding"`` is BT²'s ``(B, D + add_dim)`` and
            ``"branch"`` the BNNeck's ``(B, D)`` embedding it was made from.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ReIDModel expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.renormalize:
            images = images * self._renorm_scale + self._renorm_shift
        pooled = self.pooling(self.backbone(images))
        out = self.head(pooled)
        if self.basis is not None:
            out["branch"] = out["embedding"]
            out["embedding"] = self.basis(out["branch"], pooled)
        return out

    def encode(self, batch) -> dict[str, Tensor]:
        """``{"image": (B, D)}`` test embeddings of ``batch["image"]`` and, with a classifier, ``"logits"``."""
        self.check_batch(batch)
        out = self(batch["image"])
        return {"image": out["embedding"], **({"logits": out["logits"]} if "logits" in out else {})}


def _check_input_norm(input_norm: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]] | None:
    if input_norm is None:
        return None
    if not isinstance(input_norm, Mapping) or set(input_norm) != {"mean", "std"}:
        raise ValueError(f"input_norm must be {{'mean': [r, g, b], 'std': [r, g, b]}}, got {input_norm!r}")
    out = {k: [float(x) for x in input_norm[k]] for k in ("mean", "std")}
    if any(len(v) != 3 for v in out.values()) or any(s <= 0 for s in out["std"]):
        raise ValueError(f"input_norm needs 3 means and 3 positive stds, got {input_norm!r}")
    return out
