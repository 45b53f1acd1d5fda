"""Class-level state of compatible losses, computed once per fit from φ_old over the new training set.

Which parts exist follows the plugins' declared ``needs`` / ``uses`` (nothing is special-cased by name):

* ``old_classifier`` ``(C_new, d_old)``: BCT's old classifier indexed by new labels; rows of classes the old
  model never saw are synthesised from old-feature class means (Shen et al. CVPR'20 §3.2);
* ``prototypes`` ``(C_new, d_old)``: old-feature class centres (LCE, BCT prototype variant, UniBCT), refined
  with φ_new's intra-class graph when a plugin ``refreshes_prototypes`` (UniBCT, Zhang et al. IJCAI'22);
* ``boundaries`` ``(C_new,)``: LCE's class boundaries;
* ``old_class_index`` ``(C_old,)``: new column of each old class (PCT / LwF when the new label space holds
  the old one);
* ``old_class_weight`` ``(C_old, d_old)``: the old model's own trained classifier (LwF);
* ``old_means`` ``(C_new, d_old)`` / ``old_radii`` ``(C_new,)``: AdvBCT's class centres of normalised old
  features and their 1.5·IQR radii (Pan et al. CVPR'23), ``old_seen`` ``(C_new,)``: classes the old model saw;
* ``class_identity`` ``(C_new,)``: each new class's identity in the whole training split (d-Simplex vertices,
  CoReS, Biondi et al. TPAMI'23).

The state survives a resume: :meth:`ClassLevelState.state_dict` goes into the checkpoint, so refined
prototypes are not recomputed from scratch (or lost) when training continues from ``last.ckpt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reid_lab.data.records import ImageRecord
from reid_lab.losses.compatible.advbct import class_radii
from reid_lab.losses.compatible.classifier_synthesis import class_means, synthesize_old_classifier
from reid_lab.losses.compatible.prototypes import class_boundaries, class_centres, refine_prototypes
from reid_lab.upgrade.splits import label_map

log = logging.getLogger(__name__)

TENSORS = ("old_classifier", "prototypes", "boundaries", "old_class_index", "old_class_weight", "old_means",
           "old_radii", "old_seen", "class_identity")


class ClassLevelState:
    """The dataset-level tensors the configured plugins need (see the module docstring).

    Args:
        needs: union of the plugins' ``needs`` and ``uses``.
        refresh: whether a plugin refreshes prototypes (the old features and labels are then kept).
    """

    def __init__(self, needs: set[str], refresh: bool = False) -> None:
        self.needs = set(needs) | ({"prototypes"} if refresh else set())
        self.refresh = refresh
        self.old_classifier: Tensor | None = None
        self.prototypes: Tensor | None = None
        self.boundaries: Tensor | None = None
        self.old_class_index: Tensor | None = None
        self.old_class_weight: Tensor | None = None
        self.old_means: Tensor | None = None
        self.old_radii: Tensor | None = None
        self.old_seen: Tensor | None = None
        self.class_identity: Tensor | None = None
        self.refreshed_epochs: list[int] = []
        self._old_features: Tensor | None = None
        self._labels: Tensor | None = None

    @property
    def needs_old_features(self) -> bool:
        return bool(self.needs & {"old_classifier", "prototypes", "boundaries", "old_means", "old_radii"})

    def prepare(self, old_features: Tensor | None, labels: Tensor, old_of_new: Tensor,
                old_classifier_weight: Tensor | None, old_num_classes: int,
                class_identity: Tensor | None = None) -> None:
        """Compute the state.

        Args:
            old_features: ``(N, d_old)`` φ_old embeddings of the new training set (None when not needed).
            labels: ``(N,)`` new labels ``0 .. C_new - 1``.
            old_of_new: ``(C_new,)`` old class of each new class, -1 for classes the old model never saw.
            old_classifier_weight: ``(C_old, d_old)`` φ_old's trained classifier, or None.
            old_num_classes: ``C_old`` (0 without classifier).
            class_identity: ``(C_new,)`` identity of each new class in the whole training split
                (:func:`identity_of_new`); needed when a plugin needs ``class_identity``.
        """
        num_classes = int(labels.max()) + 1
        trained = None if old_classifier_weight is None else old_classifier_weight.detach().float().cpu()
        if old_features is not None:
            if "old_classifier" in self.needs:
                mapping = old_of_new if trained is not None else torch.full_like(old_of_new, -1)
                means = class_means(old_features, labels, num_classes)
                self.old_classifier = synthesize_old_classifier(trained, mapping, means)
            if self.needs & {"prototypes", "boundaries"}:
                self.prototypes = class_centres(old_features, labels, num_classes)
                self.boundaries = class_boundaries(old_features, labels, self.prototypes)
            if self.needs & {"old_means", "old_radii"}:
                self.old_means, self.old_radii = class_radii(old_features, labels, num_classes)
            if self.refresh:
                self._old_features, self._labels = old_features, labels
        if "old_seen" in self.needs:
            self.old_seen = old_of_new >= 0
        if "class_identity" in self.needs:
            if class_identity is None or class_identity.shape != (num_classes,):
                raise ValueError(f"a compatible loss needs class_identity ({num_classes},), the identity of each "
                                 f"new class in the whole training split; got {class_identity!r}")
            self.class_identity = class_identity.long()
        if old_num_classes and int((old_of_new >= 0).sum()) == old_num_classes:
            index = torch.full((old_num_classes,), -1, dtype=torch.long)
            new_cols = torch.nonzero(old_of_new >= 0).flatten()
            index[old_of_new[new_cols]] = new_cols
            self.old_class_index = index
        if "old_class_weight" in self.needs:
            if trained is None:
                raise ValueError("a compatible loss needs the old model's classifier (old_class_weight), but the "
                                 "old checkpoint's encoder has none (num_classes 0)")
            self.old_class_weight = trained

    def refine(self, new_features: Tensor, epoch: int) -> None:
        """UniBCT: refine the old prototypes with φ_new's current intra-class graph."""
        if self._old_features is None or self._labels is None:
            raise RuntimeError("prototypes can only be refined after prepare() with refresh=True")
        num_classes = int(self._labels.max()) + 1
        self.prototypes = refine_prototypes(self._old_features, new_features, self._labels, num_classes)
        self.refreshed_epochs.append(int(epoch))

    def to(self, device: torch.device | str) -> ClassLevelState:
        for name in TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in TENSORS if getattr(self, name) is not None}
        out = {k: v.detach().cpu() for k, v in out.items()}
        out["refreshed_epochs"] = list(self.refreshed_epochs)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in TENSORS:
            if state.get(name) is not None:
                setattr(self, name, state[name])
        self.refreshed_epochs = list(state.get("refreshed_epochs", []))


