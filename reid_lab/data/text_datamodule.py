"""The LightningDataModule for text-to-person retrieval: image–caption pairs sampled PK-style over identities for
training, and one evaluation loader of caption queries followed by gallery images.

Batch contract:

* training: ``{"image": (B, 3, H, W) float32, "text": (B, L) int64, "pid": (B,) int64, "index": (B,) int64}``:
  ``index`` is the image's position in :attr:`TextImageDataModule.train_records`; the caption is one of that
  image's captions, drawn per image and epoch from ``(seed, epoch)``; with ``captions_per_image: all`` every
  caption is its own training pair (IRRA's recipe), so an epoch visits each caption once. With
  ``num_instances`` K > 0 each batch holds ``batch_size / K`` identities with K pairs each.
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
import warnings
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from reid_lab.data.datamodule import ValidationSource
from reid_lab.data.sampler import (
    PKBatchSampler,
    check_pk_identities,
    interleave_in_proportion,
    reads_a_prefix,
)
from reid_lab.data.shard import ShardedBatchSampler
from reid_lab.data.subset import select_subset
from reid_lab.data.text.datasets import (
    CaptionPairBatchSampler,
    CaptionPairDataset,
    EveryCaptionBatchSampler,
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
from reid_lab.data.text.tokenizers import (
    CaptionTokenizer,
    OpenCLIPTokenizer,
    caption_token_lengths,
    truncated_share,
)
from reid_lab.data.transforms import build_test_transform, build_train_transform
from reid_lab.data.views import TrainingSetView

TextDataset = Literal["cuhkpedes", "icfgpedes", "rstpreid", "synthetic"]
EvalRecord = CaptionQuery | CaptionedImage
TRUNCATION_WARN_SHARE = 0.02  # above this share of cut captions setup warns: the context length is too short


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
        num_instances: K, training pairs per identity in a batch; 0: plain shuffled batches.
        captions_per_image: ``one``: each epoch pairs every training image with one of its captions (drawn per
            epoch); ``all``: every caption is a training pair of its image (IRRA), so an image with two
            captions appears twice per epoch.
        eval_batch_size: batch size of the evaluation and prediction loaders.
        num_workers: data-loading worker processes.
        tokenizer: a :class:`~reid_lab.data.text.CaptionTokenizer` (``class_path`` / ``init_args`` in a config);
            None: open_clip's ``SimpleTokenizer``.
        context_length: token ids per caption (the text tower's context length); applies to every call of the
            tokenizer, whatever its own default. ``setup`` prints the share of captions it cuts and warns above
            2 %.
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
        captions_per_image: Literal["one", "all"] = "one",
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
        if captions_per_image not in ("one", "all"):
            raise ValueError(f"captions_per_image must be 'one' (one caption per image and epoch) or 'all' (every "
                             f"caption a training pair), got {captions_per_image!r}")
        if int(context_length) < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.dataset = dataset
        self.root = root
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.image_size = tuple(int(s) for s in image_size)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.captions_per_image = captions_per_image
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
        self._coverage: dict[str, tuple[float, int, int]] = {}

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

    # ------------------------------------------------------------------------------------ caption coverage
    def caption_coverage(self, captions: list[str]) -> tuple[float, int, int]:
        """``(share cut at context_length, number of captions, longest caption in ids)`` of ``captions``, as the
        configured tokenizer makes them (see :func:`~reid_lab.data.text.tokenizers.caption_token_lengths`)."""
        lengths = caption_token_lengths(self.tokenizer, captions, probe_length=max(128, 2 * self.context_length))
        return truncated_share(lengths, self.context_length), len(captions), int(lengths.max(initial=0))

    def setup(self, stage: str | None = None) -> None:
        """Print the share of the captions ``stage`` reads that ``context_length`` cuts (each split measured
        once), and warn above 2 %: a cut caption loses its end, and with it what tells people apart."""
        stage = stage or "fit"
        parts: dict[str, list[str]] = {}
        if stage == "fit":
            parts["train"] = [c for r in self.train_records for c in r.captions]
        if stage in ("fit", "validate", "test"):
            held_out = stage != "test" and self.val_subset is not None
            records, is_query = self.eval_records(stage)
            parts["held-out" if held_out else self.split_for(stage)] = \
                [r.text for r, query in zip(records, is_query, strict=True) if query]
        for name, captions in parts.items():
            if name not in self._coverage:
                self._coverage[name] = self.caption_coverage(captions)
        if not parts or rank_zero_only.rank != 0:
            return
        shares = " / ".join(f"{100 * self._coverage[n][0]:.1f} % of {self._coverage[n][1]} {n}" for n in parts)
        longest = max(self._coverage[n][2] for n in parts)
        message = (f"captions: {shares} captions truncated at context_length {self.context_length} "
                   f"(longest {longest} tokens)")
        print(message, flush=True)
        cut = [n for n in parts if self._coverage[n][0] > TRUNCATION_WARN_SHARE]
        if cut:
            warnings.warn(f"{message}: more than {100 * TRUNCATION_WARN_SHARE:g} % of the {' and '.join(cut)} "
                          f"captions lose their end; raise data.init_args.context_length (and the text tower's) "
                          f"to {longest}", UserWarning, stacklevel=2)

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
        # the units the identity sampler draws: images (one caption drawn per epoch) or (image, caption) pairs
        pairs = [(i, c) for i, r in enumerate(records) for c in range(len(r.captions))] \
            if self.captions_per_image == "all" else None
        pids = [records[i].pid for i, _ in pairs] if pairs is not None else [r.pid for r in records]
        if self.num_instances > 0:
            identities = PKBatchSampler(pids, batch_size=self.batch_size, num_instances=self.num_instances,
                                        seed=self.seed, num_replicas=world, rank=rank)
        else:
            identities = RandomBatchSampler(len(pids), self.batch_size, self.seed, world, rank)
        if pairs is not None:
            sampler = EveryCaptionBatchSampler(identities, pairs)
        else:
            sampler = CaptionPairBatchSampler(identities, [len(r.captions) for r in records], seed=self.seed)
        dataset = CaptionPairDataset(records, self.train_transform, self._tokenize_fn())
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def check_pk_sampling(self, option_prefix: str = "") -> None:
        """Refuse PK batches this training set cannot fill (P = batch_size / num_instances identities), before
        anything trains: ``reid-lab fit`` calls it before its Trainer, logger or run folder exist.

        Raises:
            TooFewIdentities: one line naming the identity count and the options to change.
        """
        check_pk_identities(len({r.pid for r in self.train_records}), self.batch_size, self.num_instances,
                            where=f"the {self.dataset} training set ({self.root})", option_prefix=option_prefix)

    def _query_gallery_loader(self, records: list[EvalRecord], is_query: list[bool],
                              interleave: bool = False) -> DataLoader:
        """Caption batches, then image batches; ``interleave``: the two kinds of batch alternate in proportion
        (:func:`~reid_lab.data.sampler.interleave_in_proportion`), so a prefix (``limit_val_batches``) holds
        both."""
        num_query = sum(is_query)
        dataset = QueryGalleryDataset(
            records[:num_query], records[num_query:], self.test_transform, self._tokenize_fn(),
            with_camids=self.splits.has_cameras,
        )
        sampler = QueryGalleryBatchSampler(num_query, len(records) - num_query, self.eval_batch_size)
        if interleave:  # a batch holds captions or images, never both: interleave whole batches
            batches = list(sampler)
            split = sum(1 for b in batches if b and b[0] < num_query)
            sampler = interleave_in_proportion(batches[:split], batches[split:])
        # under DDP each rank reads one contiguous block of batches (reid_lab.data.shard)
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(sampler), **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._query_gallery_loader(*self.eval_records("validate"),
                                          interleave=reads_a_prefix(self.trainer, validation=True))

    def test_dataloader(self) -> DataLoader:
        return self._query_gallery_loader(*self.eval_records("test"),
                                          interleave=reads_a_prefix(self.trainer, validation=False))

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

