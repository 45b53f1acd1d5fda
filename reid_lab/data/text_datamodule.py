"""The LightningDataModule for text-to-person retrieval: image–caption pairs sampled PK-style over identities for
training, and one evaluation loader of caption queries followed by gallery images.

Batch contract:

* training: ``{"image": (B, 3, H, W) float32, "text": (B, L) int64, "pid": (B,) int64, "index": (B,) int64}``:
  ``index`` is the image's position in :attr:`TextImageDataModule.train_records`; the caption is one of that
  image's captions, drawn per image and epoch from ``(seed, epoch)``. With ``num_instances`` K > 0 each batch
  holds ``batch_size / K`` identities with K images each.
* evaluation (val / test, one loader): first the query batches ``{"text": (B, L) int64, "pid", "index",
  "is_query": (B,) bool all True}``, one row per caption of the split, then the gallery batches ``{"image",
  "pid", "index", "is_query": (B,) bool all False}`` plus ``"camid"`` ``(B,)`` int64 where the dataset knows its
  cameras; no batch mixes the two. ``index`` is the position in :meth:`TextImageDataModule.eval_records`.
* predict: the captions (``predict_modality: text``) or the images (``image``) of ``predict_split``, batched as
  in evaluation; ``index`` is the position in :meth:`TextImageDataModule.predict_records`.

Pids: train labels ``0 .. num_classes - 1``; val / test pids as stored in the annotation file.
"""

from __future__ import annotations

import functools
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from reid_lab.data.datamodule import ValidationSource
from reid_lab.data.sampler import PKBatchSampler
from reid_lab.data.shard import ShardedBatchSampler
from reid_lab.data.subset import select_subset
from reid_lab.data.text.datasets import (
    CaptionPairBatchSampler,
    CaptionPairDataset,
    QueryGalleryBatchSampler,
    QueryGalleryDataset,
    RandomBatchSampler,
    draw_captions,
)
from reid_lab.data.text.parsers import load_text_dataset
from reid_lab.data.text.records import (
    CaptionedImage,
    CaptionQuery,
    TextReIDSplits,
    caption_queries,
    relabel_captioned,
)
from reid_lab.data.text.tokenizers import CaptionTokenizer, OpenCLIPTokenizer
from reid_lab.data.transforms import build_test_transform, build_train_transform
from reid_lab.data.views import TrainingSetView

TextDataset = Literal["cuhkpedes", "icfgpedes", "rstpreid", "synthetic"]
EvalRecord = CaptionQuery | CaptionedImage


