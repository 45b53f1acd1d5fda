"""Feature files: embeddings of a split with their pids, camids, paths and embedding-space metadata.

A feature file is a ``torch.save`` dictionary::

    {"format": "reid_lab.features/1", "features": (N, D) float32, "pids": (N,) int64, "camids": (N,) int64,
     "is_query": (N,) bool, "paths": [str] * N, "space": {...}}

``space`` records which embedding space the vectors live in (see ``reid_lab.embedding.space``); searching
features of one space with queries of another is refused unless a compatibility claim says it is safe.
Files are written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from reid_lab.atomic import atomic_torch_save

FORMAT = "reid_lab.features/1"


@dataclass
class FeatureSet:
    """Embeddings of ``N`` images and what is known about them."""

    features: Tensor
    pids: Tensor
    camids: Tensor
    is_query: Tensor
    paths: list[str]
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("pids", "camids", "is_query"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"FeatureSet.{name} has {getattr(self, name).shape[0]} rows, features has {n}")
        if len(self.paths) != n:
            raise ValueError(f"FeatureSet.paths has {len(self.paths)} entries, features has {n} rows")

    def split(self) -> tuple[FeatureSet, FeatureSet]:
        """(query, gallery) parts by ``is_query``."""
        return self.select(self.is_query), self.select(~self.is_query)

    def select(self, mask: Tensor) -> FeatureSet:
        idx = torch.nonzero(mask, as_tuple=False).flatten()
        return FeatureSet(
            self.features[idx], self.pids[idx], self.camids[idx], self.is_query[idx],
            [self.paths[i] for i in idx.tolist()], dict(self.space),
        )

    def save(self, path: str | Path) -> Path:
        payload = {
            "format": FORMAT,
            "features": self.features.detach().cpu().float().contiguous(),
            "pids": self.pids.cpu().long(),
            "camids": self.camids.cpu().long(),
            "is_query": self.is_query.cpu().bool(),
            "paths": list(self.paths),
            "space": dict(self.space),
        }
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature file {path} does not exist")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a reid_lab feature file (expected format {FORMAT!r})")
        return cls(
            payload["features"], payload["pids"], payload["camids"], payload["is_query"], payload["paths"],
            payload.get("space", {}),
        )


class FeatureWriter(BasePredictionWriter):
    """Writes the predictions of ``reid-lab predict`` to one feature file.

    The module's ``predict_step`` returns ``embedding``, ``pid``, ``camid``, ``index`` and ``is_query``; the
    image paths come from the data module's ``predict_records()``. With several devices every rank writes
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
        cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        order = torch.argsort(cat["index"])
        records, _ = trainer.datamodule.predict_records()
        space = pl_module.embedding_space() if hasattr(pl_module, "embedding_space") else {}
        features = FeatureSet(
            cat["embedding"][order], cat["pid"][order], cat["camid"][order], cat["is_query"][order],
            [records[i].path for i in cat["index"][order].tolist()], space,
        )
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        self.written = features.save(path)
        print(f"wrote {len(features.paths)} embeddings of dim {features.features.shape[1]} to {self.written}")
