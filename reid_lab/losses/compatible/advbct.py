"""AdvBCT: boundary-aware backward-compatible training with an adversarial discriminator.

Pan et al., "Boundary-Aware Backward-Compatible Representation via Adversarial Learning in Image Retrieval",
CVPR 2023 (arXiv 2305.02610); official code Ashespt/AdvBCT (``trainer/trainer.py`` ``bct_limit`` +
``adv_compatible``, ``models/base_model.py``, ``models/modules.py``, ``extract_feat.py``). Two terms join the
new model's own classification loss::

    L = L_cls(φ_n) + L_comp + ((E - e + 1) / E) · L_adv

- **Elastic boundary** ``L_comp``. Per old class ``k``: the centre ``c_k`` = mean of the L2-normalised old
  features of the class (not normalised again), the radius ``r_k`` = largest distance of those features to
  ``c_k`` after 1.5·IQR outlier removal (:func:`class_radii`), a learnable scalar ``w_k`` (init ``U(-1, 1)``)
  and a threshold ``T``::

      r_e(k) = r_k + σ(w_k)·|r_k - T|  if r_k < T   else   r_k - σ(w_k)·|r_k - T|      (= r_k + σ(w_k)(T - r_k))
      L_comp = Σ_{i∈V} max(0, ‖n̂_i - c_{y_i}‖ - r_e(y_i)) / |V|

  with ``n̂_i`` the normalised new feature and ``V`` the samples of boundary classes whose term is positive
  (the official average over violating samples; 0 when none).
- **Adversarial term** ``L_adv``. A discriminator ``Linear(d, 100)–BN–ReLU–Linear(100, 2)–LogSoftmax``
  classifies new features (label 0, through a gradient reversal layer) and old features (label 1)::

      L_adv = NLL(D(GRL_α(n)), 0) + NLL(D(o), 1),   α = 2 / (1 + exp(-10 p)) - 1

  ``p`` the fraction of training done. The discriminator descends ``L_adv``; the reversed gradient makes the
  new encoder ascend it (its features become indistinguishable from old ones). The weight
  ``(E - e + 1)/E`` decays over the epochs (``e`` counted from 0, as the official loop does, so it starts
  at ``(E + 1)/E``).

Where this deviates from the official code:

- The class geometry is computed by the host from φ_old's features of the *new* training set (classes seen by
  the old model, ``old_seen``), not from a JSON written by a separate run over the old training set.
- The new feature is the host's ``new_features`` (φ_new mapped to ``d_old`` by the dimension adapter), so
  ``d_new != d_old`` works; the official code needs equal dimensions.
- ``classes="all"`` (not official) also bounds classes the old model never saw, for open-class upgrades in
  which the old model saw none of the new identities.
- Vectorised over the batch instead of the official per-sample Python loop (same value, tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)

__all__ = ["AdvBCTLoss", "adversarial_weight", "class_radii", "grl_coefficient", "reverse_gradient"]


class _GradientReversal(torch.autograd.Function):
    """Identity forward, ``-α · grad`` backward (Ganin & Lempitsky's GRL; AdvBCT ``ReverseLayerF``)."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = float(alpha)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output.neg() * ctx.alpha, None


def reverse_gradient(x: Tensor, alpha: float) -> Tensor:
    """``x`` unchanged; its gradient multiplied by ``-alpha`` on the way back."""
    return _GradientReversal.apply(x, alpha)


def grl_coefficient(progress: float) -> float:
    """``2 / (1 + exp(-10 p)) - 1``: 0 at the start of training, about 1 at the end (DANN's schedule)."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


def adversarial_weight(epoch: int, max_epochs: int) -> float:
    """``(E - e + 1) / E`` with ``e`` counted from 0 (the official ``(n_epoch - epoch + 1) / n_epoch``)."""
    return (max_epochs - epoch + 1) / max_epochs


@torch.no_grad()
def class_radii(old_features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """AdvBCT class centres and radii of L2-normalised old features (official ``extract_feat.gen_class_meta``).

    Per class ``k`` with normalised features ``f``: ``c_k = mean(f)`` (not normalised again), distances
    ``r = ‖f - c_k‖`` sorted; with ``n >= 4`` distances, ``q1 = r[⌊n/4⌋]``, ``q3 = r[⌊3n/4⌋]`` and only
    ``q1 - 1.5 IQR <= r <= q3 + 1.5 IQR`` are kept (all of them if none would be); the radius is the largest
    kept distance. A class with fewer than two kept distances (a single image) gets radius ``-1``: the official
    trainer skips it.

    Args:
        old_features: ``(N, d)`` φ_old embeddings of the training images (any norm).
        labels: ``(N,)`` int class labels in ``[0, num_classes)``.
        num_classes: ``C``.

    Returns:
        ``(centres, radii)``: ``(C, d)`` float32 centres (zeros for a class without images) and ``(C,)``
        radii (``-1``: no boundary).
    """
    if old_features.dim() != 2 or labels.shape != (old_features.shape[0],):
        raise ValueError(f"class_radii needs (N, d) features and (N,) labels, got {tuple(old_features.shape)} "
                         f"and {tuple(labels.shape)}")
    feats = l2_normalize(old_features.float())
    labels = labels.long()
    centres = torch.zeros(num_classes, feats.shape[1])
    radii = torch.full((num_classes,), -1.0)
    for k in torch.unique(labels).tolist():
        members = feats[labels == k]
        centre = members.mean(0)
        dist = (members - centre).norm(dim=1).sort().values
        n = dist.numel()
        kept = dist
        if n >= 4:
            q1, q3 = dist[n // 4], dist[(3 * n) // 4]
            iqr = q3 - q1
            kept = dist[(dist >= q1 - 1.5 * iqr) & (dist <= q3 + 1.5 * iqr)]
            if kept.numel() == 0:
                kept = dist
        centres[k] = centre
        if kept.numel() > 1:
            radii[k] = kept.max()
    return centres, radii


class AdvBCTLoss(CompatibleLoss):
    """AdvBCT's elastic-boundary and adversarial terms (see the module docstring for the formulas).

    Trainable parameters (they join the new model's optimiser through the host, and its checkpoint): the
    discriminator and the per-class elastic scalars ``w_k``. The host creates them in :meth:`bind` with
    ``d_old`` and ``C_new``; standalone use gives ``embedding_dim`` and ``num_classes``.

    Schedules: ``p = inputs.progress`` (the host's ``global_step / estimated_stepping_batches``), else
    ``epoch / E``; ``E = inputs.max_epochs`` (the trainer's), else the ``max_epochs`` option.

    Args:
        weight: host-side multiplier of the whole loss.
        threshold: ``T`` of the elastic boundary (1.0 in the official AdvBCT config).
        boundary_weight: multiplier of ``L_comp`` (1, official).
        adversarial_weight: multiplier of the decaying adversarial weight (1, official).
        hidden_dim: width of the discriminator's hidden layer (100, official).
        classes: ``"old"`` (official: only classes the old model was trained on have a boundary) or
            ``"all"`` (every class with two or more images; open-class upgrades).
        max_epochs: ``E`` when the host does not give the trainer's.
        embedding_dim: ``d_old`` for standalone use (the host binds it).
        num_classes: ``C_new`` for standalone use (the host binds it from the new model's classifier).
    """

    name = "advbct"
    needs = frozenset({"old_means", "old_radii", "old_seen"})

    def __init__(
        self,
        weight: float = 1.0,
        threshold: float = 1.0,
        boundary_weight: float = 1.0,
        adversarial_weight: float = 1.0,
        hidden_dim: int = 100,
        classes: str = "old",
        max_epochs: int | None = None,
        embedding_dim: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(weight)
        if classes not in ("old", "all"):
            raise ValueError(f"advbct classes must be 'old' or 'all', got {classes!r}")
        if max_epochs is not None and int(max_epochs) < 1:
            raise ValueError(f"advbct max_epochs must be >= 1, got {max_epochs}")
        self.threshold = float(threshold)
        self.boundary_weight = float(boundary_weight)
        self.adversarial_scale = float(adversarial_weight)
        self.hidden_dim = int(hidden_dim)
        self.classes = classes
        self.max_epochs = None if max_epochs is None else int(max_epochs)
        self.discriminator: nn.Sequential | None = None
        self.elastic: nn.Parameter | None = None
        if embedding_dim is not None or num_classes is not None:
            if embedding_dim is None or num_classes is None:
                raise ValueError("advbct: give both embedding_dim and num_classes, or neither (the host binds them)")
            self._build(int(embedding_dim), int(num_classes))

    def _build(self, dim: int, num_classes: int) -> None:
        if dim < 1 or num_classes < 1:
            raise ValueError(f"advbct needs embedding_dim >= 1 and num_classes >= 1, got {dim} and {num_classes}")
        self.discriminator = nn.Sequential(
            nn.Linear(dim, self.hidden_dim), nn.BatchNorm1d(self.hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(self.hidden_dim, 2), nn.LogSoftmax(dim=1),
        )
        self.elastic = nn.Parameter(torch.empty(num_classes).uniform_(-1.0, 1.0))

    def bind(self, old_dim: int, new_dim: int, num_classes: int) -> None:
        if self.discriminator is not None:
            if self.discriminator[0].in_features != old_dim or self.elastic.numel() != num_classes:
                raise ValueError(
                    f"advbct was built for embedding_dim={self.discriminator[0].in_features}, "
                    f"num_classes={self.elastic.numel()}, but the upgrade has d_old={old_dim}, C_new={num_classes}"
                )
            return
        if num_classes < 1:
            raise ValueError("advbct needs the number of training classes for its per-class elastic scalars, but "
                             "the new encoder has no classifier: give the plugin's num_classes option")
        self._build(old_dim, num_classes)

    def schedule(self, inputs: CompatibleInputs) -> tuple[float, float]:
        """``(α, adversarial weight)`` for this batch."""
        max_epochs = inputs.max_epochs or self.max_epochs
        if max_epochs is None:
            raise ValueError("advbct needs the number of training epochs: run it under a trainer (the host passes "
                             "max_epochs) or give the plugin's max_epochs option")
        progress = inputs.progress if inputs.progress is not None else min(1.0, inputs.epoch / max_epochs)
        return grl_coefficient(progress), self.adversarial_scale * adversarial_weight(inputs.epoch, max_epochs)

    def elastic_radii(self, radii: Tensor) -> Tensor:
        """``(C,) -> (C,)`` official ``r_e``: ``r ± σ(w)·|r - T|``, moving each radius towards ``T``."""
        shift = torch.sigmoid(self.elastic) * (radii - self.threshold).abs()
        return torch.where(radii < self.threshold, radii + shift, radii - shift)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Weighted ``L_comp + w(e)·L_adv``; parts are unweighted plus the schedule values.

        Args:
            inputs: ``new_features`` / ``old_features`` ``(B, d_old)``, ``labels`` ``(B,)``, and
                ``extras["old_means"]`` ``(C, d_old)``, ``extras["old_radii"]`` ``(C,)``,
                ``extras["old_seen"]`` ``(C,)``.
        """
        if self.discriminator is None:
            raise RuntimeError("advbct has no discriminator yet: the host binds it, or give embedding_dim and "
                               "num_classes")
        feats, labels = inputs.new_features, inputs.labels.long()
        centres = inputs.extras["old_means"].detach().to(feats.dtype)
        radii = inputs.extras["old_radii"].detach().to(feats.dtype)
        seen = inputs.extras["old_seen"].to(torch.bool)
        if centres.shape != (self.elastic.numel(), feats.shape[1]) or radii.shape != (self.elastic.numel(),):
            raise ValueError(
                f"advbct was bound to C_new={self.elastic.numel()}, d={self.discriminator[0].in_features}, but got "
                f"old_means {tuple(centres.shape)} and old_radii {tuple(radii.shape)}"
            )
        alpha, adv_weight = self.schedule(inputs)

        has_boundary = radii >= 0
        if self.classes == "old":
            has_boundary = has_boundary & seen.to(has_boundary.device)
        distance = (l2_normalize(feats) - centres[labels]).norm(dim=1)
        excess = distance - self.elastic_radii(radii)[labels]
        violating = has_boundary[labels] & (excess > 0)
        count = violating.sum()
        boundary = (excess * violating).sum() / count.clamp(min=1)  # 0 (graph kept) when nothing violates

        old = inputs.old_features.detach().to(feats.dtype)
        score_new = self.discriminator(reverse_gradient(feats, alpha))
        score_old = self.discriminator(old)
        adversarial = (F.nll_loss(score_new, torch.zeros_like(labels))
                       + F.nll_loss(score_old, torch.ones_like(labels)))
        loss = self.boundary_weight * boundary + adv_weight * adversarial
        with torch.no_grad():
            accuracy = torch.cat([score_new.argmax(1) == 0, score_old.argmax(1) == 1]).float().mean()
        return CompatibleLossOutput(loss, {
            f"{self.name}/boundary": boundary.detach(),
            f"{self.name}/adversarial": adversarial.detach(),
            f"{self.name}/adv_weight": torch.tensor(adv_weight),
            f"{self.name}/grl_alpha": torch.tensor(alpha),
            f"{self.name}/violating_fraction": violating.float().mean().detach(),
            f"{self.name}/discriminator_acc": accuracy,
        })
