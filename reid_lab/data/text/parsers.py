"""Parsers of the text-to-person datasets: annotation JSON -> :class:`~reid_lab.data.text.records.TextReIDSplits`.

Every format is a JSON list of entries, one per image (layouts in ``shared/reference/multimodal.md`` §4.2 and
the IRRA / TBPS loaders):

=============  =======================  =================  ===========  ==================  ====================
dataset        annotation file          image key          relative to  splits              ids
=============  =======================  =================  ===========  ==================  ====================
cuhkpedes      ``reid_raw.json``        ``file_path``      ``imgs/``    train / val / test  1-based
icfgpedes      ``ICFG-PEDES.json``      ``file_path``      ``imgs/``    train / test        as stored
rstpreid       ``data_captions.json``   ``img_path``       ``imgs/``    train / val / test  as stored
synthetic      ``reid_raw.json``        ``file_path``      root         train / test        1-based (= Market pid)
=============  =======================  =================  ===========  ==================  ====================

Each entry also holds ``captions`` (a list of strings), ``id`` and ``split``; CUHK-PEDES and the synthetic set
add ``processed_tokens`` (not used). The synthetic generator (``reid-lab synth``) writes CUHK-PEDES-format
entries for its person images, with ``file_path`` relative to the dataset root (``bounding_box_train/...``,
``query/...``, ``bounding_box_test/...``); its ``test`` split is the query and gallery folders together.

Cameras: ICFG-PEDES and RSTPReid images come from MSMT17 and the synthetic set uses Market names, so the camera
is read from the file name when every name matches the dataset's pattern; otherwise (and for CUHK-PEDES, whose
images come from five source datasets) ``camid`` is ``None``.

Annotation files are data: every image path must stay inside the image folder (:mod:`reid_lab.data.paths`), an
image may sit in one split under one id only (a test image listed under ``train`` would leak into training),
and a repeated entry is dropped with a warning that counts the repeats.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reid_lab.data.datasets.layout import resolve_root
from reid_lab.data.paths import confined_path
from reid_lab.data.records import DatasetFormatError
from reid_lab.data.text.records import CaptionedImage, TextReIDSplits, relabel_captioned

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionFormat:
    """How one text-to-person dataset stores its annotations.

    Attributes:
        name: dataset name.
        annotations: annotation file name inside the dataset folder.
        image_dir: folder the image paths are relative to, inside the dataset folder (``"."``: the folder).
        path_key: the entry key holding the image path.
        splits: the split names the format uses.
        folders: where to look for the dataset folder under the user's root (``"."``: the root itself).
        required: entries the dataset folder must contain.
        camera: regex on the image's file name whose group 1 is the 1-based camera number (None: no cameras).
        hint: appended to a "dataset folder not found" message.
    """

    name: str
    annotations: str
    image_dir: str
    path_key: str
    splits: tuple[str, ...]
    folders: tuple[str, ...]
    required: tuple[str, ...]
    camera: re.Pattern | None = None
    hint: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys every entry must have."""
        return (self.path_key, "captions", "id", "split")


CUHKPEDES = CaptionFormat(
    name="cuhkpedes", annotations="reid_raw.json", image_dir="imgs", path_key="file_path",
    splits=("train", "val", "test"), folders=(".", "CUHK-PEDES", "cuhkpedes"),
    required=("reid_raw.json", "imgs"),
)
ICFGPEDES = CaptionFormat(
    name="icfgpedes", annotations="ICFG-PEDES.json", image_dir="imgs", path_key="file_path",
    splits=("train", "test"), folders=(".", "ICFG-PEDES", "icfgpedes"),
    required=("ICFG-PEDES.json", "imgs"),
    camera=re.compile(r"^\d+_\d+_(\d+)_"),  # MSMT17 names: 0027_010_05_0303afternoon_1591_1.jpg, camera 05
)
RSTPREID = CaptionFormat(
    name="rstpreid", annotations="data_captions.json", image_dir="imgs", path_key="img_path",
    splits=("train", "val", "test"), folders=(".", "RSTPReid", "rstpreid"),
    required=("data_captions.json", "imgs"),
    camera=re.compile(r"^\d+_c(\d+)_"),  # 3903_c14_0006.jpg, camera 14
)
SYNTHETIC = CaptionFormat(
    name="synthetic", annotations="reid_raw.json", image_dir=".", path_key="file_path",
    splits=("train", "test"), folders=(".",), required=("reid_raw.json", "bounding_box_train"),
    camera=re.compile(r"_c(\d)s\d+_"),  # Market names: 0002_c1s1_000451_01.jpg
    hint="Generate one with: reid-lab synth --out <root>",
)

FORMATS: dict[str, CaptionFormat] = {f.name: f for f in (CUHKPEDES, ICFGPEDES, RSTPREID, SYNTHETIC)}


