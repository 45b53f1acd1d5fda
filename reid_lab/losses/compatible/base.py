"""The one interface every compatible-loss plugin implements, whatever encoder produced the features.

A plugin receives a :class:`CompatibleInputs` (new features, frozen old features, labels, and the old
classifier / prototypes when it needs them) and returns a :class:`CompatibleLossOutput` (a scalar loss and
named parts for logging). The host LightningModule multiplies the loss by ``plugin.weight`` and adds it to
the model's own losses. Plugins that need dataset-level state (class means of old features, refined
prototypes, ...) say so in :attr:`CompatibleLoss.needs` / :attr:`CompatibleLoss.uses` /
:attr:`CompatibleLoss.refreshes_prototypes`; the host fills those fields of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: Keys of :attr:`CompatibleInputs.extras` that a plugin may list in ``needs`` / ``uses``.
EXTRAS_KEYS: frozenset[str] = frozenset(
    {"new_classifier", "boundaries", "old_class_index", "old_means", "old_radii", "old_seen", "class_identity",
     "new_branch", "reference_features"}
)
#: Extras that change with every batch (the rest are class-level state computed once per fit).
PER_BATCH_EXTRAS: frozenset[str] = frozenset({"new_branch", "reference_features"})


@dataclass
class CompatibleInputs:
    """Everything a compatible-loss plugin may look at for one training batch.

    Shapes: ``B`` batch size, ``d_old`` / ``d_new`` the old / new embedding dimensions, ``C_new`` the number of
    classes of the *new* training set (labels ``0 .. C_new-1``), ``C_old`` the number of classes of the old
    model's trained classifier.

    Attributes:
        new_features: ``(B, d_old)`` embedding of the new model, already mapped to the old space's dimension
            by the host's dimension adapter when ``d_new != d_old`` (identity when equal; not L2-normalised,
            plugins normalise where their formula says so). Carries gradients.
        old_features: ``(B, d_old)`` embedding of the same images by the frozen old model (no gradients).
        labels: ``(B,)`` int64 class labels in the *new* training set's label space.
        new_logits: ``(B, C_new)`` logits of the new model's own classifier, if it has one (with gradients).
        old_logits: ``(B, C_old)`` logits of the frozen old model's classifier on these images, i.e.
            ``old_features @ old_class_weight.T`` for a bias-free head (no gradients).
        old_classifier: ``(C_new, d_old)`` rows of the old classifier indexed by *new* labels (rows for classes
            the old model never saw are synthesised from old-feature class means; BCT §3.2). No gradients.
        prototypes: ``(C_new, d_old)`` unit-norm class prototypes in the old space: old-feature class centres
            on the new training data (:func:`~reid_lab.losses.compatible.prototypes.class_centres`), or their
            UniBCT refinement (:func:`~reid_lab.losses.compatible.prototypes.refine_prototypes`), which has
            the same unit-norm convention. No gradients.
        new_all_features: ``(B, d_new)`` the new model's features before the dimension adapter (for terms in
            the new model's own space); defaults to ``new_features``.
        old_class_weight: ``(C_old, d_old)`` the old model's trained classifier matrix in the old label space
            (logits ``= features @ old_class_weight.T``, no bias). Frozen, no gradients. Unlike
            ``old_classifier`` it is not re-indexed by new labels and has no synthesised rows.
        epoch: current training epoch, counted from 0 (plugins with warm-up schedules read it).
        progress: fraction of the planned optimiser steps done, in ``[0, 1]`` (``global_step /
            estimated_stepping_batches``), or None when the host runs without a trainer (AdvBCT's gradient
            reversal schedule).
        max_epochs: the trainer's planned number of epochs, or None (AdvBCT's adversarial weight decay).
        extras: named tensors for single plugins, each listed in a plugin's ``needs`` / ``uses`` when read:

            - ``"new_classifier"``: ``(C_new, d_old)`` the new model's classifier weight, mapped to the old
              dimension by the *same* adapter as ``new_features`` (with gradients). LCE, ``bct_ract``.
            - ``"boundaries"``: ``(C_new,)`` LCE boundary cosines
              (:func:`~reid_lab.losses.compatible.prototypes.class_boundaries`). No gradients.
            - ``"old_class_index"``: ``(C_old,)`` int64; old class ``j`` is new-logit column
              ``old_class_index[j]`` (PCT, when ``C_new != C_old``).
            - ``"old_means"``: ``(C_new, d_old)`` per class, the mean of the L2-normalised old features (not
              normalised again; AdvBCT's centres). No gradients.
            - ``"old_radii"``: ``(C_new,)`` per class, the largest distance of a normalised old feature to
              ``old_means`` after 1.5·IQR outlier removal; ``-1`` for a class with fewer than two kept
              distances (no boundary; AdvBCT,
              :func:`~reid_lab.losses.compatible.advbct.class_radii`). No gradients.
            - ``"old_seen"``: ``(C_new,)`` bool, whether the old model was trained on the class (AdvBCT's
              boundary covers old classes only).
            - ``"class_identity"``: ``(C_new,)`` int64, the identity of each new class in the dataset's whole
              training split (its raw pid), the same in every model version (d-Simplex vertices).
            - ``"new_branch"``: ``(B, d_f)`` the feature φ_new's basis transformation made ``new_all_features`` from
              (BT²'s ``f``; :class:`~reid_lab.models.basis_transform.BasisTransform`). With gradients.
            - ``"reference_features"``: ``(B, d_ref)`` an independently trained new model φ_n*'s embedding of the
              same images (the host's ``reference_checkpoint``; BT²). No gradients.
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
    old_class_weight: Tensor | None = None
    progress: float | None = None
    max_epochs: int | None = None

    def has(self, key: str) -> bool:
        """True when the optional input ``key`` (a field name or an :data:`EXTRAS_KEYS` key) is present."""
        if key in EXTRAS_KEYS:
            return self.extras.get(key) is not None
        return getattr(self, key) is not None


_OPTIONAL_FIELDS = frozenset(
    {"new_logits", "old_logits", "old_classifier", "prototypes", "new_all_features", "old_class_weight"}
)


@dataclass
class CompatibleLossOutput:
    """A scalar loss and its named parts (all detached scalars are fine for logging)."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class CompatibleLoss(nn.Module):
    """Base class of compatible-loss plugins.

    Subclasses implement :meth:`compute` and declare what they read beyond ``new_features``,
    ``old_features``, ``labels`` and ``epoch``, so that the host prepares exactly that and nothing is
    special-cased by name:

    - ``needs``: optional inputs that must be present (fields of :class:`CompatibleInputs` such as
      ``"old_classifier"``, ``"prototypes"``, ``"old_logits"``, ``"new_logits"``, ``"old_class_weight"``, or
      :data:`EXTRAS_KEYS` such as ``"boundaries"``); :meth:`forward` raises a clear error when one is missing.
    - ``uses``: optional inputs read *when present* (e.g. PCT's ``"old_class_index"``); the host should
      provide them when it can.
    - ``refreshes_prototypes``: the plugin may ask, through :meth:`on_train_epoch_start`, for ``prototypes``
      recomputed with the current new model (UniBCT); the host then keeps the old features of the training
      set and calls :func:`~reid_lab.losses.compatible.prototypes.refine_prototypes`.

    Args:
        weight: multiplier applied by the host when adding this loss to the total.
    """

    name: str = "compatible"
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    refreshes_prototypes: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = (set(cls.needs) | set(cls.uses)) - _OPTIONAL_FIELDS - EXTRAS_KEYS
        if unknown:
            raise TypeError(
                f"{cls.__name__}.needs/uses name unknown inputs {sorted(unknown)}; known: "
                f"{sorted(_OPTIONAL_FIELDS | EXTRAS_KEYS)}"
            )

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        for key in sorted(self.needs):
            if not inputs.has(key):
                where = f"inputs.extras[{key!r}]" if key in EXTRAS_KEYS else f"inputs.{key}"
                raise ValueError(
                    f"compatible loss {type(self).__name__!r} needs {where}, but the host gave None; "
                    f"configure the upgrade so that {key} is provided"
                )
        out = self.compute(inputs)
        if out.loss.dim() != 0:
            raise RuntimeError(f"{type(self).__name__}.compute must return a scalar loss, got {tuple(out.loss.shape)}")
        return out

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, old_dim: int, new_dim: int, num_classes: int) -> None:
        """Called by the host once, at construction, with the embedding dimensions and ``C_new``.

        Plugins with trainable parameters whose shapes depend on them (AdvBCT's discriminator and per-class
        scalars) create them here, so that they exist before the optimiser is built and before a checkpoint's
        weights are loaded. ``num_classes`` is 0 when the new encoder has no classifier (unknown).
        """

    def on_train_epoch_start(self, epoch: int) -> bool:
        """Called by the host at each epoch start. Return True if the plugin wants its prototypes refreshed.

        Only plugins with ``refreshes_prototypes = True`` may return True.
        """
        return False


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Row-wise L2 normalisation, ``(N, d) -> (N, d)``."""
    return torch.nn.functional.normalize(x, dim=-1, eps=eps)
