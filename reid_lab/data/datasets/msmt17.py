"""MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap for Person Re-Identification", CVPR 2018).

Layout: ``MSMT17_V1/{train,test}/<pid>/...`` or ``MSMT17_V2/{mask_train_v2,mask_test_v2}/<pid>/...``
(V2 has the faces masked), plus ``list_train.txt``, ``list_val.txt``, ``list_query.txt``,
``list_gallery.txt``. A list line reads ``0000/0000_000_01_0303morning_0015_0.jpg 0``: the image path
relative to the train (train / val lists) or test (query / gallery lists) folder, then the pid. The camera is
the 3rd ``_`` token of the file name (01-15). Test pids restart at 0; they are only compared with each other.
Full dataset: train 1,041 ids / 30,248 images (+2,373 in ``list_val``, not part of the standard protocol);
query 3,060 / 11,659; gallery 3,060 / 82,161; 15 cameras.
"""

from __future__ import annotations

import os
from pathlib import Path

from reid_lab.data.datasets.layout import resolve_root
from reid_lab.data.paths import confined_path
from reid_lab.data.records import DatasetFormatError, ImageRecord, ReIDSplits, relabel

# version -> (train image folder, test image folder)
MSMT17_IMAGE_FOLDERS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
MSMT17_NUM_CAMERAS = 15
MSMT17_LINE_FORMAT = (
    "'<pid dir>/<pid>_<index>_<camera 01-15>_<date><time of day>_<frame>_<k>.jpg <pid>', "
    "e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'"
)


def _version_key(version: str) -> str:
    key = version.upper().removeprefix("MSMT17_")
    if key not in MSMT17_IMAGE_FOLDERS:
        raise ValueError(f"msmt17: version must be one of {sorted(MSMT17_IMAGE_FOLDERS)}, got {version!r}")
    return key


def find_msmt17(root: str | Path, version: str | None = None) -> tuple[Path, str]:
    """Find the MSMT17 folder under ``root`` and tell which version it is.

    Tries, for V1 then V2 (or only ``version``): ``root`` itself, ``root/MSMT17_Vx`` (fast-reid) and
    ``root/msmt17/MSMT17_Vx`` (torchreid).

    Returns:
        ``(dataset folder, "V1" | "V2")``.

    Raises:
        DatasetFormatError: no candidate holds the list files and image folders; lists every path tried.
    """
    versions = [_version_key(version)] if version else list(MSMT17_IMAGE_FOLDERS)
    failures = []
    for key in versions:
        required = (*MSMT17_IMAGE_FOLDERS[key], "list_train.txt", "list_query.txt", "list_gallery.txt")
        candidates = (".", f"MSMT17_{key}", f"msmt17/MSMT17_{key}")
        try:
            return resolve_root(root, f"msmt17 {key}", candidates, required), key
        except DatasetFormatError as error:
            failures.append(str(error))
    raise DatasetFormatError("\n".join(failures))


def read_msmt17_list(list_path: Path, image_dir: Path) -> list[ImageRecord]:
    """Parse one MSMT17 list file into records with raw pids and 0-based camids.

    Every listed image must exist under ``image_dir`` (checked with one ``os.scandir`` per pid folder).

    Raises:
        DatasetFormatError: a malformed line (names the list file and line number), a camera outside
            01-15, a path that is absolute or climbs out of ``image_dir``, or a listed image missing on disk.
    """
    records = []
    folder_contents: dict[str, set[str]] = {}
    with open(list_path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"msmt17: {list_path}, line {line_number}"
            fields = line.split()
            try:
                relative_path, label = fields
                pid = int(label)
                camera = int(relative_path.rpartition("/")[2].split("_")[2])
            except (ValueError, IndexError):
                raise DatasetFormatError(
                    f"{where}: cannot parse {line!r}; expected {MSMT17_LINE_FORMAT}"
                ) from None
            if pid < 0:
                raise DatasetFormatError(f"{where}: negative pid in {line!r}; expected {MSMT17_LINE_FORMAT}")
            if not 1 <= camera <= MSMT17_NUM_CAMERAS:
                raise DatasetFormatError(
                    f"{where}: camera {camera} out of range 1..{MSMT17_NUM_CAMERAS} in {line!r}"
                )
            # A list file is data: its paths may not leave the image folder (../../etc/passwd, /etc/hostname).
            path = confined_path(image_dir, relative_path, where)
            folder, name = os.path.split(path)
            if folder not in folder_contents:
                try:
                    with os.scandir(folder) as entries:
                        folder_contents[folder] = {entry.name for entry in entries}
                except (FileNotFoundError, NotADirectoryError):
                    folder_contents[folder] = set()
            if name not in folder_contents[folder]:
                raise DatasetFormatError(f"{where}: listed image {path} does not exist")
            records.append(ImageRecord(path, pid, camera - 1))
    if not records:
        raise DatasetFormatError(f"msmt17: {list_path} lists no image; expected lines {MSMT17_LINE_FORMAT}")
    return records


def load_msmt17(root: str | Path, version: str | None = None, include_val: bool = False) -> ReIDSplits:
    """Load MSMT17 V1 or V2 with the standard protocol (``list_train`` / ``list_query`` / ``list_gallery``).

    Args:
        root: the ``MSMT17_V1`` / ``MSMT17_V2`` folder or a parent holding it (fast-reid or torchreid layout).
        version: ``"V1"`` or ``"V2"``; ``None`` detects it from the folders present (V1 first).
        include_val: also train on ``list_val.txt`` (not the standard protocol; changes published numbers).

    Returns:
        Splits named ``"msmt17"``: train pids relabelled, query / gallery pids raw, camids 0-14;
        ``meta["version"]`` records the version.

    Raises:
        DatasetFormatError: the folder is not found, a list line is malformed, or a listed image is missing.
    """
    dataset_dir, key = find_msmt17(root, version)
    train_dir, test_dir = (dataset_dir / folder for folder in MSMT17_IMAGE_FOLDERS[key])
    train = read_msmt17_list(dataset_dir / "list_train.txt", train_dir)
    if include_val:
        if not (dataset_dir / "list_val.txt").is_file():
            raise DatasetFormatError(f"msmt17: include_val=True but {dataset_dir / 'list_val.txt'} is missing")
        train += read_msmt17_list(dataset_dir / "list_val.txt", train_dir)
    return ReIDSplits(
        name="msmt17",
        train=relabel(train),
        query=read_msmt17_list(dataset_dir / "list_query.txt", test_dir),
        gallery=read_msmt17_list(dataset_dir / "list_gallery.txt", test_dir),
        meta={"root": str(dataset_dir), "version": key, "include_val": include_val},
    )
