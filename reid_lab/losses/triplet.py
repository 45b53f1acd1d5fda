"""Batch-hard triplet loss (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", arXiv 1703.07737, 2017, "Batch Hard"), as used by BoT with margin 0.3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_lab.losses.base import ReIDLoss, check_pids, full_precision, get_output, upcast


def euclidean_distances(x: Tensor) -> Tensor:
    """Pairwise euclidean (not squared) distances, ``(B, D) -> (B, B)``.

    Squared distances are clamped at ``1e-12`` before the square root (as BoT) so the gradient stays finite
    on the diagonal and for duplicates. Computed in float32 (or float64 for float64 input), autocast off.
    """
    with full_precision(x):
        x = upcast(x)
        sq = x.pow(2).sum(dim=1)
        d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * x @ x.t()
        return d2.clamp(min=1e-12).sqrt()


def batch_hard_mining(dist: Tensor, pids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each anchor the hardest positive (farthest, other than itself) and hardest negative (closest).

    Args:
        dist: ``(B, B)`` distances.
        pids: ``(B,)`` identity labels.

    Returns:
        ``d_ap`` ``(B,)``, ``d_an`` ``(B,)`` and ``valid`` ``(B,)`` bool: anchors that have at least one
        positive and one negative in the batch (``d_ap`` / ``d_an`` of the others are ``-inf`` / ``+inf``).
    """
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos = same & ~eye
    neg = ~same
    d_ap = torch.where(pos, dist, torch.full_like(dist, float("-inf"))).amax(dim=1)
    d_an = torch.where(neg, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
    return d_ap, d_an, pos.any(dim=1) & neg.any(dim=1)


class TripletLoss(ReIDLoss):
    """Batch-hard triplet loss.

    ``loss = mean_a [d(a, p*) - d(a, n*) + m]_+`` with ``p*`` the farthest positive and ``n*`` the closest
    negative of anchor ``a`` in the batch and ``d`` the euclidean distance; with ``margin=None`` the
    soft-margin version ``mean_a log(1 + exp(d(a, p*) - d(a, n*)))`` (Hermans et al. 2017, §2). Anchors with
    no other sample of their identity, or no other identity, in the batch are left out of the mean.

    Args:
        margin: hinge margin ``m >= 0`` (BoT: 0.3), or None for the soft margin.
        normalize_features: L2-normalise features before computing distances.
        feature_key: which model output to use (BoT: ``"features"``, before the BNNeck).
        weight: host-side multiplier.
    """

    name = "triplet"

    def __init__(
        self,
        margin: float | None = 0.3,
        normalize_features: bool = False,
        feature_key: str = "features",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = None if margin is None else float(margin)
        self.normalize_features = normalize_features
        self.feature_key = feature_key

    def forward(self, outputs: dict[str, Tensor], pids: Tensor) -> Tensor:
        features = get_output(outputs, self.feature_key, self)
        check_pids(pids, features.shape[0], self)
        if self.normalize_features:
            features = F.normalize(features, dim=1)
        d_ap, d_an, valid = batch_hard_mining(euclidean_distances(features), pids)
        if not bool(valid.any()):
            raise ValueError(
                f"TripletLoss: no anchor in the batch of {len(pids)} (pids {pids.tolist()[:16]}) has both a "
                "positive and a negative; sample batches with an identity (PK) sampler, P >= 2 and K >= 2"
            )
        diff = d_ap[valid] - d_an[valid]
        if self.margin is None:
            return F.softplus(diff).mean()
        return F.relu(diff + self.margin).mean()

    def extra_repr(self) -> str:
        margin = "soft" if self.margin is None else self.margin
        return f"margin={margin}, normalize_features={self.normalize_features}, feature_key={self.feature_key!r}, weight={self.weight}"
