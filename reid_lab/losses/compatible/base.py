"""The one interface every compatible-loss plugin implements, whatever encoder produced the features.

A plugin receives a :class:`CompatibleInputs` (new features, frozen old features, labels, and the old
classifier / prototypes when it needs them) and returns a :class:`CompatibleLossOutput` (a scalar loss and
named parts for logging). The host LightningModule multiplies the loss by ``plugin.weight`` and adds it to
the model's own losses. Plugins that need dataset-level state (class means of old features, refined
prototypes, ...) say so in :attr:`CompatibleLoss.needs`; the host fills those fields of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class CompatibleInputs:
    """Everything a compatible-loss plugin may look at for one training batch.

    Attributes:
        new_features: ``(B, d_old)`` embedding of the new model, already mapped to the old space's dimension
            by the host's dimension adapter when ``d_new != d_old`` (not L2-normalised; plugins normalise
            where their formula says so). Carries gradients.
        old_features: ``(B, d_old)`` embedding of the same images by the frozen old model (no gradients).
        labels: ``(B,)`` int64 class labels in the *new* training set's label space.
        new_logits: ``(B, C_new)`` logits of the new model's own classifier, if it has one.
        old_logits: ``(B, C_old)`` logits of the frozen old classifier on these images, if it has one.
        old_classifier: ``(C_new, d_old)`` rows of the old classifier indexed by new labels (rows for classes
            the old model never saw are synthesised from old-feature class means; BCT §3.2). No gradients.
        prototypes: ``(C_new, d_old)`` class prototypes in the old space (old-feature class means on the new
            training data, optionally refined; UniBCT). No gradients.
        new_all_features: ``(B, d_new)`` the new model's features before the dimension adapter (for
            new-to-new terms in the new model's own space); defaults to ``new_features``.
        epoch: current training epoch (plugins with warm-up schedules read it).
    """

    new_features: Tensor
    old_features: Tensor
    labels: Tensor
    new_logits: Tensor | None = None
    old_logits: Tensor | None = None
    old_classifier: Tensor | None = None
    prototypes: Tensor | None = None
    new_all_features: Tensor | None = None
    epoch: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class CompatibleLossOutput:
    """A scalar loss and its named parts (all detached scalars are fine for logging)."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class CompatibleLoss(nn.Module):
    """Base class of compatible-loss plugins.

    Subclasses implement :meth:`compute` and list in ``needs`` which optional fields of
    :class:`CompatibleInputs` must be present (``"old_classifier"``, ``"prototypes"``, ``"old_logits"``,
    ``"new_logits"``). :meth:`forward` checks them and raises a clear error when the host did not provide one.

    Args:
        weight: multiplier applied by the host when adding this loss to the total.
    """

    name: str = "compatible"
    needs: frozenset[str] = frozenset()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        for key in self.needs:
            if getattr(inputs, key) is None:
                raise ValueError(
                    f"compatible loss {type(self).__name__!r} needs inputs.{key}, but the host gave None; "
                    f"configure the upgrade so that {key} is provided"
                )
        out = self.compute(inputs)
        if out.loss.dim() != 0:
            raise RuntimeError(f"{type(self).__name__}.compute must return a scalar loss, got {tuple(out.loss.shape)}")
        return out

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_train_epoch_start(self, epoch: int) -> bool:
        """Called by the host at each epoch start. Return True if the plugin wants its prototypes refreshed."""
        return False


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Row-wise L2 normalisation, ``(N, d) -> (N, d)``."""
    return torch.nn.functional.normalize(x, dim=-1, eps=eps)
