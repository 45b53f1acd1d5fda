"""Identity cross-entropy with label smoothing (BoT, Luo et al. CVPRW'19 §3.3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reid_lab.losses.base import ReIDLoss, check_pids, get_output


def label_smoothing_cross_entropy(logits: Tensor, pids: Tensor, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy against smoothed targets (Szegedy et al., "Rethinking the Inception Architecture",
    CVPR 2016, §7).

    ``q_k = (1 - eps) * [k == y] + eps / K`` and ``loss = mean_i sum_k -q_k log p_k``: the smoothing mass
    ``eps`` is spread over all ``K`` classes, the target included (as BoT's ``CrossEntropyLabelSmooth`` and
    ``torch.nn.functional.cross_entropy(label_smoothing=eps)``).

    Args:
        logits: ``(B, K)``.
        pids: ``(B,)`` targets in ``[0, K)``.
        epsilon: smoothing in ``[0, 1)``.

    Returns:
        Scalar mean loss.
    """
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, pids.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()


class CrossEntropyLoss(ReIDLoss):
    """Label-smoothed identity loss on ``outputs["logits"]``.

    Args:
        epsilon: label smoothing (BoT: 0.1; 0 gives plain cross-entropy).
        weight: host-side multiplier.
    """

    name = "ce"

    def __init__(self, epsilon: float = 0.1, weight: float = 1.0) -> None:
        super().__init__(weight)
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = float(epsilon)

    def forward(self, outputs: dict[str, Tensor], pids: Tensor) -> Tensor:
        logits = get_output(
            outputs, "logits", self, hint="the model has no classifier; build it with num_classes > 0"
        )
        check_pids(pids, logits.shape[0], self, num_classes=logits.shape[1])
        return label_smoothing_cross_entropy(logits, pids, self.epsilon)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, weight={self.weight}"
