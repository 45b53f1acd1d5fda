"""Pairwise circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
CVPR 2020), as fast-reid's ``pairwise_circleloss`` (SBS recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_lab.losses.base import ReIDLoss, check_pids, full_precision, get_output, upcast


def circle_loss(
    features: Tensor, pids: Tensor, margin: float = 0.25, gamma: float = 128.0
) -> tuple[Tensor, Tensor]:
    """Per-anchor circle loss on the cosine similarities of a batch.

    For anchor ``a`` with within-class similarities ``s_p^i`` (other samples of its identity) and
    between-class similarities ``s_n^j`` (Sun et al. CVPR'20, the circle loss with relaxation margins)::

        L_a = log(1 + sum_j exp(gamma * alpha_n^j * (s_n^j - Delta_n)) * sum_i exp(-gamma * alpha_p^i * (s_p^i - Delta_p)))
            = softplus(logsumexp_j(gamma * alpha_n^j * (s_n^j - Delta_n)) + logsumexp_i(-gamma * alpha_p^i * (s_p^i - Delta_p)))

    with ``alpha_p = [1 + m - s_p]_+``, ``alpha_n = [s_n + m]_+`` (optimum ``O_p = 1 + m``, ``O_n = -m``),
    ``Delta_p = 1 - m`` and ``Delta_n = m``. The weights ``alpha`` are treated as constants (no gradient),
    as in the authors' code.

    Args:
        features: ``(B, D)``; L2-normalised here.
        pids: ``(B,)`` identity labels.
        margin: relaxation ``m``.
        gamma: scale ``gamma``.

    Returns:
        ``(losses, valid)``: ``(B,)`` per-anchor losses and a ``(B,)`` bool mask of anchors with at least one
        positive and one negative (the losses of other anchors are meaningless).
    """
    with full_precision(features):
        x = F.normalize(upcast(features), dim=1)
        sim = x @ x.t()
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos, neg = same & ~eye, ~same
    alpha_p = F.relu(1.0 + margin - sim.detach())
    alpha_n = F.relu(sim.detach() + margin)
    logit_p = -gamma * alpha_p * (sim - (1.0 - margin))
    logit_n = gamma * alpha_n * (sim - margin)
    very_negative = torch.finfo(sim.dtype).min
    lse_p = torch.logsumexp(logit_p.masked_fill(~pos, very_negative), dim=1)
    lse_n = torch.logsumexp(logit_n.masked_fill(~neg, very_negative), dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    return F.softplus(torch.where(valid, lse_p + lse_n, torch.zeros_like(lse_p))), valid


class CircleLoss(ReIDLoss):
    """Pairwise circle loss over the batch, averaged over anchors that have a positive and a negative.

    Args:
        margin: relaxation ``m`` (fast-reid: 0.25).
        gamma: scale ``gamma`` (fast-reid: 128).
        feature_key: which model output to use.
        weight: host-side multiplier.
    """

    name = "circle"

    def __init__(
        self, margin: float = 0.25, gamma: float = 128.0, feature_key: str = "features", weight: float = 1.0
    ) -> None:
        super().__init__(weight)
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.margin = float(margin)
        self.gamma = float(gamma)
        self.feature_key = feature_key

    def forward(self, outputs: dict[str, Tensor], pids: Tensor) -> Tensor:
        features = get_output(outputs, self.feature_key, self)
        check_pids(pids, features.shape[0], self)
        losses, valid = circle_loss(features, pids, self.margin, self.gamma)
        if not bool(valid.any()):
            raise ValueError(
                f"CircleLoss: no anchor in the batch of {len(pids)} (pids {pids.tolist()[:16]}) has both a "
                "positive and a negative; sample batches with an identity (PK) sampler, P >= 2 and K >= 2"
            )
        return losses[valid].mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, gamma={self.gamma}, feature_key={self.feature_key!r}, weight={self.weight}"
