"""BCT influence loss: classify new features with the frozen old classifier (Shen et al., CVPR 2020).

"Towards Backward-Compatible Representation Learning" (arXiv 2003.11942), Eq. (3)/(4)::

    L = L_cls(φ_n, W_n; T_new) + λ · L_cls(φ_n, W_o; T_bct)

The second term, the *influence loss*, is implemented here: cross-entropy of the new embedding through the
frozen old classifier ``W_o`` on the true label. The model's own ``L_cls(φ_n, W_n)`` is the host's business.
Rows of ``W_o`` for classes the old model never saw come from
:func:`~reid_lab.losses.compatible.classifier_synthesis.synthesize_old_classifier` (BCT §3.2). Samples whose
label has no row are dropped from the term, like openBCT's ``--n2o-map`` without synthesised rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)


def influence_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    present_rows: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy restricted to samples whose label has a classifier row.

    A sample ``i`` is kept when ``0 <= y_i < C`` and (if given) ``present_rows[y_i]``; columns with
    ``present_rows == False`` are removed from the softmax. When no sample is kept the loss is
    ``0 · Σ logits`` (a zero that keeps the autograd graph, so DDP sees every parameter used).

    Args:
        logits: ``(B, C)`` logits.
        labels: ``(B,)`` int64 labels; values outside ``[0, C)`` mark samples without a row.
        present_rows: optional ``(C,)`` bool mask of usable classifier rows.
        label_smoothing: passed to :func:`torch.nn.functional.cross_entropy`.

    Returns:
        ``(loss, valid_fraction, accuracy)``: the scalar mean cross-entropy over kept samples, the fraction of
        kept samples, and the top-1 accuracy over kept samples (0 if none); the last two detached.
    """
    num_rows = logits.shape[1]
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_rows)
    if present_rows is not None:
        present_rows = present_rows.to(device=logits.device, dtype=torch.bool)
        valid &= present_rows[labels.clamp(0, num_rows - 1)]
        logits = logits[:, present_rows]
        column_of_row = torch.cumsum(present_rows.long(), 0) - 1
        labels = column_of_row[labels.clamp(0, num_rows - 1)]
    valid_fraction = valid.float().mean().detach()
    if not bool(valid.any()):
        zero = logits.sum() * 0.0
        return zero, valid_fraction, zero.detach()
    kept_logits, kept_labels = logits[valid], labels[valid]
    loss = F.cross_entropy(kept_logits, kept_labels, label_smoothing=label_smoothing)
    accuracy = (kept_logits.detach().argmax(dim=1) == kept_labels).float().mean()
    return loss, valid_fraction, accuracy


class BCTInfluenceLoss(CompatibleLoss):
    """BCT influence loss through the frozen old classifier ``inputs.old_classifier``.

    ``L = −(1/|V|) Σ_{i∈V} log softmax(z_i)[y_i]`` with, per sample ``i`` and class ``k``:

    - plain softmax (default; BCT Eq. 4 with a bias-free linear classifier): ``z_ik = s · ⟨w_k, n_i⟩``,
      ``s = 1`` unless ``scale`` is given;
    - normed softmax (``normalize=True``, openBCT ``--normed-softmax``, NormFace-style):
      ``z_ik = s · ⟨w_k/‖w_k‖, n_i/‖n_i‖⟩`` with ``s = scale`` or 30 when ``scale`` is None.

    ``V`` = samples whose label has a row (``0 <= y_i < C``); others are dropped from the term and the kept
    fraction is logged as ``bct/valid_fraction``. ``old_classifier`` is detached: only the new model learns.

    Args:
        weight: multiplier applied by the host.
        scale: logit scale ``s`` (see above).
        normalize: use cosine logits (normed softmax).
        label_smoothing: label smoothing of the cross-entropy (0 = BCT's hard-label CE).
    """

    name = "bct"
    needs = frozenset({"old_classifier"})

    def __init__(
        self,
        weight: float = 1.0,
        scale: float | None = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight)
        self.normalize = normalize
        self.scale = (30.0 if normalize else 1.0) if scale is None else float(scale)
        self.label_smoothing = float(label_smoothing)

    def logits(self, new_features: Tensor, classifier: Tensor) -> Tensor:
        """``(B, d), (C, d) -> (B, C)`` logits of new features through a frozen classifier."""
        classifier = classifier.detach()
        if self.normalize:
            return self.scale * l2_normalize(new_features) @ l2_normalize(classifier).t()
        return self.scale * new_features @ classifier.t()

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        assert inputs.old_classifier is not None
        logits = self.logits(inputs.new_features, inputs.old_classifier)
        loss, valid_fraction, accuracy = influence_cross_entropy(
            logits, inputs.labels, label_smoothing=self.label_smoothing
        )
        return CompatibleLossOutput(
            loss,
            {
                f"{self.name}/loss": loss.detach(),
                f"{self.name}/valid_fraction": valid_fraction,
                f"{self.name}/accuracy": accuracy,
            },
        )


class BCTPrototypeLoss(CompatibleLoss):
    """BCT influence loss against old-space class prototypes ``inputs.prototypes`` instead of a trained head.

    For upgrades where the old model has no usable classifier (open-class ReID: the new training identities
    are not the old ones), the "old classifier" is the matrix of old-feature class means on the new training
    set, i.e. BCT §3.2's synthesised rows for every class. Logits are cosine similarities times a scale::

        z_ik = s · ⟨p_k/‖p_k‖, n_i/‖n_i‖⟩,   L = −(1/|V|) Σ_{i∈V} log softmax(z_i)[y_i]

    Deviation from BCT's plain dot product: class means of normalised features have norms < 1 that reflect
    class spread, not confidence, so dot-product logits would be tiny and unevenly scaled; the cosine form
    with ``s = 30`` (openBCT's normed-softmax scale) is what NormFace-style heads use.

    An all-zero prototype row (a class with no sample, see ``class_means(..., allow_missing=True)``) counts
    as absent: its column leaves the softmax. Samples whose label is absent or ``>= C`` are dropped from the
    term; the kept fraction is logged as ``bct_proto/valid_fraction`` (zero loss, graph kept, if none).

    Args:
        weight: multiplier applied by the host.
        scale: logit scale ``s``.
        label_smoothing: label smoothing of the cross-entropy.
    """

    name = "bct_proto"
    needs = frozenset({"prototypes"})

    def __init__(self, weight: float = 1.0, scale: float = 30.0, label_smoothing: float = 0.0) -> None:
        super().__init__(weight)
        self.scale = float(scale)
        self.label_smoothing = float(label_smoothing)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        assert inputs.prototypes is not None
        prototypes = inputs.prototypes.detach()
        present = prototypes.abs().sum(dim=1) > 0
        logits = self.scale * l2_normalize(inputs.new_features) @ l2_normalize(prototypes).t()
        loss, valid_fraction, accuracy = influence_cross_entropy(
            logits, inputs.labels, present_rows=present, label_smoothing=self.label_smoothing
        )
        return CompatibleLossOutput(
            loss,
            {
                f"{self.name}/loss": loss.detach(),
                f"{self.name}/valid_fraction": valid_fraction,
                f"{self.name}/accuracy": accuracy,
            },
        )


__all__ = ["BCTInfluenceLoss", "BCTPrototypeLoss", "influence_cross_entropy"]
