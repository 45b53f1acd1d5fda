"""BT²'s compatible objective (Zhou et al. 2023, "BT²: Backward-compatible Training with Basis Transformation",
arXiv 2211.03989; official code YifeiZhou02/BT-2, ``trainers/transfer_trainer.py`` ``TransferTrainer.train``).

The new model carries a basis transformation (:class:`~reid_lab.models.basis_transform.BasisTransform`): its
own-space branch ``f`` and the old-compatible coordinates ``e`` (the first ``d_old`` of its embedding). Besides
the model's own losses (the official code: a plain cross-entropy on ``normalize(f)``; a reid_lab model keeps its
configured ones, BoT's label-smoothed CE and triplet), BT² adds three terms::

    L = λ1 · (1 − cos(f, φ_n*(x)))                    # keep f as good as an independently trained new model
      + λ2 · CE(normalize(e) · P_oᵀ, y)               # BCT influence through a pseudo classifier
      + λ3 · (1 − cos(e, φ_o(x)))                      # e close to the old feature of the same image

averaged over the batch, with ``P_o`` the ``(C_new, d_old)`` class means of L2-normalised old features over the
whole new training set (the official code averages the old model's normalised outputs per class, for every
class: old and new ones alike; no temperature on the logits). Defaults are the official configs':
``λ1 = 1, λ2 = 10, λ3 = 5``.

Deviations: the official code embeds every training image once with φ_o and φ_n* before training (one view, kept
in a dictionary by path); the host here embeds the same augmented batch φ_new sees, as for every other plugin.
``P_o`` is averaged over the un-augmented training images (the host's class-level state); the official code
averages one augmented view of each (its training loader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)


class BT2Loss(CompatibleLoss):
    """BT²: match the branch to φ_n*, and the old-compatible coordinates to φ_o (BCT influence + cosine).

    Inputs: ``new_features`` ``(B, d_old)`` = ``e`` (the host's ``truncate`` adapter on BT²'s embedding),
    ``extras["new_branch"]`` ``(B, d_f)`` = ``f``, ``extras["reference_features"]`` ``(B, d_f)`` = φ_n*(x),
    ``extras["old_means"]`` ``(C_new, d_old)`` = ``P_o``, ``old_features`` ``(B, d_old)``.

    Args:
        weight: multiplier applied by the host (on the whole sum).
        lambda_new: λ1, weight of ``1 − cos(f, φ_n*)``.
        lambda_influence: λ2, weight of the pseudo-classifier cross-entropy on ``e``.
        lambda_old: λ3, weight of ``1 − cos(e, φ_o)``.

    Example:
        >>> import torch
        >>> from reid_lab.losses.compatible.base import CompatibleInputs
        >>> e = torch.tensor([[1.0, 0.0]]); f = torch.tensor([[0.0, 2.0]])
        >>> extras = {"new_branch": f, "reference_features": torch.tensor([[0.0, 1.0]]),
        ...           "old_means": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
        >>> out = BT2Loss(lambda_influence=0.0)(CompatibleInputs(e, torch.tensor([[0.0, 1.0]]), torch.tensor([0]),
        ...                                                      extras=extras))
        >>> round(out.loss.item(), 4)  # f matches φ_n* (0) + 5 · (1 − cos(e, φ_o)) = 5
        5.0
    """

    name = "bt2"
    needs = frozenset({"new_branch", "reference_features", "old_means"})

    def __init__(self, weight: float = 1.0, lambda_new: float = 1.0, lambda_influence: float = 10.0,
                 lambda_old: float = 5.0) -> None:
        super().__init__(weight)
        for key, value in (("lambda_new", lambda_new), ("lambda_influence", lambda_influence),
                           ("lambda_old", lambda_old)):
            if value < 0:
                raise ValueError(f"bt2: {key} must be >= 0, got {value}")
        self.lambda_new, self.lambda_influence, self.lambda_old = (float(lambda_new), float(lambda_influence),
                                                                   float(lambda_old))

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        branch = inputs.extras["new_branch"]
        reference = inputs.extras["reference_features"].detach()
        if branch.shape != reference.shape:
            raise ValueError(f"bt2: the new branch f is {tuple(branch.shape)} but the reference model's features "
                             f"are {tuple(reference.shape)}; φ_n* must embed in the branch's dimension")
        e = l2_normalize(inputs.new_features)
        new_term = 1.0 - (l2_normalize(branch) * l2_normalize(reference)).sum(dim=1).mean()
        pseudo_logits = e @ inputs.extras["old_means"].detach().to(e.dtype).t()
        influence = F.cross_entropy(pseudo_logits, inputs.labels)
        old_term = 1.0 - (e * l2_normalize(inputs.old_features.detach())).sum(dim=1).mean()
        loss = self.lambda_new * new_term + self.lambda_influence * influence + self.lambda_old * old_term
        with torch.no_grad():
            parts = {f"{self.name}/loss": loss.detach(), f"{self.name}/new_cos": 1.0 - new_term.detach(),
                     f"{self.name}/influence_ce": influence.detach(), f"{self.name}/old_cos": 1.0 - old_term.detach()}
        return CompatibleLossOutput(loss, parts)
