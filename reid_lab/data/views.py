"""What a data module hands the upgrade host: the new model's training set under the evaluation transform."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reid_lab.data.records import ImageRecord


@dataclass
class TrainingSetView:
    """The new model's training set, as class-level compatibility state needs it.

    Attributes:
        records: the training records, labels relabelled ``0 .. C_new - 1`` (the order of ``batches``).
        raw_records: the dataset's whole training split with its parsed ids, so that each new class can be
            matched to the old model's class of the same identity (empty: no correspondence known).
        batches: returns a fresh iterable of batches over ``records`` in order, under the evaluation
            transform (no augmentation), each a mapping with the modality's input (``"image"``) and
            ``"pid"``.
        modality: the input the batches carry.
    """

    records: list[ImageRecord]
    raw_records: list[ImageRecord]
    batches: Callable[[], Iterable[Mapping[str, Any]]]
    modality: str = "image"

    @property
    def num_classes(self) -> int:
        return len({r.pid for r in self.records})
