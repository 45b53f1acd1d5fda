"""LCE: Learning Compatible Embeddings (Meng et al., ICCV 2021, arXiv 2108.01958).

The compatibility part of the LCE objective (released code IrvingMeng/LCE ``main.py``):

``L = lambda_a * MSE(normalise(W_n), C_o) + lambda_b * mean_i max(0, cos theta_{y_i} - cos(n_i, c_{y_i}))``

- *alignment*: the rows of the new classifier, normalised, regress onto the old class centres ``C_o``;
- *boundary*: each new feature must be at least as close (in cosine) to the old centre of its class as the
  loosest old feature of that class (``cos theta_k``, see :func:`~reid_lab.losses.compatible.prototypes.class_boundaries`).

The new model's own ArcFace term ``L_arcface(phi_n, W_n)`` (s = 16, m = 0.1 in LCE) is the new model's own
loss, configured on the model, not part of this plugin. The optional residual transformation (RBT blocks,
K > 0) of the paper is not implemented (K = 0, the released default and AdvBCT's benchmark setting).
"""

from __future__ import annotations

import torch.nn.functional as F

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)

__all__ = ["LCELoss"]


class LCELoss(CompatibleLoss):
    """LCE alignment + boundary loss against fixed old class centres.

    The host provides:

    - ``inputs.prototypes`` ``(C, d_old)``: old class centres ``c_k`` (normalised again here, as LCE does when
      loading them); use :func:`~reid_lab.losses.compatible.prototypes.class_centres`.
    - ``inputs.extras["new_classifier"]`` ``(C, d_old)``: the weight of the new model's classifier (with
      gradients), mapped to the old dimension by the host's adapter when ``d_new != d_old``.
    - ``inputs.extras["boundaries"]`` ``(C,)``: ``cos theta_k``; use
      :func:`~reid_lab.losses.compatible.prototypes.class_boundaries`.

    ``MSE`` is the mean over all ``C * d_old`` entries (``F.mse_loss``, as the released code). The cosine
    ``cos(n_i, c_{y_i})`` uses the L2-normalised new feature and is clamped to ``[-1, 1]``.

    Args:
        weight: host-side multiplier of the whole loss.
        align_weight: ``lambda_a`` (100 in LCE).
        boundary_weight: ``lambda_b`` (1 in LCE).

    Example:
        >>> import torch
        >>> from reid_lab.losses.compatible.base import CompatibleInputs
        >>> c = torch.eye(2)
        >>> x = CompatibleInputs(new_features=torch.tensor([[1.0, 1.0]]), old_features=torch.zeros(1, 2),
        ...     labels=torch.tensor([0]), prototypes=c,
        ...     extras={"new_classifier": c.clone(), "boundaries": torch.tensor([1.0, 1.0])})
        >>> round(LCELoss()(x).loss.item(), 4)  # align 0, boundary 1 - 1/sqrt(2)
        0.2929
    """

    name = "lce"
    needs = frozenset({"prototypes", "new_classifier", "boundaries"})

    def __init__(
        self, weight: float = 1.0, align_weight: float = 100.0, boundary_weight: float = 1.0
    ) -> None:
        super().__init__(weight)
        self.align_weight = float(align_weight)
        self.boundary_weight = float(boundary_weight)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Return the weighted sum of the two terms; parts ``lce/align`` and ``lce/boundary`` are unweighted.

        Args:
            inputs: batch with ``new_features`` ``(B, d_old)``, ``labels`` ``(B,)``, ``prototypes`` ``(C, d_old)``
                and ``extras["new_classifier"]`` ``(C, d_old)``, ``extras["boundaries"]`` ``(C,)``.
        """
        centres = l2_normalize(inputs.prototypes.detach())
        new_classifier = inputs.extras["new_classifier"]
        boundaries = inputs.extras["boundaries"].detach()
        if new_classifier.shape != centres.shape:
            raise ValueError(
                f"extras['new_classifier'] must have the prototypes' shape {tuple(centres.shape)} (C, d_old), "
                f"got {tuple(new_classifier.shape)}"
            )
        if boundaries.shape != (centres.shape[0],):
            raise ValueError(
                f"extras['boundaries'] must be ({centres.shape[0]},), got {tuple(boundaries.shape)}"
            )

        align = F.mse_loss(l2_normalize(new_classifier), centres.to(new_classifier.dtype))
        labels = inputs.labels.long()
        feats = l2_normalize(inputs.new_features)
        cos = (feats * centres[labels].to(feats.dtype)).sum(dim=1).clamp(-1.0, 1.0)
        boundary = (boundaries[labels].to(cos.dtype) - cos).clamp(min=0).mean()
        loss = self.align_weight * align + self.boundary_weight * boundary
        return CompatibleLossOutput(loss, {"lce/align": align.detach(), "lce/boundary": boundary.detach()})
