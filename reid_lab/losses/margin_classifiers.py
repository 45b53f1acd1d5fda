"""Additive-margin softmax losses with their own normalised class weights: ArcFace and CosFace.

Both compute ``cos(theta_{i,k}) = <f_i / |f_i|, W_k / |W_k|>`` against a ``(num_classes, D)`` weight
matrix ``W`` owned by the loss (created in :meth:`bind`), put a margin on the target logit, scale by ``s``
and apply (optionally label-smoothed) cross-entropy. fast-reid offers them as ``ArcSoftmax`` /
``CosSoftmax`` classifier layers; here they are loss plugins so the model's own classifier stays a plain
BNNeck classifier.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reid_lab.losses.base import ReIDLoss, check_pids, full_precision, get_output, unbound_error, upcast
from reid_lab.losses.cross_entropy import label_smoothing_cross_entropy

log = logging.getLogger(__name__)


class _MarginSoftmaxLoss(ReIDLoss):
    """Shared machinery: the class-weight matrix, cosine logits and the cross-entropy.

    Args:
        scale: ``s``, the radius of the hypersphere the logits live on.
        margin: ``m``.
        epsilon: label smoothing of the cross-entropy (0: none).
        feature_key: which model output to classify (default ``"bn_features"``, as the BNNeck classifier).
        weight: host-side multiplier.
    """

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.5,
        epsilon: float = 0.0,
        feature_key: str = "bn_features",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.epsilon = float(epsilon)
        self.feature_key = feature_key
        self.class_weight: nn.Parameter | None
        self.register_parameter("class_weight", None)

    def bind(self, num_classes: int, feature_dim: int) -> None:
        """Create the ``(num_classes, feature_dim)`` class-weight matrix ``class_weight`` (``N(0, 0.01)``,
        as fast-reid). Calling it again with the same sizes keeps the existing weights."""
        if num_classes <= 0 or feature_dim <= 0:
            raise ValueError(
                f"{type(self).__name__}.bind needs num_classes > 0 and feature_dim > 0, "
                f"got num_classes={num_classes}, feature_dim={feature_dim}"
            )
        if self.class_weight is not None:
            if tuple(self.class_weight.shape) == (num_classes, feature_dim):
                return
            log.info(
                "%s: re-binding class weights from %s to %s",
                type(self).__name__,
                tuple(self.class_weight.shape),
                (num_classes, feature_dim),
            )
        self.class_weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.normal_(self.class_weight, std=0.01)

    def cosine(self, features: Tensor) -> Tensor:
        """``(B, D) -> (B, num_classes)`` cosine similarities to the class weights (at least float32)."""
        if self.class_weight is None:
            raise unbound_error(self)
        if features.dim() != 2 or features.shape[1] != self.class_weight.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: features must have shape (B, {self.class_weight.shape[1]}), "
                f"got {tuple(features.shape)}"
            )
        with full_precision(features):
            features = upcast(features)
            weight = F.normalize(self.class_weight.to(features.dtype), dim=1)
            return F.normalize(features, dim=1) @ weight.t()

    def target_logit(self, cos_target: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The margin-adjusted cosine of the target class, before scaling."""
        raise NotImplementedError

    def margin_logits(self, features: Tensor, pids: Tensor) -> Tensor:
        """Scaled logits ``(B, num_classes)`` with the margin applied to each row's target class."""
        cos = self.cosine(features)
        check_pids(pids, cos.shape[0], self, num_classes=cos.shape[1])
        index = pids.unsqueeze(1)
        target = self.target_logit(cos.gather(1, index))
        return self.scale * cos.scatter(1, index, target)

    def forward(self, outputs: dict[str, Tensor], pids: Tensor) -> Tensor:
        features = get_output(outputs, self.feature_key, self)
        return label_smoothing_cross_entropy(self.margin_logits(features, pids), pids, self.epsilon)

    def extra_repr(self) -> str:
        shape = None if self.class_weight is None else tuple(self.class_weight.shape)
        return (
            f"scale={self.scale}, margin={self.margin}, epsilon={self.epsilon}, "
            f"feature_key={self.feature_key!r}, class_weight={shape}, weight={self.weight}"
        )


class ArcFaceLoss(_MarginSoftmaxLoss):
    """Additive angular margin (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019, Eq. 3): target logit ``s * cos(theta_y + m)``, others ``s * cos(theta_k)``.

    Where ``theta_y + m > pi`` (``cos(theta_y + m)`` would stop decreasing) the target logit is
    ``s * (cos(theta_y) - m * sin(m))``, the fallback of the authors' code.

    Args:
        scale: ``s`` (30 here; 64 in the paper for faces).
        margin: angular margin ``m`` in radians.
        epsilon: label smoothing.
        feature_key: which model output to classify.
        weight: host-side multiplier.
    """

    name = "arcface"

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.5,
        epsilon: float = 0.0,
        feature_key: str = "bn_features",
        weight: float = 1.0,
    ) -> None:
        super().__init__(scale, margin, epsilon, feature_key, weight)
        if margin >= math.pi:
            raise ValueError(f"ArcFace margin is an angle in radians and must be < pi, got {margin}")

    def target_logit(self, cos_target: Tensor) -> Tensor:
        sin_target = (1.0 - cos_target.pow(2)).clamp(min=1e-12).sqrt()
        phi = cos_target * math.cos(self.margin) - sin_target * math.sin(self.margin)
        fallback = cos_target - self.margin * math.sin(self.margin)
        return torch.where(cos_target > math.cos(math.pi - self.margin), phi, fallback)


class CosFaceLoss(_MarginSoftmaxLoss):
    """Large margin cosine loss (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", CVPR 2018, Eq. 4): target logit ``s * (cos(theta_y) - m)``, others ``s * cos(theta_k)``.

    Args:
        scale: ``s``.
        margin: cosine margin ``m``.
        epsilon: label smoothing.
        feature_key: which model output to classify.
        weight: host-side multiplier.
    """

    name = "cosface"

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.35,
        epsilon: float = 0.0,
        feature_key: str = "bn_features",
        weight: float = 1.0,
    ) -> None:
        super().__init__(scale, margin, epsilon, feature_key, weight)

    def target_logit(self, cos_target: Tensor) -> Tensor:
        return cos_target - self.margin