def load_caption_dataset(fmt: CaptionFormat, root: str | Path, check_files: bool = True) -> TextReIDSplits:
    """Parse the annotation file of a dataset in format ``fmt`` found at (or under) ``root``.

    Args:
        fmt: the dataset's format.
        root: the dataset folder or a parent holding it under a conventional name (``fmt.folders``).
        check_files: fail when an annotated image file does not exist.

    Returns:
        Splits with absolute image paths; train pids relabelled ``0..N-1``, val / test pids raw.

    Raises:
        DatasetFormatError: folder not found, invalid JSON, a malformed entry (the message names the file, the
            entry's position and image, and the key), an unknown split, an empty caption, an image path that
            is absolute or climbs out of the image folder, one image in two splits or under two ids (both
            entries named), missing images. Repeats of an entry (same image, split and id) are dropped with
            one warning that counts them; new captions they carry are merged into the first entry.
    """
    dataset_dir = resolve_root(root, fmt.name, fmt.folders, fmt.required, hint=fmt.hint)
    annotation_path = dataset_dir / fmt.annotations
    image_dir = dataset_dir if fmt.image_dir == "." else dataset_dir / fmt.image_dir
    try:
        entries = json.loads(annotation_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{fmt.name}: {annotation_path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{fmt.name}: {annotation_path} is not UTF-8 text: {err}") from err
    if not isinstance(entries, list):
        raise DatasetFormatError(
            f"{fmt.name}: {annotation_path} holds a JSON {type(entries).__name__}; expected a list of entries "
            f"with keys {', '.join(fmt.keys)}"
        )
    by_split: dict[str, list[CaptionedImage]] = {split: [] for split in fmt.splits}
    missing: list[str] = []
    seen: dict[str, tuple[int, str, int]] = {}  # image path -> (entry index, split, position in its split)
    exact, merged = 0, 0
    for index, entry in enumerate(entries):
        record, split = _parse_entry(fmt, annotation_path, image_dir, index, entry)
        if record.path in seen:
            first, first_split, position = seen[record.path]
            kept = by_split[first_split][position]
            _check_same_image(
                fmt, annotation_path, entries, (first, first_split, kept), (index, split, record)
            )
            if set(record.captions) <= set(kept.captions):
                exact += 1
            else:
                new = tuple(c for c in record.captions if c not in kept.captions)
                by_split[split][position] = kept._replace(captions=kept.captions + new)
                merged += 1
            continue
        if check_files and not os.path.isfile(record.path):
            missing.append(f"entry {index}: {record.path}")
        seen[record.path] = (index, split, len(by_split[split]))
        by_split[split].append(record)
    if exact or merged:
        # Kept twice, an image would count twice in the gallery and skew every rank metric.
        logger.warning(
            "%s: %s: removed %d duplicate entr%s of an image already listed (same split and id)%s",
            fmt.name, annotation_path, exact + merged, "y" if exact + merged == 1 else "ies",
            f"; {merged} of them added new captions, merged into the first entry" if merged else "",
        )
    if missing:
        listing = "\n".join(f"  - {line}" for line in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatasetFormatError(
            f"{fmt.name}: {annotation_path}: {len(missing)} annotated image(s) do not exist "
            f"(paths are relative to {image_dir}):\n{listing}{more}"
        )
    by_split = _with_cameras(fmt, by_split)
    return TextReIDSplits(
        name=fmt.name,
        train=relabel_captioned(by_split["train"]),
        val=by_split.get("val", []),
        test=by_split["test"],
        meta={"root": str(dataset_dir), "annotations": str(annotation_path), "image_dir": str(image_dir)},
    )


def _parse_entry(
    fmt: CaptionFormat, annotation_path: Path, image_dir: Path, index: int, entry: object
) -> tuple[CaptionedImage, str]:
    where = f"{fmt.name}: {annotation_path}: entry {index}"
    if not isinstance(entry, dict):
        raise DatasetFormatError(
            f"{where} is a JSON {type(entry).__name__}; expected an object with keys {', '.join(fmt.keys)}"
        )
    if isinstance(entry.get(fmt.path_key), str):
        where += f" ({fmt.path_key}={entry[fmt.path_key]!r})"
    absent = [key for key in fmt.keys if key not in entry]
    if absent:
        raise DatasetFormatError(
            f"{where}: missing key(s) {', '.join(repr(k) for k in absent)}; every {fmt.name} entry needs "
            f"{', '.join(fmt.keys)}"
        )
    rel_path = entry[fmt.path_key]
    if not isinstance(rel_path, str) or not rel_path.strip():
        raise DatasetFormatError(f"{where}: {fmt.path_key!r} must be a non-empty string, got {rel_path!r}")
    split = entry["split"]
    if split not in fmt.splits:
        raise DatasetFormatError(
            f"{where}: unknown split {split!r}; {fmt.name} splits are {', '.join(fmt.splits)}"
        )
    pid = entry["id"]
    if isinstance(pid, str) and pid.strip().isdigit():
        pid = int(pid)
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise DatasetFormatError(f"{where}: 'id' must be an integer, got {pid!r}")
    captions = entry["captions"]
    if not isinstance(captions, list) or not captions:
        raise DatasetFormatError(
            f"{where}: 'captions' must be a non-empty list of strings, got {captions!r}"
        )
    for k, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetFormatError(f"{where}: caption {k} is empty or not a string ({caption!r})")
    path = confined_path(image_dir, rel_path, where)
    return CaptionedImage(path, pid, None, tuple(captions)), split


def _check_same_image(
    fmt: CaptionFormat,
    annotation_path: Path,
    entries: list,
    first: tuple[int, str, CaptionedImage],
    second: tuple[int, str, CaptionedImage],
) -> None:
    """Two entries name one image file: an error when they disagree on its split or identity.

    The same image in train and test lets the model train on a test image (the metrics then overstate it);
    one image under two ids makes one of the labels wrong. Neither has a safe automatic fix.
    """

    def describe(index: int, split: str, record: CaptionedImage) -> str:
        key = fmt.path_key
        return f"entry {index} ({key}={entries[index][key]!r}, split {split!r}, id {record.pid})"

    (i, split_i, record_i), (j, split_j, record_j) = first, second
    both = (f"{fmt.name}: {annotation_path}: {describe(i, split_i, record_i)} and "
            f"{describe(j, split_j, record_j)}")
    if split_i != split_j:
        raise DatasetFormatError(
            f"{both} list the same image {record_i.path} in two splits; a test image must not be trained on: "
            "keep each image in exactly one split"
        )
    if record_i.pid != record_j.pid:
        raise DatasetFormatError(
            f"{both} give the same image {record_i.path} two identities; expected one id per image"
        )


def _with_cameras(fmt: CaptionFormat, by_split: dict[str, list[CaptionedImage]]) -> dict[str, list[CaptionedImage]]:
    """Fill in camids from the file names when every name matches ``fmt.camera``; leave them None otherwise."""
    if fmt.camera is None:
        return by_split
    camids: dict[str, int] = {}
    for records in by_split.values():
        for r in records:
            match = fmt.camera.search(os.path.basename(r.path))
            if match is None:
                logger.info("%s: %s does not name its camera (expected a match of %r): camids left unknown",
                            fmt.name, r.path, fmt.camera.pattern)
                return by_split
            camids[r.path] = int(match.group(1)) - 1
    return {split: [r._replace(camid=camids[r.path]) for r in records] for split, records in by_split.items()}


def load_cuhkpedes(root: str | Path, check_files: bool = True) -> TextReIDSplits:
    """CUHK-PEDES (Li et al. CVPR'17): ``CUHK-PEDES/{reid_raw.json, imgs/}``; 11,003 / 1,000 / 1,000 ids."""
    return load_caption_dataset(CUHKPEDES, root, check_files)


def load_icfgpedes(root: str | Path, check_files: bool = True) -> TextReIDSplits:
    """ICFG-PEDES (Ding et al. 2021): ``ICFG-PEDES/{ICFG-PEDES.json, imgs/}``; 3,102 train / 1,000 test ids."""
    return load_caption_dataset(ICFGPEDES, root, check_files)


def load_rstpreid(root: str | Path, check_files: bool = True) -> TextReIDSplits:
    """RSTPReid (Zhu et al. MM'21): ``RSTPReid/{data_captions.json, imgs/}``; 3,701 / 200 / 200 ids."""
    return load_caption_dataset(RSTPREID, root, check_files)


def load_synthetic_captions(root: str | Path, check_files: bool = True) -> TextReIDSplits:
    """The captions of a ``reid-lab synth`` set: ``<root>/reid_raw.json`` next to the Market folders."""
    return load_caption_dataset(SYNTHETIC, root, check_files)


TEXT_DATASETS: dict[str, Callable[..., TextReIDSplits]] = {
    "cuhkpedes": load_cuhkpedes,
    "icfgpedes": load_icfgpedes,
    "rstpreid": load_rstpreid,
    "synthetic": load_synthetic_captions,
}


def load_text_dataset(name: str, root: str | Path, **options) -> TextReIDSplits:
    """Load the text-to-person dataset ``name`` (a key of :data:`TEXT_DATASETS`, case-insensitive) from ``root``.

    Raises:
        ValueError: unknown name (the message lists the available ones).
        DatasetFormatError: the data on disk does not match the format.
    """
    loader = TEXT_DATASETS.get(name.lower())
    if loader is None:
        raise ValueError(f"unknown text-to-person dataset {name!r}; available: {', '.join(sorted(TEXT_DATASETS))}")
    return loader(root, **options)
