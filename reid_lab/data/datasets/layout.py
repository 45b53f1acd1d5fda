"""Shared pieces of the dataset parsers: finding the dataset folder and reading Market-style split folders.

A "Market-style" split folder holds one image per file, with the identity and the camera in the file name
(``0002_c1s1_000451_03.jpg``). Market-1501, DukeMTMC-reID, CUHK03-NP, VeRi-776 and our synthetic data all
use it; they differ only in the regex, the extension and the valid camera / pid ranges, which a
:class:`FilenameFormat` holds.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reid_lab.data.records import DatasetFormatError, ImageRecord, ReIDSplits, relabel

logger = logging.getLogger(__name__)

JUNK_PID = -1


def resolve_root(
    root: str | Path,
    dataset: str,
    candidates: Sequence[str],
    required: Sequence[str],
    hint: str = "",
) -> Path:
    """Find the dataset folder: ``root`` itself or one of its conventional sub-folders.

    Args:
        root: what the user passed; the dataset folder or a parent of it.
        dataset: dataset name for the error message.
        candidates: paths relative to ``root`` to try in order; ``"."`` is ``root`` itself.
        required: entries (folders or files) the dataset folder must contain.
        hint: extra sentence appended to the error message (e.g. how to get the data).

    Returns:
        The resolved dataset folder.

    Raises:
        DatasetFormatError: no candidate contains all ``required`` entries; the message lists every path
            tried, what is missing in each (the folder itself, or which required entries), and the expected
            entries.
    """
    root = Path(root).expanduser()
    tried = []
    for rel in candidates:
        folder = root if rel == "." else root / rel
        missing = [entry for entry in required if not os.path.exists(folder / entry)]
        if not missing:
            return folder.resolve()
        if not folder.is_dir():
            tried.append(f"{folder}: does not exist")
        else:
            tried.append(f"{folder}: exists, but is missing {', '.join(missing)}")
    lines = "\n".join(f"  - {line}" for line in tried)
    message = (
        f"{dataset}: dataset folder not found under {root}. Tried:\n{lines}\n"
        f"The dataset folder must contain: {', '.join(required)}."
    )
    if hint:
        message += f" {hint}"
    raise DatasetFormatError(message)


def warn_skipped(folder: str | Path, skipped: Sequence[str], what: str = "non-image entries") -> None:
    """Log one warning for the entries of ``folder`` a parser skipped (nothing is dropped silently)."""
    if skipped:
        logger.warning(
            "%s: skipped %d %s (e.g. %r)", folder, len(skipped), what, sorted(skipped)[0]
        )


def scan_files(folder: str | Path, extensions: Sequence[str]) -> tuple[list[str], list[str]]:
    """List the image files of one folder with a single ``os.scandir``.

    Hidden entries (dot files) are ignored. Entries that are not regular files with one of ``extensions``
    (compared case-insensitively) are returned separately so the caller can report them.

    Returns:
        ``(images, others)``: sorted image file names, and the names of the other entries.
    """
    extensions = tuple(ext.lower() for ext in extensions)
    images, others = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.name.lower().endswith(extensions) and entry.is_file():
                images.append(entry.name)
            else:
                others.append(entry.name)
    images.sort()
    return images, others


@dataclass(frozen=True)
class FilenameFormat:
    """How a Market-style file name encodes its identity and camera.

    Attributes:
        pattern: regex the whole file name must match (``fullmatch``, so a copy such as
            ``0002_c1s1_000451_03 (copy).jpg`` is rejected); group 1 is the pid, group 2 the 1-based camera.
        example: a valid file name, shown in error messages.
        extensions: image extensions of the dataset (lower case, with the dot).
        cameras: inclusive range of valid 1-based camera numbers.
        max_pid: largest valid pid, or ``None`` for no upper bound. Pids below ``0`` other than the junk
            pid ``-1`` are always invalid.
    """

    pattern: re.Pattern
    example: str
    extensions: tuple[str, ...]
    cameras: tuple[int, int]
    max_pid: int | None = None

    def describe(self) -> str:
        return f"pattern {self.pattern.pattern!r} on the whole file name, e.g. {self.example!r}"


def parse_split_folder(folder: str | Path, fmt: FilenameFormat, dataset: str) -> list[ImageRecord]:
    """Read one Market-style split folder into records with raw pids and 0-based camids.

    Junk images (pid ``-1``) are dropped (their count is logged); distractors (pid ``0``) are kept.

    Args:
        folder: the split folder, e.g. ``.../bounding_box_test``.
        fmt: the dataset's file name format.
        dataset: dataset name for messages.

    Returns:
        Records sorted by file name.

    Raises:
        DatasetFormatError: an image file name does not match ``fmt``, a camera or pid is out of range, or
            the folder holds no usable image.
    """
    folder = os.fspath(folder)
    names, others = scan_files(folder, fmt.extensions)
    warn_skipped(folder, others, f"entries that are not {'/'.join(fmt.extensions)} images")
    low_cam, high_cam = fmt.cameras
    records, num_junk = [], 0
    for name in names:
        path = os.path.join(folder, name)
        match = fmt.pattern.fullmatch(name)
        if match is None:
            raise DatasetFormatError(
                f"{dataset}: file name {path} does not match the expected format: {fmt.describe()}"
            )
        try:
            pid, cam = int(match.group(1)), int(match.group(2))
        except ValueError:
            raise DatasetFormatError(
                f"{dataset}: file name {path} does not match the expected format: {fmt.describe()}"
            ) from None
        if pid == JUNK_PID:
            num_junk += 1
            continue
        if pid < 0 or (fmt.max_pid is not None and pid > fmt.max_pid):
            upper = "" if fmt.max_pid is None else f"..{fmt.max_pid}"
            raise DatasetFormatError(
                f"{dataset}: pid {pid} out of range in {path}; expected 0{upper} (or -1 for junk), "
                f"format: {fmt.describe()}"
            )
        if not low_cam <= cam <= high_cam:
            raise DatasetFormatError(
                f"{dataset}: camera {cam} out of range in {path}; expected {low_cam}..{high_cam}, "
                f"format: {fmt.describe()}"
            )
        records.append(ImageRecord(path, pid, cam - 1))
    if num_junk:
        logger.info("%s: dropped %d junk images (pid -1) in %s", dataset, num_junk, folder)
    if not records:
        raise DatasetFormatError(
            f"{dataset}: no usable image in {folder} ({len(names)} image files, {num_junk} junk); "
            f"expected files named like {fmt.example!r}"
        )
    return records


MARKET_SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def load_split_folders(
    dataset_dir: Path,
    name: str,
    fmt: FilenameFormat,
    split_folders: dict[str, str] | None = None,
    meta: dict | None = None,
) -> ReIDSplits:
    """Read a Market-style tree (one folder per split) into :class:`ReIDSplits`.

    Args:
        dataset_dir: the resolved dataset folder.
        name: dataset name.
        fmt: the file name format.
        split_folders: sub-folder of each split ``{"train": ..., "query": ..., "gallery": ...}``;
            defaults to Market-1501's ``bounding_box_train`` / ``query`` / ``bounding_box_test``.
        meta: extra facts for ``ReIDSplits.meta`` (``root`` is always set).

    Returns:
        The splits, train pids relabelled, query / gallery pids raw.
    """
    split_folders = split_folders or MARKET_SPLIT_FOLDERS
    splits = {
        split: parse_split_folder(dataset_dir / folder, fmt, name) for split, folder in split_folders.items()
    }
    return ReIDSplits(
        name=name,
        train=relabel(splits["train"]),
        query=splits["query"],
        gallery=splits["gallery"],
        meta={"root": str(dataset_dir), **(meta or {})},
    )
