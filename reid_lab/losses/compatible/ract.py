"""Regression-alleviating compatible training (RACT; B. Zhang et al., ICLR 2022, arXiv 2201.09724).

In a hot-refresh upgrade the gallery is a mix of old and new features while it is backfilled. A new-to-old
positive pair that is less similar than a new-to-new negative pair makes a freshly backfilled negative jump
above the old positive (a *negative flip*). RACT therefore adds the new features of other identities to the
negatives of the new-to-old contrastive loss. This module has the paper's loss and the two variants of its
code (TencentARC/OpenCompatible ``model/loss.py`` and ``trainer``): ``contra_ract`` → :class:`RACTLoss`,
``triplet_ract`` → :class:`TripletRACTLoss`, ``bct_ract`` → :class:`BCTRACTLoss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)
from reid_lab.losses.compatible.bct import influence_cross_entropy
from reid_lab.losses.compatible.contrastive import ContrastiveN2O, gather_batch


class RACTLoss(ContrastiveN2O):
    """RACT regression-alleviating contrastive loss (B. Zhang et al., ICLR 2022, Eq. 3; code ``contra_ract``).

    On L2-normalised features, for each local anchor ``i``::

        L_i = −log [ e^{⟨n_i,o_i⟩/τ} / ( e^{⟨n_i,o_i⟩/τ} + Σ_{j∈N_i} e^{⟨n_i,o_j⟩/τ} + Σ_{j∈N_i} e^{⟨n_i,n_j⟩/τ} ) ]

    ``N_i`` = samples of the global (all-gathered) batch with a label different from ``y_i``; same-label samples
    other than ``o_i`` are neither positives nor negatives. ``L = mean_i L_i``. With ``topk`` only the ``k``
    hardest (most similar) negatives of *each* kind enter the denominator (the docs use k = 10).

    Differences from OpenCompatible: new features are gathered *with* gradients (the public code's
    ``dist.all_gather`` has none, so new-to-new negatives from other ranks and its own copy get no gradient);
    masked negatives are ``-inf`` rather than ``-1e9`` (identical values, no overflow under AMP); an anchor
    whose batch has fewer than ``k`` negatives just has fewer terms.

    Parts: ``ract/loss``, ``ract/pos_sim``, ``ract/hardest_n2o_sim``, ``ract/hardest_n2n_sim``,
    ``ract/n2o_violation_rate``, ``ract/n2n_violation_rate`` (see
    :func:`~reid_lab.losses.compatible.contrastive.n2o_infonce`).

    Args:
        weight: multiplier applied by the host (OpenCompatible default 1.0).
        temperature: ``τ`` (OpenCompatible ``config.json``: 0.01).
        topk: hardest negatives kept per kind and anchor (None = all).
        gather: all-gather negatives across ranks when a process group is initialised.
    """

    name = "ract"
    with_n2n = True

    def __init__(
        self, weight: float = 1.0, temperature: float = 0.01, topk: int | None = None, gather: bool = True
    ) -> None:
        super().__init__(weight, temperature, topk, gather)


def _euclidean(x: Tensor, y: Tensor) -> Tensor:
    """``(M, d), (N, d) -> (M, N)`` Euclidean distances, clamped at ``1e-6`` so the sqrt stays differentiable."""
    squared = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return squared.clamp(min=1e-12).sqrt()


class TripletRACTLoss(CompatibleLoss):
    """Margin-ranking form of RACT (OpenCompatible ``triplet_ract``).

    With Euclidean distances ``d`` on L2-normalised features, positive distance ``p_i = d(n_i, o_i)`` and
    ``K_i^{o}`` / ``K_i^{n}`` the ``k`` smallest of ``{d(n_i,o_j)}_{j∈N_i}`` / ``{d(n_i,n_j)}_{j∈N_i}``
    (``N_i`` = different-label samples of the global batch; all of them when ``topk`` is None)::

        L = (1/|P^o|) Σ_{(i,δ)∈P^o} relu(p_i + m − δ)  +  (1/|P^n|) Σ_{(i,δ)∈P^n} relu(p_i + m − δ)

    where ``P^o = {(i, δ): δ ∈ K_i^o}`` over local anchors (same for ``P^n``): each kind is averaged over all
    its (anchor, kept negative) pairs, and the two averages are added (OpenCompatible: ``MarginRankingLoss``
    with ``loss_lambda = [1, 1]``). Deviation: the public code also counts, in the denominator, the padding
    entries of anchors with fewer than ``k`` negatives (hinge 0); we average over real pairs only, which is
    the same whenever every anchor has at least ``k`` negatives. A kind with no pair contributes 0.

    Under DDP (gathered batch over ``W`` ranks) ``P^o`` and ``P^n`` are the pairs of *all* ranks: rank ``r``
    returns ``W · S_r / |P|`` with ``S_r`` its local hinge sum and ``|P|`` the all-reduced pair count, so the
    mean of the per-rank losses and the DDP-averaged gradient are those of the global-batch loss even when
    ranks hold different numbers of pairs (``topk=None``, or anchors with fewer than ``k`` negatives).

    Args:
        weight: multiplier applied by the host.
        margin: ``m`` (OpenCompatible default 0.8).
        topk: hardest negatives per kind and anchor (None = all).
        gather: all-gather negatives across ranks when a process group is initialised.
    """

    name = "triplet_ract"

    def __init__(
        self, weight: float = 1.0, margin: float = 0.8, topk: int | None = 10, gather: bool = True
    ) -> None:
        super().__init__(weight)
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be a positive int or None, got {topk}")
        self.margin = float(margin)
        self.topk = topk
        self.gather = gather

    def _hinge_mean(self, distances: Tensor, negatives: Tensor, positive: Tensor, world_size: int) -> Tensor:
        """Mean hinge over the real (anchor, kept negative) pairs of all ranks (see the class docstring)."""
        distances = distances.masked_fill(~negatives, float("inf"))
        if self.topk is not None and self.topk < distances.shape[1]:
            distances = torch.topk(distances, self.topk, dim=1, largest=False).values
        real = torch.isfinite(distances)
        hinge = F.relu(positive.unsqueeze(1) + self.margin - distances.masked_fill(~real, 0.0))
        count = real.sum().to(hinge.dtype)
        if world_size > 1:
            count = count.detach().clone()
            dist.all_reduce(count)
        return world_size * (hinge * real).sum() / count.clamp(min=1)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        new_n = l2_normalize(inputs.new_features)
        old_n = l2_normalize(inputs.old_features.detach())
        new_all, old_all, labels_all, _ = gather_batch(new_n, old_n, inputs.labels, self.gather)
        world_size = new_all.shape[0] // max(new_n.shape[0], 1)  # gather_batch: equal batch on every rank
        negatives = inputs.labels.view(-1, 1) != labels_all.view(1, -1)
        positive = (new_n - old_n).pow(2).sum(dim=1).clamp(min=1e-12).sqrt()
        loss_n2o = self._hinge_mean(_euclidean(new_n, old_all), negatives, positive, world_size)
        loss_n2n = self._hinge_mean(_euclidean(new_n, new_all), negatives, positive, world_size)
        loss = loss_n2o + loss_n2n
        return CompatibleLossOutput(
            loss,
            {
                f"{self.name}/loss": loss.detach(),
                f"{self.name}/n2o": loss_n2o.detach(),
                f"{self.name}/n2n": loss_n2n.detach(),
                f"{self.name}/pos_dist": positive.detach().mean(),
            },
        )


class BCTRACTLoss(CompatibleLoss):
    """Point-to-centre RACT (OpenCompatible ``bct_ract``): own old prototype above all other prototypes.

    Cross-entropy over the concatenated logits (target = ``y_i`` in the old block)::

        z_i = [ W_o n_i ; W_n n_i − ∞·e_{y_i} ],   L = −(1/|V|) Σ_{i∈V} log softmax(z_i)[y_i]

    - ``n_i`` = ``inputs.new_features`` ``(B, d_old)``: the new feature in the old space's dimension;
    - ``W_o`` = ``inputs.old_classifier`` ``(C_old_rows, d_old)``, frozen (detached);
    - ``W_n`` = ``inputs.extras["new_classifier"]`` ``(C_new, d_old)``: the new model's classifier mapped to
      the old dimension by the *same* dimension adapter as ``n_i`` (the host does this), with gradients
      (OpenCompatible trains the new head through this term too).

    Every product is in ``d_old``: with ``d_new != d_old`` the new model's own features
    (``new_all_features``, ``d_new``) are never mixed with the adapted classifier. When ``d_new == d_old``
    the adapter is the identity, so ``W_n n_i`` is the new model's own logit, as in OpenCompatible. The
    target column of the new block is masked, so the new feature must score its own *old* prototype above
    every other old prototype and every other *new* prototype — the point-to-centre version of RACT's
    new-to-new negatives.

    ``scale=None``: plain dot products (as the public code). ``scale=s``: cosine logits times ``s`` in both
    blocks (for normalised-softmax heads). ``V`` = samples whose label has an old row (``y_i <`` rows of
    ``W_o``); part ``bct_ract/valid_fraction``.

    Args:
        weight: multiplier applied by the host.
        scale: ``None`` or the cosine-logit scale.
    """

    name = "bct_ract"
    needs = frozenset({"old_classifier", "new_classifier"})

    def __init__(self, weight: float = 1.0, scale: float | None = None) -> None:
        super().__init__(weight)
        self.scale = None if scale is None else float(scale)

    def _logits(self, features: Tensor, classifier: Tensor) -> Tensor:
        if self.scale is None:
            return features @ classifier.t()
        return self.scale * l2_normalize(features) @ l2_normalize(classifier).t()

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        assert inputs.old_classifier is not None
        feats = inputs.new_features
        old_classifier = inputs.old_classifier.detach().to(feats.dtype)
        new_classifier = inputs.extras["new_classifier"]
        for what, matrix in (("old_classifier", old_classifier), ("extras['new_classifier']", new_classifier)):
            if matrix.dim() != 2 or matrix.shape[1] != feats.shape[1]:
                raise ValueError(
                    f"bct_ract: {what} must be (C, d_old) with d_old = {feats.shape[1]} (new_features' dim, "
                    f"after the host's dimension adapter), got {tuple(matrix.shape)}"
                )
        labels = inputs.labels.long()
        old_block = self._logits(feats, old_classifier)
        new_block = self._logits(feats, new_classifier.to(feats.dtype))
        num_old, num_new = old_block.shape[1], new_block.shape[1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_new):
            raise ValueError(f"bct_ract: labels must lie in [0, {num_new}) (the new classifier's classes)")
        target = F.one_hot(labels, num_new).bool()
        logits = torch.cat([old_block, new_block.masked_fill(target, float("-inf"))], dim=1)
        old_labels = torch.where(labels < num_old, labels, torch.full_like(labels, -1))
        loss, valid_fraction, accuracy = influence_cross_entropy(logits, old_labels)
        return CompatibleLossOutput(
            loss,
            {
                f"{self.name}/loss": loss.detach(),
                f"{self.name}/valid_fraction": valid_fraction,
                f"{self.name}/accuracy": accuracy,
            },
        )
