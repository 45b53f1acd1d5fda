"""``PairDataModule``: instruction pairs (:mod:`reid_lab.data.pairs`) for VLM2Vec-style training and MMEB-style
evaluation.

Batch contract (train, val and test alike)::

    {"query":     {"instruction": [B str], "text": [B str or None], "image": (B, 3, H, W), "has_image": (B,) bool},
     "target":    {... the same, B items},
     "negatives": {... the same, B * K items: the K hard negatives of pair 0, then of pair 1, ...},
     "pid": (B,) int64, "index": (B,) int64}

Items without an image carry a zero image and ``has_image`` False; ``negatives`` is absent when the pairs have
none (K = 0). Every pair of a file has the same number of negatives K (checked). Evaluation (val / test) scores
each query against its target and its K negatives: MMEB's Precision@1 over a candidate list, chance 1 / (K + 1).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from reid_lab.data.datamodule import ValidationSource
from reid_lab.data.pairs import Item, PairRecord, load_pairs
from reid_lab.data.shard import sequential_batches, world
from reid_lab.data.transforms import build_test_transform, build_train_transform


class PairDataset(Dataset):
    """Pairs as item dicts, images read and transformed."""

    def __init__(self, records: list[PairRecord], transform, image_size: tuple[int, int]) -> None:
        self.records = records
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, item: Item) -> dict[str, Any]:
        if item.image is not None:
            with Image.open(item.image) as img:
                image = self.transform(img.convert("RGB"))
        else:
            image = torch.zeros(3, *self.image_size)
        return {"instruction": item.instruction, "text": item.text, "image": image,
                "has_image": item.image is not None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {"query": self._item(r.query), "target": self._item(r.target),
                "negatives": [self._item(n) for n in r.negatives], "pid": r.pid, "index": index}


def _side(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"instruction": [i["instruction"] for i in items], "text": [i["text"] for i in items],
            "image": torch.stack([i["image"] for i in items]),
            "has_image": torch.tensor([i["has_image"] for i in items], dtype=torch.bool)}


def collate_pairs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of :class:`PairDataset` rows into the batch of the module docstring."""
    batch = {"query": _side([r["query"] for r in rows]), "target": _side([r["target"] for r in rows]),
             "pid": torch.tensor([r["pid"] for r in rows], dtype=torch.long),
             "index": torch.tensor([r["index"] for r in rows], dtype=torch.long)}
    negatives = [n for r in rows for n in r["negatives"]]
    if negatives:
        batch["negatives"] = _side(negatives)
    return batch


class PairDataModule(L.LightningDataModule):
    """Instruction pairs from JSON-lines files.

    Args:
        train_pairs / val_pairs / test_pairs: pairs files (:func:`~reid_lab.data.pairs.load_pairs`); val
            defaults to test.
        image_root: folder the image paths are relative to (default: each file's folder).
        image_size: ``(height, width)`` images are resized to (the VLM's processor resizes them again).
        batch_size / eval_batch_size / num_workers / seed: loaders.
        flip_prob / padding / random_erasing_prob: training augmentation of images.
    """

    eval_protocol = "pairs"  # Precision@1 over each pair's target and negatives

    def __init__(self, train_pairs: str, val_pairs: str | None = None, test_pairs: str | None = None,
                 image_root: str | None = None, image_size: tuple[int, int] = (96, 48), batch_size: int = 32,
                 eval_batch_size: int = 64, num_workers: int = 2, seed: int = 0, flip_prob: float = 0.5,
                 padding: int = 6, random_erasing_prob: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_size = tuple(int(s) for s in image_size)
        self.train_transform = build_train_transform(self.image_size, flip_prob=flip_prob, padding=padding,
                                                     random_erasing_prob=random_erasing_prob)
        self.test_transform = build_test_transform(self.image_size)
        self._records: dict[str, list[PairRecord]] = {}

    def records(self, split: str) -> list[PairRecord]:
        """The pairs of ``train``, ``val`` or ``test`` (loaded and checked once)."""
        if split not in self._records:
            hp = self.hparams
            path = {"train": hp.train_pairs, "val": hp.val_pairs or hp.test_pairs, "test": hp.test_pairs}[split]
            if path is None:
                raise ValueError(f"PairDataModule has no {split} pairs file (set {split}_pairs)")
            records = load_pairs(path, hp.image_root)
            counts = {len(r.negatives) for r in records}
            if len(counts) > 1:
                raise ValueError(f"{path}: every pair needs the same number of negatives, found {sorted(counts)}")
            self._records[split] = records
        return self._records[split]

    def validation_source(self) -> ValidationSource:
        """What validation scores: the val pairs file, or the test pairs when none is given."""
        hp = self.hparams
        if hp.val_pairs and hp.val_pairs != hp.test_pairs:
            return ValidationSource(False, f"the pairs of {hp.val_pairs}")
        return ValidationSource(True, f"the test pairs ({hp.test_pairs})")

    @property
    def num_classes(self) -> int:
        """Identities of the training pairs (pids >= 0); unused by the contrastive losses."""
        return len({r.pid for r in self.records("train") if r.pid >= 0})

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = PairDataset(self.records(split), self.train_transform if train else self.test_transform,
                              self.image_size)
        workers = {"collate_fn": collate_pairs, "num_workers": self.hparams.num_workers,
                   "persistent_workers": self.hparams.num_workers > 0}
        if not train:  # under DDP each rank reads one contiguous block of batches (reid_lab.data.shard)
            return DataLoader(dataset, batch_sampler=sequential_batches(len(dataset), self.hparams.eval_batch_size),
                              **workers)
        rank, world_size = world()
        if world_size > 1:  # disjoint pairs per rank, reshuffled per epoch (Lightning calls set_epoch)
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                         seed=self.hparams.seed, drop_last=True)
            return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=True, **workers)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          generator=generator, **workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
