"""Feature files: embeddings of a split with their ids, camids, items and embedding-space record.

A feature file is a ``torch.save`` dictionary::

    {"format": "reid_lab.features/2", "features": (N, D) float32, "pids": (N,) int64,
     "camids": (N,) int64 or None, "is_query": (N,) bool, "modality": "image" | "text",
     "query_modality": "image" | "text" (optional), "items": [str] * N (image paths or caption texts),
     "space": {...}}

``modality`` is what the gallery rows (and, without ``query_modality``, every row) hold; an evaluation split of
caption queries against an image gallery (text-to-person) has ``modality: image`` and ``query_modality: text``.

``space`` records which embedding space the vectors live in (see ``reid_lab.embedding.space``); searching
features of one space with queries of another is refused unless a compatibility claim says it is safe.
Version-1 files (``paths`` instead of ``items``, always images with camids) still load. Files are written
atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from reid_lab.atomic import atomic_torch_save
from reid_lab.embedding.encoder import MODALITIES

FORMAT = "reid_lab.features/2"
READABLE_FORMATS = ("reid_lab.features/1", FORMAT)


@dataclass
class FeatureSet:
    """Embeddings of ``N`` items (images or captions) and what is known about them.

    Attributes:
        features: ``(N, D)`` embeddings.
        pids: ``(N,)`` identity (or class / pair) ids; items of one id match each other.
        camids: ``(N,)`` camera ids, or None where cameras do not apply (captions, cross-modal search).
        is_query: ``(N,)`` bool, query rows of an evaluation split.
        items: ``N`` image paths or caption texts.
        space: the embedding-space record.
        modality: ``"image"`` or ``"text"``: what the gallery (non-query) rows hold.
        query_modality: what the query rows hold, when it differs from ``modality`` (cross-modal splits);
            None: the same as ``modality``.
    """

    features: Tensor
    pids: Tensor
    camids: Tensor | None
    is_query: Tensor
    items: list[str]
    space: dict[str, Any] = field(default_factory=dict)
    modality: str = "image"
    query_modality: str | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("pids", "camids", "is_query"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"FeatureSet.{name} has {value.shape[0]} rows, features has {n}")
        if len(self.items) != n:
            raise ValueError(f"FeatureSet.items has {len(self.items)} entries, features has {n} rows")
        if self.modality not in MODALITIES:
            raise ValueError(f"FeatureSet.modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.query_modality == self.modality:
            self.query_modality = None
        if self.query_modality is not None and self.query_modality not in MODALITIES:
            raise ValueError(f"FeatureSet.query_modality must be one of {MODALITIES} or None, "
                             f"got {self.query_modality!r}")

    @property
    def modalities(self) -> tuple[str, str]:
        """``(query modality, gallery modality)``."""
        return (self.query_modality or self.modality, self.modality)

    @property
    def paths(self) -> list[str]:
        """Image paths (the ``items`` of an image feature set)."""
        if self.modalities != ("image", "image"):
            raise ValueError(f"a {'->'.join(self.modalities)} feature set holds text items, not image paths")
        return self.items

    def split(self) -> tuple[FeatureSet, FeatureSet]:
        """(query, gallery) parts by ``is_query``; each holds one modality."""
        return self.select(self.is_query), self.select(~self.is_query)

    def select(self, mask: Tensor) -> FeatureSet:
        """The rows of ``mask``; a selection of only query (only gallery) rows has one modality."""
        idx = torch.nonzero(mask, as_tuple=False).flatten()
        chosen = self.is_query[idx]
        modality, query_modality = self.modality, self.query_modality
        if len(chosen) and bool(chosen.all()):
            modality, query_modality = self.modalities[0], None
        elif not bool(chosen.any()):
            query_modality = None
        return FeatureSet(
            self.features[idx], self.pids[idx], None if self.camids is None else self.camids[idx],
            chosen, [self.items[i] for i in idx.tolist()], dict(self.space), modality, query_modality,
        )

    def save(self, path: str | Path) -> Path:
        payload = {
            "format": FORMAT,
            "features": self.features.detach().cpu().float().contiguous(),
            "pids": self.pids.cpu().long(),
            "camids": None if self.camids is None else self.camids.cpu().long(),
            "is_query": self.is_query.cpu().bool(),
            "modality": self.modality,
            "query_modality": self.query_modality,
            "items": list(self.items),
            "space": dict(self.space),
        }
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature file {path} does not exist")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path} is not a reid_lab feature file (expected format {FORMAT!r})")
        items = payload["items"] if "items" in payload else payload["paths"]
        return cls(
            payload["features"], payload["pids"], payload["camids"], payload["is_query"], items,
            payload.get("space", {}), payload.get("modality", "image"), payload.get("query_modality"),
        )


class FeatureWriter(BasePredictionWriter):
    """Writes the predictions of ``reid-lab predict`` to one feature file.

    The module's ``predict_step`` returns ``embedding``, ``pid``, ``index``, ``is_query``, ``camid`` (when
    the data has cameras) and ``modality``; the items (image paths or captions) come from the data module's
    ``predict_records()``. With several devices every rank writes
    its own part (``<stem>.rank<k>.pt``).

    Args:
        output: feature file to write (``.pt``); ``None`` disables writing.
    """

    def __init__(self, output: str | None = "predictions/features.pt") -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.written: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if self.output is None or not predictions:
            return
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        modality = batches[0].get("modality", "image")
        cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if k != "modality"}
        order = torch.argsort(cat["index"])
        records, _ = trainer.datamodule.predict_records()
        space = pl_module.embedding_space() if hasattr(pl_module, "embedding_space") else {}
        items = [getattr(records[i], "path", None) or getattr(records[i], "text", "")
                 for i in cat["index"][order].tolist()]
        features = FeatureSet(
            cat["embedding"][order], cat["pid"][order], cat["camid"][order] if "camid" in cat else None,
            cat["is_query"][order], items, space, modality,
        )
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        self.written = features.save(path)
        print(f"wrote {len(features.items)} {modality} embeddings of dim {features.features.shape[1]} to {self.written}")
