"""Feature files: embeddings of a split with their ids, camids, items and embedding-space record.

A feature file is a ``torch.save`` dictionary::

    {"format": "reid_lab.features/3", "features": (N, D) float32, "pids": (N,) int64,
     "camids": (N,) int64 or None, "is_query": (N,) bool, "modality": "image" | "text",
     "query_modality": "image" | "text" (optional),
     "items_utf8": (bytes,) uint8, "items_offsets": (N + 1,) int64  (image paths or caption texts),
     "space": {...}}

The items are one UTF-8 buffer with byte offsets (item ``i`` is ``items_utf8[offsets[i]:offsets[i + 1]]``):
two tensors load as fast as the features, where a list of 200k strings took 4x the tensor's load time to
unpickle.

``modality`` is what the gallery rows (and, without ``query_modality``, every row) hold; an evaluation split of
caption queries against an image gallery (text-to-person) has ``modality: image`` and ``query_modality: text``.

``space`` records which embedding space the vectors live in (see ``reid_lab.embedding.space``); searching
features of one space with queries of another is refused unless a compatibility claim says it is safe.
Version-2 files (``items`` as a list of strings) and version-1 files (``paths`` instead of ``items``, always
images with camids) still load. Files are written
atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from reid_lab.atomic import atomic_torch_save
from reid_lab.embedding.encoder import MODALITIES

FORMAT = "reid_lab.features/3"
READABLE_FORMATS = ("reid_lab.features/1", "reid_lab.features/2", FORMAT)


def encode_items(items: list[str]) -> tuple[Tensor, Tensor]:
    """``(utf8 bytes as a uint8 tensor, (N + 1,) int64 byte offsets)`` of a list of strings."""
    encoded = [item.encode("utf-8") for item in items]
    lengths = torch.tensor([0] + [len(b) for b in encoded], dtype=torch.int64)
    data = b"".join(encoded)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return buffer, torch.cumsum(lengths, 0)


def decode_items(buffer: Tensor, offsets: Tensor, path: Path) -> list[str]:
    """The strings of :func:`encode_items`; ``path`` names the file in errors."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{path}: items_utf8 must be a 1-d uint8 tensor and items_offsets a 1-d int64 tensor, got "
                         f"{buffer.dtype} {tuple(buffer.shape)} and {offsets.dtype} {tuple(offsets.shape)}")
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != buffer.numel() or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{path}: items_offsets must rise from 0 to the {buffer.numel()} bytes of items_utf8")
    data = buffer.numpy().tobytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: items_utf8 is not UTF-8 ({error})") from None
    if len(text) == len(data):  # ASCII: byte offsets are character offsets, slice the one string
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return [data[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]


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
            "space": dict(self.space),
        }
        payload["items_utf8"], payload["items_offsets"] = encode_items(list(self.items))
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature file {path} does not exist")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path} is not a reid_lab feature file (expected format {FORMAT!r})")
        if "items_utf8" in payload:
            items = decode_items(payload["items_utf8"], payload["items_offsets"], path)
        else:
            items = payload["items"] if "items" in payload else payload["paths"]
        return cls(
            payload["features"], payload["pids"], payload["camids"], payload["is_query"], items,
            payload.get("space", {}), payload.get("modality", "image"), payload.get("query_modality"),
        )


PART_PATTERN = re.compile(r"^(?P<stem>.+)\.rank(?P<rank>\d+)-of-(?P<world>\d+)$")


