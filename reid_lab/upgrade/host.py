"""The plugin host: runs the frozen φ_old next to φ_new and adds the configured compatible losses.

One host serves every :class:`~reid_lab.modules.base.EmbeddingModule` that trains a new encoder against an
old one (ReID CNNs, CLIP towers, VLM embedders): the module hands it the batch, the new encoder's training
embeddings per modality and the labels, and gets back the weighted sum of the compatible losses and their
parts for logging.

**Pairings.** Each pairing ``"<new modality>-><old modality>"`` builds one
:class:`~reid_lab.losses.compatible.CompatibleInputs` from the new embedding of one modality and the old
embedding of the same items in another (or the same) modality, and runs every plugin on it:
``image->image`` for ReID, ``image->image`` + ``text->text`` for a CLIP upgrade, ``text->image`` to keep new
caption queries searchable in an old image gallery. The plugins never see which pairing they run on;
their logged parts are prefixed with it (``image2image/bct/loss``).

**Class-level state** (old classifier, prototypes, boundaries, old-class index) follows the plugins' declared
``needs`` / ``uses`` (:mod:`reid_lab.upgrade.class_state`) and is computed by one call,
:meth:`CompatibilityHost.prepare`, from a :class:`~reid_lab.data.views.TrainingSetView` the data module
provides. UniBCT-style refreshes happen inside :meth:`CompatibilityHost.on_train_epoch_start`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.data.views import TrainingSetView
from reid_lab.embedding.embedder import Embedder
from reid_lab.embedding.extract import embed_batches
from reid_lab.losses.compatible import CompatibleInputs, CompatibleLoss, build_compatible_loss
from reid_lab.losses.compatible.base import EXTRAS_KEYS, PER_BATCH_EXTRAS
from reid_lab.upgrade.adapters import DimensionAdapter
from reid_lab.upgrade.class_state import TENSORS, ClassLevelState, identity_of_new, old_label_of_new
from reid_lab.upgrade.old_model import FrozenEncoder, load_frozen_encoder

log = logging.getLogger(__name__)


def parse_pairing(pairing: str) -> tuple[str, str]:
    """``"text->image"`` -> ``("text", "image")``."""
    new, sep, old = str(pairing).partition("->")
    if not sep or not new.strip() or not old.strip():
        raise ValueError(f"a pairing reads '<new modality>-><old modality>', e.g. 'image->image'; got {pairing!r}")
    return new.strip(), old.strip()


class CompatibilityHost(nn.Module):
    """Frozen old encoder + dimension adapter + compatible-loss plugins.

    Args:
        old_checkpoint: checkpoint of φ_old (any reid_lab checkpoint; its encoder is rebuilt from it).
        compatible_losses: plugin specs ``[{"name": "bct", "weight": 1.0, ...}, ...]`` (see
            ``reid_lab.losses.compatible.COMPATIBLE_LOSSES``); an empty list trains an independent φ_new*
            (useful as the upper bound, still with φ_old loaded for the validation cross-test).
        new_dim: embedding dimension of φ_new.
        new_modalities: what φ_new embeds (the module passes its encoder's ``modalities``).
        adapter: how new features reach the old dimension when they differ: ``linear`` (learned),
            ``truncate`` (first d_old coordinates, openBCT) or ``pad``.
        pairings: ``["image->image", "text->image", ...]``; default: every modality both models embed,
            paired with itself.
        old_train_subset: training-subset file of φ_old (default: read from its checkpoint's data
            hyper-parameters); used to map new classes to old classifier rows.
        new_num_classes: ``C_new``, the new encoder's classifier size (0: none); the module passes it, so
            plugins with per-class parameters (AdvBCT) can create them in
            :meth:`~reid_lab.losses.compatible.CompatibleLoss.bind`.
        reference_checkpoint: an independently trained new model φ_n* (BT²), frozen like φ_old: its embedding of
            each training batch reaches the plugins as ``extras["reference_features"]``. Required when a plugin
            needs them, refused otherwise (it would cost a forward pass for nothing).

    Plugins are submodules: their parameters (AdvBCT's discriminator) are trained by the new model's
    optimiser and saved in its checkpoint.
    """

    def __init__(
        self,
        old_checkpoint: str,
        compatible_losses: list[dict[str, Any]] | None,
        new_dim: int,
        new_modalities: tuple[str, ...] | list[str] = ("image",),
        adapter: str = "linear",
        pairings: list[str] | None = None,
        old_train_subset: str | None = None,
        new_num_classes: int = 0,
        reference_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.old: FrozenEncoder = load_frozen_encoder(old_checkpoint)
        self.old_checkpoint = str(old_checkpoint)
        self.old_space: dict[str, Any] = self.old.space
        self.old_train_subset = old_train_subset if old_train_subset is not None else self.old.train_subset
        self.old_dim = self.old.embedding_dim
        self.adapter = DimensionAdapter(new_dim, self.old_dim, kind=adapter)
        self.adapter_kind = adapter
        self.plugins = nn.ModuleList(build_plugins(compatible_losses))
        for plugin in self.plugins:
            plugin.bind(old_dim=self.old_dim, new_dim=int(new_dim), num_classes=int(new_num_classes))
        if pairings is None:
            pairings = [f"{m}->{m}" for m in new_modalities if m in self.old.modalities]
        self.pairings = [parse_pairing(p) for p in pairings]
        for new, old in self.pairings:
            if new not in new_modalities or old not in self.old.modalities:
                raise ValueError(
                    f"pairing {new}->{old}: the new encoder embeds {list(new_modalities)}, the old one "
                    f"({self.old_checkpoint}) {list(self.old.modalities)}"
                )
        if not self.pairings:
            raise ValueError(f"the new encoder ({list(new_modalities)}) and the old one "
                             f"({list(self.old.modalities)}) share no modality; give pairings explicitly")
        needs: set[str] = set()
        for plugin in self.plugins:
            needs |= set(plugin.needs) | set(getattr(plugin, "uses", ()))
        self.reference: FrozenEncoder | None = None
        if "reference_features" in needs and reference_checkpoint is None:
            raise ValueError("upgrade.reference_checkpoint is required: a compatible loss "
                             f"({', '.join(p.name for p in self.plugins if 'reference_features' in p.needs)}) "
                             "trains towards an independently trained new model's embeddings")
        if reference_checkpoint is not None:
            if "reference_features" not in needs:
                raise ValueError(f"upgrade.reference_checkpoint {reference_checkpoint} is given, but no compatible "
                                 "loss reads reference features (bt2 does)")
            self.reference = load_frozen_encoder(reference_checkpoint)
            missing = [m for m, _ in self.pairings if m not in self.reference.modalities]
            if missing:
                raise ValueError(f"upgrade.reference_checkpoint {reference_checkpoint} embeds "
                                 f"{list(self.reference.modalities)}, not the new side's {missing}")
        self.per_batch_needs = needs & PER_BATCH_EXTRAS
        refresh = any(getattr(p, "refreshes_prototypes", False) for p in self.plugins)
        self.state = ClassLevelState(needs, refresh=refresh)
        self._view: TrainingSetView | None = None
        self._restored_state: dict[str, Any] | None = None

    @property
    def needs(self) -> set[str]:
        return self.state.needs

    # ------------------------------------------------------------------------------------ preparation
    def prepare(self, view: TrainingSetView, device: torch.device | str = "cpu") -> None:
        """Compute the class-level state the plugins need with one pass of φ_old over the training set.

        A state restored from a checkpoint (:meth:`load_state`) replaces the freshly computed one, so a resumed
        fit continues with the prototypes it had (UniBCT refinements included).
        """
        self._view = view
        labels = torch.tensor([r.pid for r in view.records], dtype=torch.long)
        old_features = None
        if self.state.needs_old_features:
            old_features = embed_batches(self.old.embedder(), view.batches(), modality=view.modality,
                                         device=device)["embedding"]
        old_of_new = old_label_of_new(view.records, view.raw_records, self.old_train_subset)
        encoder = self.old.encoder
        identity = identity_of_new(view.records, view.raw_records) if "class_identity" in self.needs else None
        self.state.prepare(old_features, labels, old_of_new, encoder.classifier_weight, encoder.num_classes,
                           class_identity=identity)
        if self._restored_state is not None:
            self.state.load_state_dict(self._restored_state)
            self._restored_state = None
        self.state.to(device)
        log.info("compatibility host prepared: %d classes (%d seen by the old model), needs %s",
                 view.num_classes, int((old_of_new >= 0).sum()), sorted(self.state.needs))

    def on_train_epoch_start(self, epoch: int, new_embedder: Embedder) -> bool:
        """Tell the plugins the epoch; refine the prototypes when one asks (UniBCT). True if refined."""
        wants = any([p.on_train_epoch_start(epoch) for p in self.plugins])
        if not wants or epoch in self.state.refreshed_epochs:
            return False
        if self._view is None:
            raise RuntimeError("on_train_epoch_start before prepare(): the host has no training set")
        encoder = new_embedder.encoder
        was_training = encoder.training
        encoder.eval()
        try:
            new_features = embed_batches(new_embedder, self._view.batches(), modality=self._view.modality,
                                         device=new_embedder.device)["embedding"]
        finally:
            encoder.train(was_training)
        device = self.state.prototypes.device if self.state.prototypes is not None else "cpu"
        self.state.refine(new_features.cpu(), epoch)
        self.state.to(device)
        log.info("prototypes refined with the new model at epoch %d", epoch)
        return True

    def state_for_checkpoint(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state(self, state: dict[str, Any]) -> None:
        """Class-level state from a checkpoint; applied at the next :meth:`prepare`."""
        self._restored_state = dict(state)
        self.state.load_state_dict(state)

    def adapter_record(self) -> dict[str, Any]:
        """How to rebuild the adapter from a checkpoint (see :func:`~reid_lab.upgrade.old_model.load_embedder`)."""
        return {"kind": self.adapter_kind, "in_dim": self.adapter.in_dim, "out_dim": self.adapter.out_dim,
                "state_prefix": "host.adapter.", "old_space_id": self.old_space.get("space_id")}

    # -------------------------------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any], new_embeddings: dict[str, Tensor], labels: Tensor, epoch: int,
                new_classifier: Tensor | None = None, new_logits: Tensor | None = None,
                progress: float | None = None, max_epochs: int | None = None,
                new_branches: dict[str, Tensor] | None = None,
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the compatible losses over every pairing for one batch, and the logged parts.

        Args:
            batch: the training batch (φ_old embeds the same, augmented, inputs φ_new saw).
            new_embeddings: ``{modality: (B, d_new)}`` φ_new's training embeddings (with gradients).
            labels: ``(B,)`` new-training-set labels.
            epoch: current epoch.
            new_classifier: ``(C_new, d_new)`` φ_new's classifier weight (with gradients), if it has one.
            new_logits: ``(B, C_new)`` φ_new's image logits, if it has a classifier.
            progress: fraction of the planned optimiser steps done (:func:`training_schedule`), or None.
            max_epochs: the trainer's planned epochs, or None.
            new_branches: ``{modality: (B, D_f)}`` the feature a basis transformation made each embedding from
                (BT²'s ``f``, with gradients), passed as ``extras["new_branch"]``.
        """
        old_modalities = sorted({old for _, old in self.pairings})
        old_out = self.old.encode({m: batch[m] for m in old_modalities})
        state = self.state
        extras: dict[str, Tensor] = {}
        if new_classifier is not None and new_classifier.shape[-1] == self.adapter.in_dim:
            # (a basis transformation's classifier sees its branch, not the embedding the adapter maps)
            extras["new_classifier"] = self.adapter(new_classifier.float())
        for key in sorted(EXTRAS_KEYS & set(TENSORS)):  # boundaries, AdvBCT's radii, identities, ...
            if getattr(state, key) is not None:
                extras[key] = getattr(state, key)
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for new_m, old_m in self.pairings:
            new_embedding = new_embeddings[new_m].float()
            pairing_extras = dict(extras)
            if "new_branch" in self.per_batch_needs:
                branch = (new_branches or {}).get(new_m)
                if branch is None:
                    raise ValueError(f"a compatible loss reads the new model's branch feature (extras['new_branch']), "
                                     f"but the {new_m} encoder has none: give the model a basis_transform (BT²)")
                pairing_extras["new_branch"] = branch.float()
            if self.reference is not None:
                pairing_extras["reference_features"] = self.reference.encode({new_m: batch[new_m]})[new_m]
            inputs = CompatibleInputs(
                new_features=self.adapter(new_embedding),
                old_features=old_out[old_m],
                labels=labels,
                new_logits=new_logits if new_m == "image" else None,
                old_logits=old_out.get("logits") if old_m == "image" else None,
                old_classifier=state.old_classifier,
                prototypes=state.prototypes,
                new_all_features=new_embedding,
                epoch=epoch,
                extras=pairing_extras,
                old_class_weight=state.old_class_weight,
                progress=progress,
                max_epochs=max_epochs,
            )
            prefix = f"{new_m}2{old_m}/"
            for plugin in self.plugins:
                out = plugin(inputs)
                term = plugin.weight * out.loss
                total = term if total is None else total + term
                parts.update({prefix + k: v.detach() for k, v in out.parts.items()})
                parts.setdefault(f"{prefix}{plugin.name}/loss", out.loss.detach())
            with torch.no_grad():
                parts[f"{prefix}n2o_cos"] = nn.functional.cosine_similarity(
                    inputs.new_features.detach(), inputs.old_features, dim=1).mean()
        if total is None:  # no plugin: an independent φ_new*; a zero that keeps the graph
            total = sum(e.sum() for e in new_embeddings.values()) * 0.0
        return total, parts


def training_schedule(trainer: Any, global_step: int) -> dict[str, Any]:
    """``{"progress": global_step / planned steps, "max_epochs": ...}`` of a Lightning trainer, for the host.

    Empty without a trainer; ``progress`` is left out when the plan is open-ended (``max_epochs=-1``).
    """
    if trainer is None:
        return {}
    max_epochs = getattr(trainer, "max_epochs", None)
    out: dict[str, Any] = {"max_epochs": max_epochs if max_epochs and max_epochs > 0 else None}
    total = trainer.estimated_stepping_batches
    if total and math.isfinite(total):
        out["progress"] = min(1.0, float(global_step) / float(total))
    return out


def build_plugins(specs: list[dict[str, Any]] | None) -> list[CompatibleLoss]:
    """Instantiate ``[{"name": ..., **options}, ...]``; errors name the entry."""
    plugins = []
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"compatible_losses[{i}] must be a mapping with a 'name' key, got {spec!r}")
        plugins.append(build_compatible_loss(spec["name"], **{k: v for k, v in spec.items() if k != "name"}))
    return plugins
