"""Center loss (Wen, Zhang, Li & Qiao, "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016, Eq. 2), one of BoT's tricks (Luo et al. CVPRW'19 §3.6)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from reid_lab.losses.base import ReIDLoss, check_pids, get_output, unbound_error, upcast

log = logging.getLogger(__name__)


class CenterLoss(ReIDLoss):
    """Pull each feature towards a learned center of its identity.

    ``loss = 1/2 * mean_i ||f_i - c_{y_i}||^2``: Wen et al.'s ``L_C = 1/2 * sum_i ||x_i - c_{y_i}||^2``
    averaged over the batch. BoT's implementation omits the ``1/2`` (``sum_i ||.||^2 / B``), so BoT's
    weight 5e-4 corresponds to ``weight=1e-3`` here.

    The ``(num_classes, D)`` centers are created by :meth:`bind` (standard normal init, as BoT) and exposed
    as :attr:`centers`. BoT trains them with their own SGD optimizer (lr 0.5) and rescales their gradient by
    ``1 / weight``; a host reproducing that puts ``loss.centers`` in a separate parameter group.

    Args:
        feature_key: which model output to use (BoT: ``"features"``, before the BNNeck).
        weight: host-side multiplier.
    """

    name = "center"

    def __init__(self, feature_key: str = "features", weight: float = 1.0) -> None:
        super().__init__(weight)
        self.feature_key = feature_key
        self.centers: nn.Parameter | None
        self.register_parameter("centers", None)

    def bind(self, num_classes: int, feature_dim: int) -> None:
        """Create the ``(num_classes, feature_dim)`` centers; a repeated call with the same sizes keeps them."""
        if num_classes <= 0 or feature_dim <= 0:
            raise ValueError(
                f"CenterLoss.bind needs num_classes > 0 and feature_dim > 0, "
                f"got num_classes={num_classes}, feature_dim={feature_dim}"
            )
        if self.centers is not None:
            if tuple(self.centers.shape) == (num_classes, feature_dim):
                return
            log.info(
                "CenterLoss: re-binding centers from %s to %s",
                tuple(self.centers.shape),
                (num_classes, feature_dim),
            )
        self.centers = nn.Parameter(torch.randn(num_classes, feature_dim))

    def forward(self, outputs: dict[str, Tensor], pids: Tensor) -> Tensor:
        if self.centers is None:
            raise unbound_error(self)
        features = get_output(outputs, self.feature_key, self)
        if features.dim() != 2 or features.shape[1] != self.centers.shape[1]:
            raise ValueError(
                f"CenterLoss: features must have shape (B, {self.centers.shape[1]}), got {tuple(features.shape)}"
            )
        check_pids(pids, features.shape[0], self, num_classes=self.centers.shape[0])
        diff = upcast(features) - self.centers[pids]
        return 0.5 * diff.pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        shape = None if self.centers is None else tuple(self.centers.shape)
        return f"feature_key={self.feature_key!r}, centers={shape}, weight={self.weight}"
