"""The record type every dataset parser returns, and the train / query / gallery split container.

Conventions (shared with fast-reid and torchreid, see ``shared/reference/reid-toolboxes.md`` §2):

* ``pid`` is the identity. Train pids are relabelled to ``0 .. num_train_pids - 1``; query and gallery pids
  keep their raw values so they can be compared with each other. Junk detections (pid ``-1``) are dropped at
  load time; distractors (pid ``0`` in Market-1501) stay in the gallery as negatives.
* ``camid`` is 0-based.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class DatasetFormatError(ValueError):
    """A dataset on disk does not match its expected layout. The message names the file and the format."""


class ImageRecord(NamedTuple):
    """One image of a ReID split."""

    path: str
    pid: int
    camid: int


def relabel(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Map the pids of ``records`` to ``0 .. num_ids - 1`` in sorted order of the raw pids.

    >>> relabel([ImageRecord("a", 7, 0), ImageRecord("b", 3, 1), ImageRecord("c", 7, 2)])
    [ImageRecord(path='a', pid=1, camid=0), ImageRecord(path='b', pid=0, camid=1), ImageRecord(path='c', pid=1, camid=2)]
    """
    records = list(records)
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records]


def num_ids(records: Sequence[ImageRecord]) -> int:
    """Number of distinct pids in ``records``."""
    return len({r.pid for r in records})


def num_cameras(records: Sequence[ImageRecord]) -> int:
    """Number of distinct camids in ``records``."""
    return len({r.camid for r in records})


@dataclass
class ReIDSplits:
    """The three standard splits of a ReID dataset.

    Attributes:
        name: dataset name, used in error messages and logs.
        train: training images, pids relabelled to ``0 .. num_train_pids - 1``.
        query: query images, raw pids.
        gallery: gallery images, raw pids (distractors with pid 0 included).
        meta: free-form facts a parser wants to keep (root folder, version, ...).
    """

    name: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "query", "gallery"):
            if not getattr(self, split):
                raise DatasetFormatError(
                    f"{self.name}: the {split} split is empty (root: {self.meta.get('root', '?')}); "
                    f"expected at least one image"
                )
        labels = sorted({r.pid for r in self.train})
        if labels != list(range(len(labels))):
            raise DatasetFormatError(
                f"{self.name}: train pids must be relabelled to 0..N-1 (got {labels[:5]}...); use relabel()"
            )

    @property
    def num_train_pids(self) -> int:
        return num_ids(self.train)

    @property
    def num_cameras(self) -> int:
        return len({r.camid for split in (self.train, self.query, self.gallery) for r in split})

    def summary(self) -> str:
        """A small table of ids / images / cameras per split, like the one fast-reid prints."""
        rows = [f"{self.name}", f"  {'split':<8} {'ids':>6} {'images':>8} {'cameras':>8}"]
        for split in ("train", "query", "gallery"):
            recs = getattr(self, split)
            rows.append(f"  {split:<8} {num_ids(recs):>6} {len(recs):>8} {num_cameras(recs):>8}")
        return "\n".join(rows)