class TextImageDataModule(L.LightningDataModule):
    """Text-to-person data: ``dataset`` parsed from ``root``, captions tokenized to ``context_length``.

    Args:
        dataset: ``cuhkpedes``, ``icfgpedes``, ``rstpreid`` or ``synthetic`` (see :mod:`reid_lab.data.text.parsers`).
        root: the dataset folder or a parent holding it under its conventional name.
        train_subset: optional JSON file naming the training images to use (an upgrade split's ``old.json`` /
            ``new.json``); their pids are relabelled ``0 .. N - 1`` again. The upgrade host matches classes
            to an old model's by the images' shared ids in the whole training split.
        image_size: ``(height, width)`` of the network input (ReID sizes such as ``[256, 128]``).
        batch_size: training pairs per batch on one device (P x K).
        num_instances: K, images (each with one caption) per identity in a training batch; 0: plain shuffled
            batches.
        eval_batch_size: batch size of the evaluation and prediction loaders.
        num_workers: data-loading worker processes.
        tokenizer: a :class:`~reid_lab.data.text.CaptionTokenizer` (``class_path`` / ``init_args`` in a config);
            None: open_clip's ``SimpleTokenizer``.
        context_length: token ids per caption (the text tower's context length); applies to every call of the
            tokenizer, whatever its own default.
        flip_prob / padding / random_erasing_prob: training augmentation (see
            :func:`~reid_lab.data.transforms.build_train_transform`).
        val_subset: optional JSON file naming training images held out for validation (written by a study, see
            :mod:`reid_lab.data.validation`): they leave training, and validation ranks their captions against
            them; it replaces ``val_split``.
        val_split: the split validation ranks without ``val_subset``: ``val``, ``test``, or ``auto`` (``val`` when
            the dataset has one, else ``test``, as IRRA does for ICFG-PEDES).
        predict_split: the split ``predict`` embeds (``test``, ``val`` or ``train``).
        predict_modality: ``text`` (the split's captions) or ``image`` (its images).
        seed: seed of the identity sampler and of the per-epoch caption draw.
        check_files: fail at parse time when an annotated image file does not exist.
    """

    def __init__(
        self,
        dataset: TextDataset = "synthetic",
        root: str = "data/synthetic",
        train_subset: str | None = None,
        val_subset: str | None = None,
        image_size: tuple[int, int] = (256, 128),
        batch_size: int = 64,
        num_instances: int = 4,
        eval_batch_size: int = 128,
        num_workers: int = 4,
        tokenizer: CaptionTokenizer | None = None,
        context_length: int = 77,
        flip_prob: float = 0.5,
        padding: int = 10,
        random_erasing_prob: float = 0.5,
        val_split: Literal["auto", "val", "test"] = "auto",
        predict_split: Literal["test", "val", "train"] = "test",
        predict_modality: Literal["text", "image"] = "text",
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        super().__init__()
        # Checkpoints are read with weights_only=True: keep the tokenizer as a plain description.
        self.save_hyperparameters(ignore=["tokenizer"])
        if predict_modality not in ("text", "image"):
            raise ValueError(f"predict_modality must be 'text' or 'image', got {predict_modality!r}")
        if val_split not in ("auto", "val", "test"):
            raise ValueError(f"val_split must be 'auto', 'val' or 'test', got {val_split!r}")
        if predict_split not in ("test", "val", "train"):
            raise ValueError(f"predict_split must be 'test', 'val' or 'train', got {predict_split!r}")
        if int(context_length) < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.dataset = dataset
        self.root = root
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.image_size = tuple(int(s) for s in image_size)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.context_length = int(context_length)
        self.val_split = val_split
        self.predict_split = predict_split
        self.predict_modality = predict_modality
        self.seed = seed
        self.check_files = check_files
        self.train_transform = build_train_transform(
            self.image_size, flip_prob=flip_prob, padding=padding, random_erasing_prob=random_erasing_prob
        )
        self.test_transform = build_test_transform(self.image_size)
        self._tokenizer = tokenizer
        if tokenizer is not None:
            self.hparams["tokenizer"] = tokenizer.spec()
        self._splits: TextReIDSplits | None = None
        self._train_records: list[CaptionedImage] | None = None

    # The evaluation loader's protocol (reid_lab.metrics.RetrievalMetric): caption queries, no camera filter.
    eval_protocol = "cross_modal"

    # ----------------------------------------------------------------------------------------- records
    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer (open_clip's ``SimpleTokenizer`` unless one was given)."""
        if self._tokenizer is None:
            self._tokenizer = OpenCLIPTokenizer(context_length=self.context_length)
            self.hparams["tokenizer"] = self._tokenizer.spec()
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """``(len(texts), context_length)`` int64 ids, as the loaders make them."""
        return self.tokenizer(texts, context_length=self.context_length)

    @property
    def splits(self) -> TextReIDSplits:
        """The parsed dataset (loaded on first access)."""
        if self._splits is None:
            self._splits = load_text_dataset(self.dataset, self.root, check_files=self.check_files)
        return self._splits

    @property
    def train_records(self) -> list[CaptionedImage]:
        """Training images with their captions (restricted to ``train_subset`` when one is given), pids
        relabelled ``0 .. num_classes - 1``."""
        if self._train_records is None:
            records = self.splits.train
            if self.train_subset is not None:
                records = select_subset(records, self.train_subset)
            if self.val_subset is not None:
                held_out = {r.path for r in self.val_records}
                overlap = held_out & {r.path for r in records} if self.train_subset is not None else set()
                if overlap:
                    raise ValueError(f"val_subset {self.val_subset} and train_subset {self.train_subset} share "
                                     f"{len(overlap)} image(s), e.g. {sorted(overlap)[0]!r}: validation images must "
                                     "not be trained on")
                records = [r for r in records if r.path not in held_out]
            if self.train_subset is not None or self.val_subset is not None:
                records = relabel_captioned(records)
            self._train_records = records
        return self._train_records

    @property
    def val_records(self) -> list[CaptionedImage]:
        """Training images held out for validation (``val_subset``); empty without one."""
        return select_subset(self.splits.train, self.val_subset) if self.val_subset is not None else []

    @property
    def num_classes(self) -> int:
        """Number of training identities (linked to the model's classifier by the CLI)."""
        return len({r.pid for r in self.train_records})

    def split_for(self, stage: str | None) -> str:
        """The split a stage ranks: ``validate`` / ``fit`` -> :attr:`val_split` (resolved), else ``test``."""
        if stage in ("validate", "fit", "val"):
            if self.val_split == "auto":
                return "val" if self.splits.val else "test"
            if self.val_split == "val" and not self.splits.val:
                raise ValueError(f"{self.splits.name} has no val split; set val_split: test (or auto)")
            return self.val_split
        return "test"

    def validation_source(self) -> ValidationSource:
        """What validation ranks: held-out training identities, the dataset's val split, or its test split."""
        name = self.splits.name
        if self.val_subset is not None:
            ids = len({r.pid for r in self.val_records})
            return ValidationSource(False, f"{ids} held-out training identities of {name} (val_subset "
                                           f"{self.val_subset}), their captions against their images")
        split = self.split_for("fit")
        images = self.splits.split(split)
        return ValidationSource(split == "test", f"the {split} split of {name} (captions of its {len(images)} "
                                                 "images against them)")

    def eval_records(self, stage: str | None = "test") -> tuple[list[EvalRecord], list[bool]]:
        """Caption queries then gallery images of ``stage``'s split, and the matching ``is_query`` flags.

        Queries are every caption of the split's images (image order, then caption order); the gallery is the
        split's images. A query's ``text`` and an image's ``path`` are the items of a feature file.
        """
        if stage in ("validate", "fit", "val") and self.val_subset is not None:
            images = self.val_records  # held-out training identities: every caption queries their images
        else:
            images = self.splits.split(self.split_for(stage))
        queries = caption_queries(images)
        return [*queries, *images], [True] * len(queries) + [False] * len(images)

    def predict_records(self) -> tuple[list[EvalRecord], list[bool]]:
        """What ``predict`` embeds: the captions (``is_query`` True) or images (False) of ``predict_split``."""
        images = self.splits.split(self.predict_split)
        if self.predict_modality == "text":
            queries = caption_queries(images)
            return list(queries), [True] * len(queries)
        return list(images), [False] * len(images)

    def captions_drawn(self, epoch: int) -> np.ndarray:
        """``(num train images,)``: the caption index each training image is paired with in ``epoch``."""
        return draw_captions([len(r.captions) for r in self.train_records], self.seed, epoch)

    # ------------------------------------------------------------------------------------- dataloaders
    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def _tokenize_fn(self):
        return functools.partial(self.tokenizer, context_length=self.context_length)

    def train_dataloader(self) -> DataLoader:
        records = self.train_records
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.num_instances > 0:
            identities = PKBatchSampler(
                [r.pid for r in records], batch_size=self.batch_size, num_instances=self.num_instances,
                seed=self.seed, num_replicas=world, rank=rank,
            )
        else:
            identities = RandomBatchSampler(len(records), self.batch_size, self.seed, world, rank)
        sampler = CaptionPairBatchSampler(identities, [len(r.captions) for r in records], seed=self.seed)
        dataset = CaptionPairDataset(records, self.train_transform, self._tokenize_fn())
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def _query_gallery_loader(self, records: list[EvalRecord], is_query: list[bool]) -> DataLoader:
        num_query = sum(is_query)
        dataset = QueryGalleryDataset(
            records[:num_query], records[num_query:], self.test_transform, self._tokenize_fn(),
            with_camids=self.splits.has_cameras,
        )
        sampler = QueryGalleryBatchSampler(num_query, len(records) - num_query, self.eval_batch_size)
        # under DDP each rank reads one contiguous block of batches (reid_lab.data.shard)
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(sampler), **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._query_gallery_loader(*self.eval_records("validate"))

    def test_dataloader(self) -> DataLoader:
        return self._query_gallery_loader(*self.eval_records("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._query_gallery_loader(*self.predict_records())

    def training_set_view(self) -> TrainingSetView:
        """The training images under the evaluation transform, for the upgrade host's class-level state.

        ``records`` are the training :class:`~reid_lab.data.text.CaptionedImage` (``path`` and relabelled
        ``pid``, as image records have); batches carry ``image``, ``pid``, ``index`` (and ``camid`` where known).
        """
        records = self.train_records
        dataset = QueryGalleryDataset([], records, self.test_transform, self._tokenize_fn(),
                                      with_camids=self.splits.has_cameras)

        def batches() -> DataLoader:
            return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

        return TrainingSetView(records=records, raw_records=list(self.splits.train), batches=batches,
                               modality="image")
