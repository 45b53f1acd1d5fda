"""MMEB's evaluation layout (Jiang et al., VLM2Vec, ICLR 2025): per subset, queries with their own candidate lists.

What the official code reads (TIGER-AI-Lab/VLM2Vec, V1 ``eval.py`` + ``src/dataset.py::EvalDataset``): the
Hugging Face dataset ``TIGER-Lab/MMEB-eval``, one config per subset (``ImageNet-1K``, ``OK-VQA``, ...), split
``test`` (parquet, ``<subset>/test-*.parquet``); one row per query::

    {"qry_text": "<|image_1|>\\nRepresent the given image for classification",   # str ("" for none)
     "qry_img_path": "ImageNet-1K/n01440764_10026.JPEG",                       # str ("" for none)
     "tgt_text": ["tench", "goldfish", ...],                                   # list of K str, positive FIRST
     "tgt_img_path": ["", "", ...]}                                            # list of K str ("" for none)

Image paths are relative to ``--image_dir`` (the unzipped ``images.zip`` of the dataset, ``eval_images/`` in
the official scripts). ``<|image_1|>`` is Phi-3-V's image placeholder, rewritten per backbone. The official
score (``eval.py`` with ``evaluation/eval_utils.get_pred``): embed every distinct ``(text, img_path)`` of the
queries and of the targets once, score each row's K candidates by (cosine) similarity, ``pred = np.argmax``;
a hit when ``pred == 0``; per-subset accuracy = hits / rows. The headline numbers are Precision@1 averaged per
meta-task and, overall, the plain mean over the subsets (``docs/mmebv2_reproduction``: "all (plain mean over
datasets)").

Each subset is read from the dataset's own parquet files as a snapshot of the Hugging Face repository lays
them out (``<root>/<subset>/<split>-*.parquet``, or ``<root>/<subset>/<split>/*.parquet``; read with pyarrow,
in file-name order), or from a JSON-lines export with the same rows and field names at
``<root>/<subset>/<split>.jsonl`` (which wins when both are there)::

    huggingface-cli download TIGER-Lab/MMEB-eval --repo-type dataset --local-dir mmeb     # the parquet files
    python -c "from datasets import load_dataset as L; [L('TIGER-Lab/MMEB-eval', s, split='test')
               .to_json(f'mmeb/{s}/test.jsonl') for s in ['ImageNet-1K', 'OK-VQA']]"       # or JSON lines
    unzip mmeb/images.zip -d mmeb/eval_images

Differences to the official encoding, stated: the ``<|image_1|>`` placeholder (and the newline after it) is
removed from the text and the image goes first, as :meth:`~reid_lab.models.vlm.VLMEncoder.embed_items` lays
every item out (MMEB's texts put the placeholder first). The tie rule: ``np.argmax`` returns the first maximum
and the positive is column 0, so MMEB counts a tie between the positive and the best negative as a **hit**;
reid_lab counts it as a **miss** (:func:`~reid_lab.metrics.candidates.list_hits`, ``ties="strict"``) and
prints how many queries tied, with MMEB's number beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from reid_lab.data.datamodule import ValidationSource
from reid_lab.data.pair_datamodule import PairDataset, _side
from reid_lab.data.pairs import Item
from reid_lab.data.paths import confined_path
from reid_lab.data.shard import sequential_batches
from reid_lab.data.transforms import build_test_transform

IMAGE_PLACEHOLDER = "<|image_1|>"
ROW_KEYS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

# MMEB-V1's 36 subsets and their meta-tasks (VLM2Vec paper Table 1; V1 eval scripts' subset lists).
META_TASKS: dict[str, str] = {
    **{s: "classification" for s in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                                     "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{s: "vqa" for s in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA",
                          "VizWiz", "GQA", "TextVQA")},
    **{s: "retrieval" for s in ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                                "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    **{s: "visual_grounding" for s in ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}


class MMEBFormatError(ValueError):
    """An MMEB subset file that does not follow the layout (the message names file, line and key)."""


@dataclass(frozen=True)
class MMEBSubset:
    """One subset: its distinct items and, per query row, indices into them.

    Attributes:
        name / meta_task: e.g. ``ImageNet-1K`` / ``classification``.
        items: the distinct ``(text, image)`` items of the queries and candidates (each embedded once).
        queries: ``(Q,)`` int64 item index of each row's query.
        candidates: ``(Q, K)`` int64 item indices, the positive in column 0, ``-1`` padding where a row has
            fewer than ``K`` candidates.
    """

    name: str
    meta_task: str
    items: tuple[Item, ...]
    queries: Tensor
    candidates: Tensor


def _item(text: str, image: str, where: str, image_root: Path, check_files: bool) -> Item:
    text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    if not text.strip() and not image:
        raise MMEBFormatError(f"{where}: neither a text nor an image path; an MMEB item needs one")
    path = None
    if image:
        path = confined_path(image_root, image, where, MMEBFormatError)
        if check_files and not os.path.isfile(path):
            raise MMEBFormatError(f"{where}: image {path} does not exist (image_root {image_root})")
    return Item(instruction="", text=text if text.strip() else None, image=path)


def _string(value: Any, where: str) -> str:
    if value is None:  # the parquet export writes a missing image as null
        return ""
    if not isinstance(value, str):
        raise MMEBFormatError(f"{where}: expected a string, got {type(value).__name__} {json.dumps(value)[:40]}")
    return value


def load_mmeb_subset(root: str | Path, name: str, split: str = "test", image_root: str | Path | None = None,
                     meta_task: str | None = None, check_files: bool = True,
                     max_queries: int | None = None) -> MMEBSubset:
    """Read ``<root>/<name>/<split>.jsonl`` or the subset's parquet files (module docstring), images under
    ``image_root`` (default ``<root>/eval_images``).

    Raises:
        FileNotFoundError: neither form is there.
        MMEBFormatError: a malformed row, named ``file:line`` (``file:row n`` for parquet) and key: not JSON, a
            missing key or column, a non-list
            ``tgt_text`` / ``tgt_img_path`` or lists of different lengths, an empty candidate list, an item with
            neither text nor image, an image outside ``image_root`` or missing; or no rows at all.
        ValueError: a subset with no known meta-task and none given.
    """
    root = Path(root)
    path = root / name / f"{split}.jsonl"
    parquet = sorted((root / name).glob(f"{split}-*.parquet")) + sorted((root / name / split).glob("*.parquet"))
    if not path.is_file() and not parquet:
        raise FileNotFoundError(f"MMEB subset {name!r}: neither {path} nor {root / name / split}-*.parquet exists")
    source = str(path) if path.is_file() else ", ".join(str(p) for p in parquet)
    task = meta_task or META_TASKS.get(name)
    if task is None:
        raise ValueError(f"MMEB subset {name!r} has no known meta-task: give it in meta_tasks "
                         f"(classification, vqa, retrieval or visual_grounding)")
    image_root = Path(image_root) if image_root is not None else root / "eval_images"
    index: dict[tuple[str, str], int] = {}
    items: list[Item] = []

    def item_index(text: str, image: str, where: str) -> int:
        key = (text, image)  # VLM2Vec's dedup key: the raw (text, img_path)
        if key not in index:
            index[key] = len(items)
            items.append(_item(text, image, where, image_root, check_files))
        return index[key]

    queries: list[int] = []
    rows: list[list[int]] = []
    for where, row in (_jsonl_rows(path) if path.is_file() else _parquet_rows(parquet)):
        if max_queries is not None and len(queries) >= max_queries:
            break
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise MMEBFormatError(f"{where}: missing {missing}; an MMEB row has {', '.join(ROW_KEYS)}")
        texts, images = row["tgt_text"], row["tgt_img_path"]
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images) or not texts:
            raise MMEBFormatError(f"{where}: tgt_text and tgt_img_path must be non-empty lists of one length (the "
                                  f"candidates, positive first), got {type(texts).__name__} of "
                                  f"{len(texts) if isinstance(texts, list) else '?'} and {type(images).__name__} "
                                  f"of {len(images) if isinstance(images, list) else '?'}")
        queries.append(item_index(_string(row["qry_text"], f"{where}: qry_text"),
                                  _string(row["qry_img_path"], f"{where}: qry_img_path"), f"{where}: query"))
        rows.append([item_index(_string(t, f"{where}: tgt_text[{k}]"), _string(i, f"{where}: tgt_img_path[{k}]"),
                                f"{where}: candidate {k}") for k, (t, i) in enumerate(zip(texts, images))])
    if not rows:
        raise MMEBFormatError(f"{source}: no rows")
    width = max(len(r) for r in rows)
    candidates = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        candidates[i, :len(r)] = torch.tensor(r)
    return MMEBSubset(name, task, tuple(items), torch.tensor(queries, dtype=torch.long), candidates)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(file:line, row)`` of a JSON-lines export, blank lines skipped."""
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MMEBFormatError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(row, Mapping):
            raise MMEBFormatError(f"{where}: expected a JSON object per line")
        yield where, row


