"""The LightningDataModule for ReID: a parsed dataset, PK-sampled training batches, and one evaluation loader
that yields query and gallery images together with their pids, camids and an ``is_query`` flag (every batch
holds both in proportion when the Trainer reads only a prefix of it: ``limit_val_batches`` then ranks a smaller
query set against a smaller gallery)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from reid_lab.data.datasets import load_dataset
from reid_lab.data.image_dataset import ImageDataset
from reid_lab.data.options import typed_options
from reid_lab.data.preflight import BadImagesError, check_images, describe_bad
from reid_lab.data.records import ImageRecord, ReIDSplits, relabel
from reid_lab.data.sampler import (
    PKBatchSampler,
    check_pk_identities,
    proportional_query_gallery_batches,
    reads_a_prefix,
)
from reid_lab.data.shard import ShardedBatchSampler, sequential_batches
from reid_lab.data.subset import select_subset
from reid_lab.data.transforms import build_test_transform, build_train_transform
from reid_lab.data.validation import carve_validation_ids, check_query_gallery, validation_query_gallery
from reid_lab.data.views import TrainingSetView

PredictSplit = Literal["test", "query", "gallery", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSource:
    """What a data module's validation loader ranks, as a run states it at its start.

    Attributes:
        is_test: True when it is the test split (so a checkpoint chosen on it is chosen on test data).
        description: e.g. ``"the test query / gallery of market1501"``.
    """

    is_test: bool
    description: str


class ReIDDataModule(L.LightningDataModule):
    """ReID data: ``dataset`` parsed from ``root``, BoT augmentation, PK sampling.

    Args:
        dataset: dataset name (``reid_lab.data.datasets.list_datasets()``: market1501, dukemtmc, msmt17,
            cuhk03np, veri776, folder, synthetic).
        root: folder holding the dataset (or the dataset folder itself).
        dataset_options: extra keyword arguments of the dataset's loader (e.g. ``{"variant": "labeled"}``
            for CUHK03-NP, ``{"camera_regex": ...}`` for folder data).
        train_subset: optional JSON file naming the training images to use (written by an upgrade scenario;
            ``{"paths": [...]}``). Pids of the subset are relabelled to ``0..N-1``.
        val_subset: optional JSON file naming training images held out for validation (``{"paths": [...]}``,
            written by a study; see :mod:`reid_lab.data.validation`): they leave training and ``val/*`` ranks
            their query / gallery instead of the test split's. Overlap with ``train_subset`` is an error.
        val_fraction: without ``val_subset``, hold out this share of the training identities (drawn with
            ``seed``) for validation; 0 (default) validates on the test query / gallery, as toolboxes do (the
            checkpoint callback then keeps the last epoch, see :mod:`reid_lab.modules.checkpointing`).
        image_size: ``(height, width)`` of the network input.
        batch_size: training batch size per device (P x K).
        num_instances: K, images per identity in a training batch (0 = plain random batches).
        eval_batch_size: batch size of the evaluation and prediction loaders.
        num_workers: data-loading worker processes.
        flip_prob / padding / random_erasing_prob / color_jitter / autoaugment_prob: BoT augmentation knobs
            (see :func:`~reid_lab.data.transforms.build_train_transform`).
        predict_split: which images ``predict`` embeds: ``test`` (query then gallery), ``query``,
            ``gallery`` or ``train``.
        seed: seed of the PK sampler's shuffles.
        check_images: before a stage starts (``setup``), decode every image it will read (fit: train, query
            and gallery) and fail naming every unreadable one (see :mod:`reid_lab.data.preflight`; cached by
            file stat, so later runs re-check only changed files).
        skip_bad_images: instead of failing, leave the unreadable images out, listing them in the log and in
            a report file. Training labels keep their numbering (the classifier size is unchanged).
    """

    def __init__(
        self,
        dataset: str = "market1501",
        root: str = "data",
        dataset_options: dict | None = None,
        train_subset: str | None = None,
        val_subset: str | None = None,
        val_fraction: float = 0.0,
        image_size: tuple[int, int] = (256, 128),
        batch_size: int = 64,
        num_instances: int = 4,
        eval_batch_size: int = 128,
        num_workers: int = 4,
        flip_prob: float = 0.5,
        padding: int = 10,
        random_erasing_prob: float = 0.5,
        color_jitter: float = 0.0,
        autoaugment_prob: float = 0.0,
        predict_split: PredictSplit = "test",
        seed: int = 0,
        check_images: bool = True,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = root
        self.dataset_options = typed_options(dataset_options)  # dotted CLI overrides arrive as strings
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.val_fraction = float(val_fraction)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self._val_records: list[ImageRecord] | None = None
        self.image_size = tuple(image_size)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.seed = seed
        self.check_images = check_images
        self.skip_bad_images = skip_bad_images
        self.train_transform = build_train_transform(
            self.image_size,
            flip_prob=flip_prob,
            padding=padding,
            random_erasing_prob=random_erasing_prob,
            color_jitter=color_jitter,
            autoaugment_prob=autoaugment_prob,
        )
        self.test_transform = build_test_transform(self.image_size)
        self._splits: ReIDSplits | None = None
        self._train_records: list[ImageRecord] | None = None
        self._skipped: dict[str, str] = {}  # absolute path -> why it cannot be read (skip_bad_images)

    # The evaluation loader's protocol (reid_lab.metrics.RetrievalMetric): image queries with camera ids.
    eval_protocol = "reid"

    # ----------------------------------------------------------------------------------------- records
    @property
    def splits(self) -> ReIDSplits:
        """The parsed dataset (loaded on first access; parsing reads file names only)."""
        if self._splits is None:
            self._splits = load_dataset(self.dataset, self.root, **self.dataset_options)
        return self._splits

    @property
    def all_train_records(self) -> list[ImageRecord]:
        """Training images, restricted to ``train_subset`` when one is given, pids relabelled ``0..N-1``."""
        if self._train_records is None:
            records = self.splits.train
            if self.train_subset is not None:
                records = select_subset(records, self.train_subset)
            held_out = {r.path for r in self.val_records}
            if self.val_subset is not None and self.train_subset is not None:
                overlap = held_out & {r.path for r in records}
                if overlap:
                    raise ValueError(f"val_subset {self.val_subset} and train_subset {self.train_subset} share "
                                     f"{len(overlap)} image(s), e.g. {sorted(overlap)[0]!r}: validation images must "
                                     "not be trained on")
            self._train_records = relabel([r for r in records if r.path not in held_out])
        return self._train_records

    @property
    def val_records(self) -> list[ImageRecord]:
        """Training images held out for validation (``val_subset`` or ``val_fraction``); empty: none."""
        if self._val_records is None:
            records: list[ImageRecord] = []
            if self.val_subset is not None:
                records = select_subset(self.splits.train, self.val_subset)
            elif self.val_fraction > 0:
                pool = self.splits.train
                if self.train_subset is not None:
                    pool = select_subset(pool, self.train_subset)
                held = carve_validation_ids([r.pid for r in pool], self.val_fraction, self.seed)
                records = [r for r in pool if r.pid in held]
            self._val_records = records
        return self._val_records

    @property
    def train_records(self) -> list[ImageRecord]:
        """The training images read for training: :attr:`all_train_records` less any skipped bad image."""
        return self._readable(self.all_train_records)

    @property
    def num_classes(self) -> int:
        """Number of training identities (linked to the model's classifier by the CLI)."""
        return len({r.pid for r in self.all_train_records})

    def _readable(self, records: list[ImageRecord]) -> list[ImageRecord]:
        if not self._skipped:
            return records
        return [r for r in records if os.path.abspath(r.path) not in self._skipped]

    @property
    def num_cameras(self) -> int:
        return self.splits.num_cameras

    def eval_records(self) -> tuple[list[ImageRecord], list[bool]]:
        """Query then gallery records of the test split and the matching ``is_query`` flags."""
        query, gallery = self._readable(self.splits.query), self._readable(self.splits.gallery)
        return query + gallery, [True] * len(query) + [False] * len(gallery)

    def val_eval_records(self) -> tuple[list[ImageRecord], list[bool]]:
        """What ``val/*`` ranks: the held-out training identities' query then gallery when there are any
        (:func:`~reid_lab.data.validation.validation_query_gallery`), else the test split's."""
        if not self.val_records:
            return self.eval_records()
        cameras_known = bool(self.splits.meta.get("cameras_known", True))
        query, gallery = validation_query_gallery(self._readable(self.val_records), cameras_known)
        check_query_gallery(query, gallery, f"{self.splits.name} validation ({len(self.val_records)} held-out "
                            "training images)", cameras_known)
        return query + gallery, [True] * len(query) + [False] * len(gallery)

    def check_evaluation_splits(self) -> None:
        """Build the validation and test query / gallery and refuse one that cannot be ranked (no gallery, a
        query without a positive), naming the split: a study runs this before anything trains."""
        self.val_eval_records()
        query, gallery = self._readable(self.splits.query), self._readable(self.splits.gallery)
        check_query_gallery(query, gallery, f"{self.splits.name} test",
                            bool(self.splits.meta.get("cameras_known", True)))

    def validation_source(self) -> ValidationSource:
        """What ``val/*`` ranks: the held-out training identities, or the test query / gallery."""
        held = self.val_records
        if not held:
            return ValidationSource(True, f"the test query / gallery of {self.splits.name}")
        how = (f"val_subset {self.val_subset}" if self.val_subset is not None
               else f"val_fraction {self.val_fraction:g}, seed {self.seed}")
        return ValidationSource(False, f"{len({r.pid for r in held})} held-out training identities of "
                                       f"{self.splits.name} ({how}), query / gallery by camera")

    # ------------------------------------------------------------------------------------- pre-flight
    def check_pk_sampling(self, option_prefix: str = "") -> None:
        """Refuse PK batches this training set cannot fill (P = batch_size / num_instances identities), before
        anything trains: ``reid-lab fit`` calls it before its Trainer, logger or run folder exist.

        Raises:
            TooFewIdentities: one line naming the identity count and ``{option_prefix}batch_size`` /
                ``{option_prefix}num_instances``.
        """
        check_pk_identities(len({r.pid for r in self.all_train_records}), self.batch_size, self.num_instances,
                            where=f"the {self.splits.name} training set ({self.root})", option_prefix=option_prefix)

    def setup(self, stage: str | None = None) -> None:
        if self.check_images:
            self.preflight(stage)

    def stage_records(self, stage: str | None) -> tuple[str, list[ImageRecord]]:
        """What a stage reads: fit: train + query + gallery; validate / test: query + gallery; predict: its split."""
        query_gallery = self.splits.query + self.splits.gallery
        if stage == "validate" and self.val_records:
            return "validation", self.val_records
        if stage in ("validate", "test"):
            return "query, gallery", query_gallery
        if stage == "predict":
            split = self.predict_split
            records = {"test": query_gallery, "train": self.all_train_records}.get(split)
            return split, records if records is not None else getattr(self.splits, split)
        if self.val_records:
            return "train, validation, query, gallery", self.all_train_records + self.val_records + query_gallery
        return "train, query, gallery", self.all_train_records + query_gallery

    def preflight(self, stage: str | None = None) -> dict[str, str]:
        """Decode every image ``stage`` will read; fail naming all bad ones, or skip them when asked.

        Returns:
            The bad images (path -> reason) that are now skipped; empty when every image is readable.

        Raises:
            BadImagesError: some images cannot be read and ``skip_bad_images`` is off.
        """
        what, records = self.stage_records(stage)
        dataset_dir = self.splits.meta.get("root") or os.path.commonpath([os.path.abspath(r.path) for r in records])
        bad, report = check_images([r.path for r in records], dataset_dir)
        if not bad:
            return {}
        listing = describe_bad(bad, report)
        if not self.skip_bad_images:
            raise BadImagesError(
                f"{self.splits.name}: {len(bad)} image(s) of the {what} split(s) cannot be read:\n{listing}\n"
                "Replace or remove them, or set skip_bad_images: true on the data module "
                "(--data.init_args.skip_bad_images=true) to leave them out (they are then logged and reported).",
                bad,
            )
        self._skipped.update(bad)
        logger.warning("%s: skipping %d unreadable image(s) (skip_bad_images: true):\n%s",
                       self.splits.name, len(bad), listing)
        kept = {r.pid for r in self.train_records}
        lost = sorted({r.pid for r in self.all_train_records} - kept)
        if lost:
            logger.warning("%s: training label(s) %s have no readable image left; their classifier rows stay "
                           "untrained", self.splits.name, lost)
        return bad

    # ------------------------------------------------------------------------------------- dataloaders
    def _loader_kwargs(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        dataset = ImageDataset(self.train_records, self.train_transform)
        if self.num_instances > 0:
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            sampler = PKBatchSampler(
                [r.pid for r in self.train_records],
                batch_size=self.batch_size,
                num_instances=self.num_instances,
                seed=self.seed,
                num_replicas=world,
                rank=rank,
            )
            return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator,
            **self._loader_kwargs(),
        )

    def _eval_loader(self, validation: bool = False) -> DataLoader:
        records, is_query = self.val_eval_records() if validation else self.eval_records()
        dataset = ImageDataset(records, self.test_transform, is_query=is_query)
        # under DDP each rank reads one contiguous block: no item is ranked twice (reid_lab.data.shard)
        if not reads_a_prefix(self.trainer, validation):
            return DataLoader(dataset, batch_sampler=sequential_batches(len(dataset), self.eval_batch_size),
                              **self._loader_kwargs())
        num_query = sum(is_query)  # a prefix of query-then-gallery batches would hold no gallery: mix them
        batches = proportional_query_gallery_batches(num_query, len(records) - num_query, self.eval_batch_size)
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(batches), **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(validation=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def training_set_view(self) -> TrainingSetView:
        """The training set under the evaluation transform, for the upgrade host's class-level state."""
        records = self.train_records
        dataset = ImageDataset(records, self.test_transform)

        def batches() -> DataLoader:
            return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

        return TrainingSetView(records=records, raw_records=list(self.splits.train), batches=batches)

    def predict_records(self) -> tuple[list[ImageRecord], list[bool]]:
        """The records ``predict`` embeds, per ``predict_split``."""
        if self.predict_split == "test":
            return self.eval_records()
        if self.predict_split == "train":
            return self.train_records, [False] * len(self.train_records)
        if self.predict_split in ("query", "gallery"):
            records = self._readable(getattr(self.splits, self.predict_split))
            return records, [self.predict_split == "query"] * len(records)
        raise ValueError(f"predict_split must be one of test, query, gallery, train; got {self.predict_split!r}")

    def predict_dataloader(self) -> DataLoader:
        records, is_query = self.predict_records()
        dataset = ImageDataset(records, self.test_transform, is_query=is_query)
        # under DDP each rank embeds one contiguous block and writes its own part (FeatureWriter merges them)
        return DataLoader(dataset, batch_sampler=sequential_batches(len(dataset), self.eval_batch_size),
                          **self._loader_kwargs())

    def on_train_epoch_start(self) -> None:  # pragma: no cover - Lightning calls the sampler hook itself
        pass
