"""Logit distillation from the frozen old classifier: PCT focal distillation and LwF.

- PCT: Yan et al., "Positive-Congruent Training: Towards Regression-Free Model Updates", CVPR 2021
  (arXiv 2011.09161): focal distillation, FD-KL and FD-LM. Implementation details follow the
  re-implementation in miccunifi/negative_flip_MPT ``loss.py``.
- LwF: Li & Hoiem, "Learning without Forgetting", TPAMI 2017 (knowledge-distillation loss on the old
  tasks' outputs), in the form BCT uses as a compatibility baseline (openBCT ``--lwf``, OpenCompatible
  ``lwf``): the *frozen old classifier* scores the *new* features.

PCT compares the new model's own logits *over the old classes* with the old model's logits. When the new
label space is larger, the host passes ``extras["old_class_index"]`` ``(C_old,)`` (int64): old class ``j`` is
new column ``old_class_index[j]``; labels are in the new label space. LwF needs no index: both of its
distributions live in the old label space.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from reid_lab.losses.compatible.base import CompatibleInputs, CompatibleLoss, CompatibleLossOutput

__all__ = ["FocalDistillationLoss", "LwFLoss"]


def _old_class_logits(inputs: CompatibleInputs, who: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return ``(z_n over old classes (B, C_old), z_o (B, C_old), old_class_index (C_old,) or None)``."""
    z_n, z_o = inputs.new_logits, inputs.old_logits
    index = inputs.extras.get("old_class_index")
    if index is not None:
        index = index.long().to(z_n.device)
        if index.dim() != 1 or index.numel() != z_o.shape[1]:
            raise ValueError(
                f"{who}: extras['old_class_index'] must be (C_old,) = ({z_o.shape[1]},), got {tuple(index.shape)}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= z_n.shape[1]):
            raise ValueError(
                f"{who}: extras['old_class_index'] must index the {z_n.shape[1]} new-logit columns"
            )
        z_n = z_n.index_select(1, index)
    elif z_n.shape != z_o.shape:
        raise ValueError(
            f"{who}: new_logits {tuple(z_n.shape)} and old_logits {tuple(z_o.shape)} differ; when the new model "
            f"has more classes, pass extras['old_class_index'] (C_old,) mapping old class j to its new column"
        )
    if z_n.shape[0] != z_o.shape[0]:
        raise ValueError(f"{who}: batch sizes differ: new_logits {z_n.shape[0]}, old_logits {z_o.shape[0]}")
    return z_n, z_o.detach().to(z_n.dtype), index


def _kl_old_to_new(z_n: Tensor, z_o: Tensor, temperature: float) -> Tensor:
    """Per-sample ``KL(softmax(z_o/T) || softmax(z_n/T))``, ``(B, C) -> (B,)``."""
    log_p_new = F.log_softmax(z_n / temperature, dim=1)
    log_p_old = F.log_softmax(z_o / temperature, dim=1)
    return F.kl_div(log_p_new, log_p_old, reduction="none", log_target=True).sum(dim=1)


class FocalDistillationLoss(CompatibleLoss):
    """PCT focal distillation (Yan et al., CVPR 2021).

    ``L = mean_i [alpha + beta * 1(argmax z_o(x_i) = y_i)] * D(z_n(x_i), z_o(x_i))``

    - ``mode="kl"`` (FD-KL): ``D = KL(softmax(z_o/T) || softmax(z_n/T))``, summed over classes. **Not**
      multiplied by ``T**2`` (as the negative_flip_MPT code): with the default ``T = 100`` the gradient is
      about ``1/T**2`` of a ``T = 1`` KL, so tune ``weight`` accordingly (PCT's runs use ``T = 5``).
    - ``mode="lm"`` (FD-LM, logit matching): ``D = 1/2 * mean_k (z_n,k - z_o,k)**2``.

    The focal weight up-weights samples the old model classifies correctly (``beta = 5``), where a new error
    would be a negative flip. The old prediction is mapped to the new label space through
    ``extras["old_class_index"]`` when given. The new model's own CE is the model's own loss, not part of this
    plugin.

    Args:
        weight: host-side multiplier (lambda in PCT).
        alpha: weight of every sample (1 in PCT).
        beta: extra weight of samples the old model gets right (5 in PCT).
        mode: ``"kl"`` (FD-KL) or ``"lm"`` (FD-LM).
        temperature: ``T`` of FD-KL (ignored by FD-LM).

    Example:
        >>> import torch
        >>> from reid_lab.losses.compatible.base import CompatibleInputs
        >>> x = CompatibleInputs(new_features=torch.zeros(1, 2), old_features=torch.zeros(1, 2),
        ...     labels=torch.tensor([0]), new_logits=torch.tensor([[0.0, 0.0]]),
        ...     old_logits=torch.tensor([[2.0, 0.0]]))
        >>> FocalDistillationLoss(mode="lm")(x).loss.item()  # (1 + 5) * 1/2 * (4 + 0) / 2
        6.0
    """

    name = "pct"
    needs = frozenset({"new_logits", "old_logits"})
    uses = frozenset({"old_class_index"})

    def __init__(
        self,
        weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 5.0,
        mode: Literal["kl", "lm"] = "kl",
        temperature: float = 100.0,
    ) -> None:
        super().__init__(weight)
        if mode not in ("kl", "lm"):
            raise ValueError(f"mode must be 'kl' (FD-KL) or 'lm' (FD-LM), got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.mode = mode
        self.temperature = float(temperature)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Parts: ``pct/distill`` (unweighted mean of D) and ``pct/old_correct`` (share of focal samples).

        Args:
            inputs: batch with ``new_logits`` ``(B, C_new)``, ``old_logits`` ``(B, C_old)``, ``labels`` ``(B,)``
                in the new label space, optional ``extras["old_class_index"]`` ``(C_old,)``.
        """
        z_n, z_o, index = _old_class_logits(inputs, type(self).__name__)
        old_pred = z_o.argmax(dim=1)
        if index is not None:
            old_pred = index[old_pred]
        old_correct = (old_pred == inputs.labels.to(old_pred.device).long()).to(z_n.dtype)
        if self.mode == "kl":
            dist = _kl_old_to_new(z_n, z_o, self.temperature)
        else:
            dist = 0.5 * (z_n - z_o).pow(2).mean(dim=1)
        loss = ((self.alpha + self.beta * old_correct) * dist).mean()
        return CompatibleLossOutput(
            loss, {"pct/distill": dist.mean().detach(), "pct/old_correct": old_correct.mean().detach()}
        )


class LwFLoss(CompatibleLoss):
    """Learning-without-Forgetting distillation through the frozen old classifier (BCT's LwF baseline).

    With ``W_o = inputs.old_class_weight`` ``(C_old, d_old)`` (frozen, bias-free), ``n_i`` the new feature in
    the old dimension (``inputs.new_features``) and ``z_o(x_i) = W_o φ_o(x_i)`` the old logits
    (``inputs.old_logits``)::

        L = T**2 * mean_i KL( softmax(z_o(x_i) / T) || softmax(W_o n_i / T) )

    The old model's predictions are the soft targets for the *new* features scored by the *old* classifier,
    so the new embedding must reproduce the old class posterior: a compatibility loss (Shen et al., CVPR 2020,
    §4 baselines; Li & Hoiem, TPAMI 2017). Code: openBCT ``main.py`` (``--lwf``: ``old_fc`` frozen,
    ``-Σ softmax(old_fc(φ_o)) · log_softmax(old_fc(φ_n)) / B``) and OpenCompatible ``trainer.py`` (``lwf``:
    the same with temperature ``distillation_temp``). Differences: KL instead of cross-entropy (same
    gradient; the target entropy is subtracted so a perfect match gives 0) and the ``T**2`` factor (Hinton
    et al., 2015) that keeps gradient magnitudes comparable across temperatures. Gradients reach
    ``new_features`` only: ``W_o`` and the old logits are detached.

    Args:
        weight: host-side multiplier.
        temperature: ``T`` (2 in LwF; openBCT uses 1).

    Example:
        >>> import torch
        >>> from reid_lab.losses.compatible.base import CompatibleInputs
        >>> w_old = torch.eye(2)
        >>> x = CompatibleInputs(new_features=torch.tensor([[1.0, 0.0]]), old_features=torch.zeros(1, 2),
        ...     labels=torch.tensor([0]), old_logits=torch.tensor([[1.0, 0.0]]), old_class_weight=w_old)
        >>> LwFLoss(temperature=1.0)(x).loss.item()  # identical distributions
        0.0
    """

    name = "lwf"
    needs = frozenset({"old_class_weight", "old_logits"})

    def __init__(self, weight: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__(weight)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Part ``lwf/kl`` (the loss itself).

        Args:
            inputs: batch with ``new_features`` ``(B, d_old)``, ``old_logits`` ``(B, C_old)`` and
                ``old_class_weight`` ``(C_old, d_old)``.
        """
        feats = inputs.new_features
        weight = inputs.old_class_weight.detach().to(feats.dtype)
        z_o = inputs.old_logits.detach().to(feats.dtype)
        if weight.dim() != 2 or weight.shape[1] != feats.shape[1]:
            raise ValueError(
                f"LwFLoss: old_class_weight must be (C_old, d_old) with d_old = {feats.shape[1]} "
                f"(new_features' dim), got {tuple(weight.shape)}"
            )
        if z_o.shape != (feats.shape[0], weight.shape[0]):
            raise ValueError(
                f"LwFLoss: old_logits must be (B, C_old) = ({feats.shape[0]}, {weight.shape[0]}), "
                f"got {tuple(z_o.shape)}"
            )
        z_n = feats @ weight.t()
        loss = _kl_old_to_new(z_n, z_o, self.temperature).mean() * self.temperature**2
        return CompatibleLossOutput(loss, {"lwf/kl": loss.detach()})