def _parquet_rows(paths: list[Path]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(file:row n, row)`` of the parquet files in order (rows counted from 1 per file), the four
    :data:`ROW_KEYS` columns only; a file without one of them is refused naming it."""
    import pyarrow.parquet as pq  # only MMEB's parquet layout needs it

    for path in paths:
        try:
            table = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants for a damaged file
            raise MMEBFormatError(f"{path}: not a readable parquet file ({err})") from None
        missing = [k for k in ROW_KEYS if k not in table.schema_arrow.names]
        if missing:
            raise MMEBFormatError(f"{path}: missing column(s) {missing}; an MMEB row has {', '.join(ROW_KEYS)}")
        number = 0
        for batch in table.iter_batches(columns=list(ROW_KEYS), batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row


class MMEBItemDataset(Dataset):
    """The distinct items of several subsets, one global index: ``{"item": item dict, "index": int}``."""

    def __init__(self, items: list[Item], transform, image_size: tuple[int, int]) -> None:
        self.items = PairDataset([], transform, image_size)
        self.records = items

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"item": self.items._item(self.records[index]), "index": index}


def collate_items(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"mmeb_items": {instruction, text, image (B, 3, H, W), has_image}, "index": (B,) int64}``."""
    return {"mmeb_items": _side([r["item"] for r in rows]),
            "index": torch.tensor([r["index"] for r in rows], dtype=torch.long)}


class MMEBDataModule(L.LightningDataModule):
    """MMEB evaluation: the distinct items of every subset, embedded once, scored per subset by the module.

    Test (and validate) batches are :func:`collate_items` batches over :attr:`items` (every subset's items, one
    global index); :meth:`subsets` gives each subset's query and candidate indices into that index.

    Args:
        root: folder of ``<subset>/<split>.jsonl`` files (module docstring).
        subsets: subset names, e.g. ``[ImageNet-1K, OK-VQA, MSCOCO_t2i, RefCOCO]``.
        split: file stem (``test``).
        image_root: folder the image paths are relative to (default ``<root>/eval_images``).
        meta_tasks: meta-task of subsets that MMEB-V1 does not list (or to override it).
        max_queries: keep the first N rows of each subset (a quick run; not MMEB's number).
        image_size: ``(height, width)`` images are resized to before the VLM's processor.
        eval_batch_size / num_workers: loader.
    """

    eval_protocol = "mmeb"

    def __init__(self, root: str, subsets: list[str], split: str = "test", image_root: str | None = None,
                 meta_tasks: dict[str, str] | None = None, max_queries: int | None = None,
                 image_size: tuple[int, int] = (224, 224), eval_batch_size: int = 16, num_workers: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not subsets:
            raise ValueError("MMEBDataModule needs at least one subset")
        self.image_size = tuple(int(s) for s in image_size)
        self.test_transform = build_test_transform(self.image_size)
        self._subsets: list[MMEBSubset] | None = None
        self._offsets: list[int] = []

    def subsets(self) -> list[tuple[MMEBSubset, int]]:
        """``[(subset, offset of its items in the global index)]``, loaded and checked once."""
        if self._subsets is None:
            hp = self.hparams
            self._subsets = [load_mmeb_subset(hp.root, name, hp.split, hp.image_root, (hp.meta_tasks or {}).get(name),
                                              max_queries=hp.max_queries) for name in hp.subsets]
            self._offsets = [0]
            for s in self._subsets[:-1]:
                self._offsets.append(self._offsets[-1] + len(s.items))
        return list(zip(self._subsets, self._offsets))

    @property
    def items(self) -> list[Item]:
        return [item for subset, _ in self.subsets() for item in subset.items]

    def validation_source(self) -> ValidationSource:
        """Validation scores the same MMEB subsets (MMEB is evaluation only: no checkpoint is chosen on it)."""
        return ValidationSource(True, f"MMEB {self.hparams.split} subsets {', '.join(self.hparams.subsets)}")

    def _loader(self) -> DataLoader:
        dataset = MMEBItemDataset(self.items, self.test_transform, self.image_size)
        # under DDP each rank embeds one contiguous block of items (reid_lab.data.shard); the module gathers them
        return DataLoader(dataset, batch_sampler=sequential_batches(len(dataset), self.hparams.eval_batch_size),
                          collate_fn=collate_items, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