def identity_of_new(new_records: list[ImageRecord], raw_records: list[ImageRecord]) -> Tensor:
    """``(C_new,)`` identity of each new class: its raw pid in the dataset's whole training split.

    The parsers number the whole training split's identities ``0 .. N-1``, the same for every model version
    trained on a subset of it, while the data module relabels each subset ``0 .. C_new - 1``. Records are
    matched by path. Without a correspondence (no ``raw_records``, or records from elsewhere) the new labels
    themselves are returned, with a warning: identities are then stationary only for versions trained on the
    same classes.
    """
    num_new = len({r.pid for r in new_records})
    raw_of_path = {r.path: r.pid for r in raw_records}
    if not raw_records or any(r.path not in raw_of_path for r in new_records):
        log.warning("no identity correspondence with the whole training split: the new labels 0..%d serve as "
                    "identities (d-Simplex vertices then differ between versions trained on other classes)",
                    num_new - 1)
        return torch.arange(num_new)
    identity = torch.full((num_new,), -1, dtype=torch.long)
    for r in new_records:
        raw, current = raw_of_path[r.path], int(identity[r.pid])
        if current not in (-1, raw):
            raise ValueError(f"new class {r.pid} holds images of identities {current} and {raw} "
                             f"of the training split ({r.path})")
        identity[r.pid] = raw
    return identity


def old_label_of_new(new_records: list[ImageRecord], raw_records: list[ImageRecord],
                     old_train_subset: str | None) -> Tensor:
    """``(C_new,)`` old class of each new class (-1: unseen by the old model), matched by identity.

    Args:
        new_records: φ_new's training records, labels ``0 .. C_new - 1``.
        raw_records: the dataset's training split with parsed ids (the shared identity of both models).
        old_train_subset: the old model's ``train_subset`` file (None: it trained on all of ``raw_records``).
    """
    num_new = len({r.pid for r in new_records})
    raw_of_path = {r.path: r.pid for r in raw_records}
    if not raw_records or any(r.path not in raw_of_path for r in new_records):
        return torch.full((num_new,), -1, dtype=torch.long)  # another dataset: no class correspondence
    new_raw = [ImageRecord(r.path, raw_of_path[r.path], r.camid) for r in new_records]
    if old_train_subset is None:
        old_raw = list(raw_records)
    else:
        path = Path(old_train_subset)
        if not path.is_file():
            raise FileNotFoundError(f"the old model's train_subset file {path} does not exist")
        paths = set(json.loads(path.read_text())["paths"])
        old_raw = [r for r in raw_records if r.path in paths]
    return label_map(old_raw, new_raw)
