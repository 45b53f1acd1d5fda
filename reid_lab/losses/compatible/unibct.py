"""UniBCT influence loss against fixed (optionally refined) old prototypes.

Zhang et al., "Towards Universal Backward-Compatible Representation Learning", IJCAI 2022 (arXiv 2203.01583):
the new embedding, L2-normalised, is classified by a softmax over fixed old-space class prototypes computed on
the *new* training data (so no trained old classifier is needed, which makes it work for open-class
upgrades too):

``L = CE(s * <n_hat_i, p_hat_c>_c, y_i)``,

with ``p_c`` the unit-norm prototypes from :func:`~reid_lab.losses.compatible.prototypes.class_centres`
(before the first refresh) or :func:`~reid_lab.losses.compatible.prototypes.refine_prototypes` (structural
refinement, Eq. 9-10), which share one scale convention (unit rows). Follows the MixBCT re-implementation
(yuleung/MixBCT, ``BCT_Methods/UniBCT``: no margin, refresh schedule) except for the scale: MixBCT's
unrefined prototypes are unit-norm but its refined ones are raw means of the old features, so its logit
scale silently jumps from 1 to the old feature norm at the first refresh. Here the prototypes stay unit-norm
and the scale ``s`` is explicit (default 30, the normed-softmax scale of openBCT and of
:class:`~reid_lab.losses.compatible.bct.BCTPrototypeLoss`).

The new model's own ArcFace term is the model's own loss, not part of this plugin.
"""

from __future__ import annotations

import torch.nn.functional as F

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)

__all__ = ["UniBCTLoss"]


class UniBCTLoss(CompatibleLoss):
    """Softmax classification of the normalised new feature against fixed old prototypes (UniBCT).

    ``logits_ic = scale * <n_i / ||n_i||, p_c / ||p_c||>`` with ``p_c = inputs.prototypes[c]`` (unit-norm by
    the host's convention; normalised again here so the scale is ``scale`` whatever the caller passes); the
    loss is the mean cross-entropy with ``labels``.

    Schedule: before ``warmup_epochs`` the loss is an exact zero that still carries the graph of
    ``new_features`` (so DDP / unused-parameter checks see the usual graph). At the start of every epoch in
    ``refresh_epochs``, :meth:`on_train_epoch_start` returns True and the host recomputes ``prototypes`` with
    :func:`~reid_lab.losses.compatible.prototypes.refine_prototypes` using the current new model. MixBCT's
    schedule is ``warmup_epochs=10, refresh_epochs=[10, 20]`` (term off for epochs 0-9, prototypes refined
    with the current new model at epochs 10 and 20, weight 1 afterwards).

    Args:
        weight: host-side multiplier (lambda; 1 in MixBCT).
        scale: logit multiplier ``s`` on cosine logits (30, see the module docstring).
        warmup_epochs: epochs ``0 .. warmup_epochs - 1`` give a zero loss.
        refresh_epochs: epochs at whose start the plugin asks for refined prototypes.

    Example:
        >>> import torch
        >>> from reid_lab.losses.compatible.base import CompatibleInputs
        >>> x = CompatibleInputs(new_features=torch.tensor([[3.0, 0.0]]), old_features=torch.zeros(1, 2),
        ...     labels=torch.tensor([0]), prototypes=torch.eye(2))
        >>> round(UniBCTLoss(scale=1.0)(x).loss.item(), 4)  # -log(e / (e + 1))
        0.3133
    """

    name = "unibct"
    needs = frozenset({"prototypes"})
    refreshes_prototypes = True

    def __init__(
        self,
        weight: float = 1.0,
        scale: float = 30.0,
        warmup_epochs: int = 0,
        refresh_epochs: list[int] | None = None,
    ) -> None:
        super().__init__(weight)
        self.scale = float(scale)
        self.warmup_epochs = int(warmup_epochs)
        self.refresh_epochs = sorted({int(e) for e in (refresh_epochs or [])})

    def forward(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Zero loss during warm-up, even without prototypes; afterwards the base class checks ``needs``.

        MixBCT builds the prototypes only at the first refresh epoch, so the host may pass
        ``prototypes=None`` before ``warmup_epochs``.
        """
        if inputs.epoch < self.warmup_epochs:
            return self.compute(inputs)
        return super().forward(inputs)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Mean CE over the batch; part ``unibct/ce`` (zero during warm-up).

        Args:
            inputs: batch with ``new_features`` ``(B, d_old)``, ``labels`` ``(B,)``, ``prototypes`` ``(C, d_old)``.
        """
        feats = inputs.new_features
        if inputs.epoch < self.warmup_epochs:
            zero = feats.sum() * 0.0
            return CompatibleLossOutput(zero, {"unibct/ce": zero.detach()})
        protos = inputs.prototypes.detach()
        if protos.dim() != 2 or protos.shape[1] != feats.shape[1]:
            raise ValueError(
                f"prototypes must be (C, d_old) with d_old = {feats.shape[1]} (new_features' dim), "
                f"got {tuple(protos.shape)}"
            )
        logits = self.scale * l2_normalize(feats) @ l2_normalize(protos.to(feats.dtype)).t()
        ce = F.cross_entropy(logits, inputs.labels.long())
        return CompatibleLossOutput(ce, {"unibct/ce": ce.detach()})

    def on_train_epoch_start(self, epoch: int) -> bool:
        """True at the start of an epoch listed in ``refresh_epochs`` (the host then refines the prototypes)."""
        return int(epoch) in self.refresh_epochs