def part_path(path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part of the feature file ``path``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.rank{rank}-of-{world_size}{p.suffix}")


def merge_feature_files(parts: list[str | Path]) -> FeatureSet:
    """One feature set from the per-rank parts of a distributed ``predict`` (``<stem>.rank<k>-of-<W>.pt``).

    Each rank embeds one contiguous block of the split (:mod:`reid_lab.data.shard`), so the parts concatenated in
    rank order are the split in its one-device order. Refused: a missing or repeated rank, parts of different
    runs (another stem or world size), and parts whose embedding space, modality or dimension differ.
    """
    if not parts:
        raise ValueError("no feature parts to merge")
    found: dict[int, Path] = {}
    stems, worlds = set(), set()
    for part in map(Path, parts):
        m = PART_PATTERN.match(part.stem)
        if m is None:
            raise ValueError(f"{part}: not a per-rank part (expected <stem>.rank<k>-of-<W>.pt)")
        rank, world = int(m["rank"]), int(m["world"])
        if rank in found:
            raise ValueError(f"{part}: rank {rank} given twice ({found[rank]})")
        found[rank] = part
        stems.add((part.parent, m["stem"]))
        worlds.add(world)
    if len(stems) != 1 or len(worlds) != 1:
        raise ValueError(f"parts of different runs: stems {sorted(str(s[1]) for s in stems)}, world sizes "
                         f"{sorted(worlds)}")
    world = worlds.pop()
    missing = sorted(set(range(world)) - set(found))
    if missing:
        raise ValueError(f"ranks {missing} of {world} are missing: a merge without them would silently drop items")
    sets = [FeatureSet.load(found[r]) for r in range(world)]
    first = sets[0]
    for r, fs in enumerate(sets[1:], start=1):
        for name in ("space", "modality", "query_modality"):
            if getattr(fs, name) != getattr(first, name):
                raise ValueError(f"{found[r]}: its {name} differs from rank 0's ({getattr(fs, name)!r} vs "
                                 f"{getattr(first, name)!r}): parts of different models or splits")
        if fs.features.shape[1] != first.features.shape[1]:
            raise ValueError(f"{found[r]}: {fs.features.shape[1]}-d features, rank 0 has {first.features.shape[1]}-d")
    camids = None if first.camids is None else torch.cat([fs.camids for fs in sets])
    return FeatureSet(torch.cat([fs.features for fs in sets]), torch.cat([fs.pids for fs in sets]), camids,
                      torch.cat([fs.is_query for fs in sets]), [i for fs in sets for i in fs.items],
                      dict(first.space), first.modality, first.query_modality)


class FeatureWriter(BasePredictionWriter):
    """Writes the predictions of ``reid-lab predict`` to one feature file.

    The module's ``predict_step`` returns ``embedding``, ``pid``, ``index``, ``is_query``, ``camid`` (when
    the data has cameras) and ``modality``; the items (image paths or captions) come from the data module's
    ``predict_records()``. With several devices every rank writes its own part
    (``<stem>.rank<k>-of-<W>.pt``, one contiguous block of the split each) and rank 0 then merges them into the
    asked-for file, checked item by item against the data module's order (:func:`merge_feature_files`; the
    parts stay, for a merge by hand when ranks ran on machines without a shared disk).

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
        if trainer.world_size == 1:
            self.written = features.save(path)
            print(f"wrote {len(features.items)} {modality} embeddings of dim {features.features.shape[1]} to "
                  f"{self.written}")
            return
        part = features.save(part_path(path, trainer.global_rank, trainer.world_size))
        print(f"rank {trainer.global_rank}: wrote {len(features.items)} {modality} embeddings to {part}")
        trainer.strategy.barrier("feature_parts")
        if trainer.global_rank == 0:
            merged = merge_feature_files([part_path(path, r, trainer.world_size) for r in range(trainer.world_size)])
            expected = [getattr(r, "path", None) or getattr(r, "text", "") for r in records]
            if merged.items != expected:
                raise RuntimeError(f"the merged parts of {path} are not the split in its order ({len(merged.items)} "
                                   f"items, {len(expected)} expected): was the predict loader sharded contiguously?")
            self.written = merged.save(path)
            print(f"merged {trainer.world_size} parts: {len(merged.items)} {modality} embeddings to {self.written}")
        trainer.strategy.barrier("feature_merge")
