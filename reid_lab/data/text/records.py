"""Record types of text-to-person data: captioned images, caption queries, and the split container.

Conventions follow :mod:`reid_lab.data.records`: train pids are relabelled to ``0 .. N-1`` (sorted order of
the raw ids), val / test pids keep their raw values; ``camid`` is 0-based, or ``None`` for every record of a
dataset whose file names carry no camera.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from reid_lab.data.records import DatasetFormatError


class CaptionedImage(NamedTuple):
    """One image and the captions that describe it.

    Attributes:
        path: absolute image path.
        pid: identity (relabelled in the train split, raw in val / test).
        camid: 0-based camera, or ``None`` when the dataset does not record cameras.
        captions: the image's captions (at least one, none empty).
    """

    path: str
    pid: int
    camid: int | None
    captions: tuple[str, ...]


class CaptionQuery(NamedTuple):
    """One caption used as a query. It has no ``path`` on purpose: a feature file's item is its ``text``.

    Attributes:
        text: the caption.
        pid: identity of the person it describes.
        image: path of the image it was written for (the query's own image; not excluded from the gallery,
            as in the text-to-person protocol).
    """

    text: str
    pid: int
    image: str


def relabel_captioned(records: Iterable[CaptionedImage]) -> list[CaptionedImage]:
    """Map the pids of ``records`` to ``0 .. num_ids - 1`` in sorted order of the raw pids (as
    :func:`reid_lab.data.records.relabel` does for image records).

    >>> relabel_captioned([CaptionedImage("a", 7, None, ("x",)), CaptionedImage("b", 3, None, ("y",))])
    [CaptionedImage(path='a', pid=1, camid=None, captions=('x',)), CaptionedImage(path='b', pid=0, camid=None, captions=('y',))]
    """
    records = list(records)
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=mapping[r.pid]) for r in records]


def caption_queries(records: Sequence[CaptionedImage]) -> list[CaptionQuery]:
    """Every caption of ``records`` as a query, in record order then caption order."""
    return [CaptionQuery(text, r.pid, r.path) for r in records for text in r.captions]


@dataclass
class TextReIDSplits:
    """The splits of a text-to-person dataset.

    Attributes:
        name: dataset name, used in error messages and logs.
        train: training images with their captions, pids relabelled to ``0 .. num_train_pids - 1``.
        test: test images (the gallery; their captions are the queries), raw pids.
        val: validation images, raw pids; empty for datasets without a val split (ICFG-PEDES, synthetic).
        meta: free-form facts (``root``: the dataset folder, ``annotations``: the annotation file).
    """

    name: str
    train: list[CaptionedImage]
    test: list[CaptionedImage]
    val: list[CaptionedImage] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.meta.get("annotations") or self.meta.get("root", "?")
        for split in ("train", "test"):
            if not getattr(self, split):
                raise DatasetFormatError(
                    f"{self.name}: the {split} split is empty ({where}); expected at least one image"
                )
        labels = sorted({r.pid for r in self.train})
        if labels != list(range(len(labels))):
            raise DatasetFormatError(
                f"{self.name}: train pids must be relabelled to 0..N-1 (got {labels[:5]}...); "
                "use relabel_captioned()"
            )

    def split(self, name: str) -> list[CaptionedImage]:
        """The records of split ``name`` (``train``, ``val`` or ``test``)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"{self.name}: unknown split {name!r}; expected train, val or test")
        return getattr(self, name)

    @property
    def has_cameras(self) -> bool:
        """Whether every record carries a camid."""
        return all(r.camid is not None for split in (self.train, self.val, self.test) for r in split)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    def summary(self) -> str:
        """A small table of ids / images / captions per split."""
        rows = [f"{self.name}", f"  {'split':<8} {'ids':>6} {'images':>8} {'captions':>9}"]
        for split in ("train", "val", "test"):
            recs = getattr(self, split)
            captions = sum(len(r.captions) for r in recs)
            rows.append(f"  {split:<8} {len({r.pid for r in recs}):>6} {len(recs):>8} {captions:>9}")
        return "\n".join(rows)
