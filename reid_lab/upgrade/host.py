"""The plugin host: runs the frozen φ_old next to φ_new and adds the configured compatible losses.

One host serves every LightningModule that trains a new model against an old one (ReID now; CLIP and VLM
encoders later): the module hands it the new model's outputs for a batch and gets back the weighted sum
of the compatible losses and their parts for logging.

Dataset-level state the plugins ask for (``needs``) is prepared at fit start from one pass of φ_old (and,
for UniBCT refreshes, φ_new) over the new training set with the evaluation transform:

* ``old_classifier``: BCT's old classifier indexed by new labels, rows of unseen classes synthesised from
  old-feature class means (Shen et al. CVPR'20 §3.2);
* ``prototypes``: old-feature class centres (LCE, BCT prototype variant), refined by the new model's
  intra-class graph for UniBCT (Zhang et al. IJCAI'22);
* ``extras``: ``new_classifier`` (the new model's classifier, with gradients), ``boundaries`` (LCE) and
  ``old_class_index`` (PCT / LwF when the new label space contains the old one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.data.records import ImageRecord
from reid_lab.losses.compatible import CompatibleInputs, build_compatible_loss
from reid_lab.losses.compatible.classifier_synthesis import class_means, synthesize_old_classifier
from reid_lab.losses.compatible.prototypes import class_boundaries, class_centres, refine_prototypes
from reid_lab.embedding.extract import extract
from reid_lab.upgrade.adapters import DimensionAdapter
from reid_lab.upgrade.old_model import FrozenEncoder, reid_model_from_checkpoint
from reid_lab.upgrade.scenarios import label_map

log = logging.getLogger(__name__)

UNIBCT = "unibct"


class CompatibilityHost(nn.Module):
    """Frozen old model + dimension adapter + compatible-loss plugins.

    Args:
        old_checkpoint: checkpoint of φ_old (any ``ReIDModule`` checkpoint).
        compatible_losses: plugin specs ``[{"name": "bct", "weight": 1.0, ...}, ...]`` (see
            ``reid_lab.losses.compatible.COMPATIBLE_LOSSES``); an empty list trains an independent φ_new*
            (useful as the upper bound, still with φ_old loaded for diagnostics).
        new_dim: embedding dimension of φ_new.
        adapter: how new features reach the old dimension when they differ: ``linear`` (learned),
            ``truncate`` (first d_old coordinates, openBCT) or ``pad``.
        old_train_subset: training-subset file of φ_old (default: read from its checkpoint's data
            hyper-parameters); used to map new classes to old classifier rows.
    """

    def __init__(
        self,
        old_checkpoint: str,
        compatible_losses: list[dict[str, Any]],
        new_dim: int,
        adapter: str = "linear",
        old_train_subset: str | None = None,
    ) -> None:
        super().__init__()
        old_model, checkpoint = reid_model_from_checkpoint(old_checkpoint)
        self.old_checkpoint = str(old_checkpoint)
        self.old = FrozenEncoder(old_model)
        self.old_space: dict[str, Any] = checkpoint.get("embedding_space") or {}
        data_hp = checkpoint.get("datamodule_hyper_parameters") or {}
        self.old_train_subset = old_train_subset if old_train_subset is not None else data_hp.get("train_subset")
        self.old_dim = old_model.embedding_dim
        self.adapter = DimensionAdapter(new_dim, self.old_dim, kind=adapter)
        self.plugins = nn.ModuleList(_build_plugins(compatible_losses))
        self.needs: set[str] = set().union(*(set(p.needs) for p in self.plugins)) if self.plugins else set()
        if any(p.name == "lce" for p in self.plugins):
            self.needs.add("prototypes")
        self.register_buffer("old_classifier", None, persistent=False)
        self.register_buffer("prototypes", None, persistent=False)
        self.register_buffer("boundaries", None, persistent=False)
        self.register_buffer("old_class_index", None, persistent=False)
        self._old_features: Tensor | None = None
        self._labels: Tensor | None = None

    # ------------------------------------------------------------------------------------ preparation
    def prepare(self, new_records: list[ImageRecord], train_pool: list[ImageRecord], transform,
                new_model: nn.Module, batch_size: int = 128, num_workers: int = 0) -> None:
        """Compute the dataset-level state the plugins need, with φ_old over the new training set.

        Args:
            new_records: training records of φ_new, pids relabelled ``0..C_new-1``.
            train_pool: the dataset's full training split (pids as parsed), to recover the raw identity
                of every record and map new classes to old ones.
            transform: evaluation transform (no augmentation).
            new_model: φ_new (used for UniBCT's refinement and the new classifier).
        """
        if not self.needs and not any(p.name == UNIBCT for p in self.plugins):
            return
        device = next(new_model.parameters()).device
        labels = torch.tensor([r.pid for r in new_records], dtype=torch.long)
        num_classes = int(labels.max()) + 1
        old_feats = self._extract(lambda x: self.old(x)["embedding"], new_records, transform, device,
                                  batch_size, num_workers)
        self._old_features, self._labels = old_feats, labels
        means = class_means(old_feats, labels, num_classes)
        old_of_new = self._old_label_of_new(new_records, train_pool)
        if "old_classifier" in self.needs:
            trained = self.old.model.classifier_weight
            if trained is None:
                old_of_new = torch.full_like(old_of_new, -1)
            self.old_classifier = synthesize_old_classifier(
                None if trained is None else trained.detach().float().cpu(), old_of_new, means
            ).to(device)
        if "prototypes" in self.needs:
            centres = class_centres(old_feats, labels, num_classes)
            self.prototypes = centres.to(device)
            self.boundaries = class_boundaries(old_feats, labels, centres).to(device)
        old_classes = self.old.model.num_classes
        if old_classes and (old_of_new >= 0).sum() == old_classes:
            index = torch.full((old_classes,), -1, dtype=torch.long)
            new_cols = torch.nonzero(old_of_new >= 0).flatten()
            index[old_of_new[new_cols]] = new_cols
            self.old_class_index = index.to(device)
        log.info("compatibility host prepared: %d classes (%d seen by the old model), needs %s",
                 num_classes, int((old_of_new >= 0).sum()), sorted(self.needs))

    def refresh_prototypes(self, new_records, transform, new_model, batch_size=128, num_workers=0) -> None:
        """UniBCT: refine the old prototypes with φ_new's current intra-class similarity graph."""
        if self._old_features is None:
            raise RuntimeError("refresh_prototypes called before prepare()")
        device = next(new_model.parameters()).device
        was_training = new_model.training
        new_model.eval()
        new_feats = self._extract(lambda x: new_model(x)["embedding"], new_records, transform, device,
                                  batch_size, num_workers)
        new_model.train(was_training)
        num_classes = int(self._labels.max()) + 1
        self.prototypes = refine_prototypes(self._old_features, new_feats, self._labels, num_classes).to(device)
        log.info("UniBCT prototypes refined with the current new model")

    @staticmethod
    def _extract(encode, records, transform, device, batch_size, num_workers) -> Tensor:
        return extract(encode, records, transform, batch_size=batch_size, num_workers=num_workers,
                       device=device)["embedding"]

    def _old_label_of_new(self, new_records: list[ImageRecord], train_pool: list[ImageRecord]) -> Tensor:
        raw_of_path = {r.path: r.pid for r in train_pool}
        unknown = [r.path for r in new_records if r.path not in raw_of_path]
        if unknown:  # φ_new trains on another dataset than the pool: no class correspondence
            return torch.full((len({r.pid for r in new_records}),), -1, dtype=torch.long)
        new_raw = _raw_records(new_records, raw_of_path)
        if self.old_train_subset is None:
            old_raw = list(train_pool)
        else:
            paths = set(json.loads(Path(self.old_train_subset).read_text())["paths"])
            old_raw = [r for r in train_pool if r.path in paths]
        return label_map(old_raw, new_raw)

    # -------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self, epoch: int) -> bool:
        """Tell the plugins the epoch; True when one of them wants refreshed prototypes."""
        return any([p.on_train_epoch_start(epoch) for p in self.plugins])

    def forward(self, images: Tensor, new_outputs: dict[str, Tensor], labels: Tensor, epoch: int,
                new_classifier: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the compatible losses for one batch and their logged parts.

        Args:
            images: ``(B, 3, H, W)`` the batch φ_new saw (φ_old embeds the same augmented images).
            new_outputs: φ_new's outputs (``embedding`` ``(B, d_new)``, optionally ``logits``).
            labels: ``(B,)`` new-training-set labels.
            epoch: current epoch.
            new_classifier: ``(C_new, d_new)`` φ_new's classifier weight (with gradients), if it has one.
        """
        old_out = self.old(images)
        new_embedding = new_outputs["embedding"].float()
        extras: dict[str, Tensor] = {}
        if new_classifier is not None:
            extras["new_classifier"] = self.adapter(new_classifier.float())
        if self.boundaries is not None:
            extras["boundaries"] = self.boundaries
        if self.old_class_index is not None:
            extras["old_class_index"] = self.old_class_index
        inputs = CompatibleInputs(
            new_features=self.adapter(new_embedding),
            old_features=old_out["embedding"],
            labels=labels,
            new_logits=new_outputs.get("logits"),
            old_logits=old_out.get("logits"),
            old_classifier=self.old_classifier,
            prototypes=self.prototypes,
            new_all_features=new_embedding,
            epoch=epoch,
            extras=extras,
        )
        total = new_embedding.new_zeros(())
        parts: dict[str, Tensor] = {}
        for plugin in self.plugins:
            out = plugin(inputs)
            total = total + plugin.weight * out.loss
            parts.update({k: v.detach() for k, v in out.parts.items()})
            parts.setdefault(f"{plugin.name}/loss", out.loss.detach())
        with torch.no_grad():
            parts["compat/n2o_cos"] = nn.functional.cosine_similarity(
                inputs.new_features.detach(), inputs.old_features, dim=1).mean()
        return total, parts


def _raw_records(records: list[ImageRecord], raw_of_path: dict[str, int]) -> list[ImageRecord]:
    return [ImageRecord(r.path, raw_of_path[r.path], r.camid) for r in records]


def _build_plugins(specs: list[dict[str, Any]]) -> list[nn.Module]:
    plugins = []
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"compatible_losses[{i}] must be a mapping with a 'name' key, got {spec!r}")
        plugins.append(build_compatible_loss(spec["name"], **{k: v for k, v in spec.items() if k != "name"}))
    return plugins
