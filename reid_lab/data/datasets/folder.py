"""Users' own data: one folder per identity, ``root/<identity>/<image files>``.

Identities are split into train and test identities with a seeded permutation; the images of each test
identity are split into query and gallery. Identity folder names may be any strings: they are mapped to
integer pids in sorted order (``meta["identities"]`` keeps the mapping).

Cameras come from a CSV (``path,camid``), from a regex on the file name, or are unknown. Unknown cameras
give every image its own camid, so the standard evaluation protocol (which drops gallery images with the
query's pid *and* camid) removes only the query image itself from its gallery.
"""

from __future__ import annotations

import csv
import os
import posixpath
import random
import re
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from reid_lab.data.datasets.layout import scan_files, warn_skipped
from reid_lab.data.paths import confined_path
from reid_lab.data.records import DatasetFormatError, ImageRecord, ReIDSplits, relabel

FOLDER_LAYOUT = "root/<identity>/<image files>"


def image_extensions() -> tuple[str, ...]:
    """Every file extension PIL can read or write (lower case, with the dot)."""
    return tuple(sorted({ext.lower() for ext in Image.registered_extensions()}))


def scan_identities(root: Path, ignore: Iterable[Path] = ()) -> dict[str, list[str]]:
    """Map each identity folder name to its sorted image file names.

    Hidden entries are ignored; other non-image entries are reported in one warning.

    Raises:
        DatasetFormatError: an image lies directly in ``root``, an identity folder holds no image, or
            there are no identity folders at all.
    """
    extensions = image_extensions()
    ignore = {Path(path).resolve() for path in ignore}
    identities: dict[str, list[str]] = {}
    skipped = []
    with os.scandir(root) as entries:
        entries = sorted(entries, key=lambda entry: entry.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            images, others = scan_files(entry.path, extensions)
            if not images:
                detail = f" (only non-image entries, e.g. {sorted(others)[0]!r})" if others else ""
                raise DatasetFormatError(
                    f"folder: identity folder {entry.path} holds no image{detail}; expected {FOLDER_LAYOUT} "
                    f"with image files readable by PIL"
                )
            identities[entry.name] = images
            skipped += [f"{entry.name}/{name}" for name in others]
        elif entry.name.lower().endswith(extensions):
            raise DatasetFormatError(
                f"folder: image {entry.path} lies directly in the root; expected {FOLDER_LAYOUT} "
                f"(one sub-folder per identity)"
            )
        elif Path(entry.path).resolve() not in ignore:
            skipped.append(entry.name)
    warn_skipped(root, skipped, "entries that are not images in identity folders")
    if not identities:
        raise DatasetFormatError(f"folder: {root} holds no identity folder; expected {FOLDER_LAYOUT}")
    return identities


def read_cameras_csv(csv_path: Path, image_paths: Iterable[str], root: str | Path = "") -> dict[str, str]:
    """Read a ``path,camid`` CSV (paths relative to the dataset root) and check it covers every image.

    Args:
        csv_path: the CSV file, with a header line ``path,camid``.
        image_paths: the images found on disk, as ``<identity>/<file name>``.
        root: the dataset folder the CSV's paths are relative to (default: the working directory); a path
            that is absolute or climbs out of it with ``..`` is refused.

    Returns:
        Camera label of each image path.

    Raises:
        DatasetFormatError: a missing header, an empty field, a path outside ``root``, a duplicate, an entry
            that is not an image of the dataset, or an image without an entry.
    """
    cameras: dict[str, str] = {}
    expected = "a header line 'path,camid' then lines like 'alice/0001.jpg,1' (path relative to the root)"
    with open(csv_path, newline="", encoding="utf-8") as lines:
        reader = csv.DictReader(lines)
        if reader.fieldnames is None or not {"path", "camid"} <= {name.strip() for name in reader.fieldnames}:
            raise DatasetFormatError(
                f"folder: {csv_path} has header {reader.fieldnames}; expected {expected}"
            )
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for row in reader:
            path, camera = (row.get("path") or "").strip(), (row.get("camid") or "").strip()
            if not path or not camera:
                raise DatasetFormatError(
                    f"folder: {csv_path}, line {reader.line_num}: empty path or camid in {row}; expected {expected}"
                )
            where = f"folder: {csv_path}, line {reader.line_num}"
            # Refused here, not later as "not an image of the dataset": a CSV is data and stays in the root.
            confined_path(root, path.replace("\\", "/"), where)
            path = posixpath.normpath(path.replace("\\", "/"))
            if path in cameras:
                raise DatasetFormatError(f"{where}: duplicate entry {path!r}")
            cameras[path] = camera
    image_paths = set(image_paths)
    unknown = sorted(set(cameras) - image_paths)
    if unknown:
        raise DatasetFormatError(
            f"folder: {csv_path} lists {len(unknown)} path(s) that are not images of the dataset, "
            f"e.g. {unknown[:3]}; expected {expected}"
        )
    missing = sorted(image_paths - set(cameras))
    if missing:
        raise DatasetFormatError(
            f"folder: image {missing[0]} has no camera in {csv_path} ({len(missing)} image(s) missing); "
            f"every image needs a line"
        )
    return cameras


def cameras_from_regex(pattern: str, image_paths: Iterable[str]) -> dict[str, str]:
    """Camera label of each image, searched with ``pattern`` in its file name (group ``cam`` or group 1).

    Raises:
        ValueError: the pattern has no group.
        DatasetFormatError: a file name the pattern does not match.
    """
    regex = re.compile(pattern)
    if regex.groups == 0:
        raise ValueError(f"folder: camera_regex {pattern!r} needs a group, e.g. r'_c(?P<cam>\\d+)'")
    group = "cam" if "cam" in regex.groupindex else 1
    cameras = {}
    for path in image_paths:
        match = regex.search(path.rpartition("/")[2])
        if match is None or match.group(group) is None:
            raise DatasetFormatError(
                f"folder: file name of {path} does not match camera_regex {pattern!r} "
                f"(the camera is group 'cam' or group 1 of a search in the file name)"
            )
        cameras[path] = match.group(group)
    return cameras


def camera_label_to_camid(labels: Iterable[str]) -> dict[str, int]:
    """Map camera labels to 0-based camids in sorted order (numeric order when every label is an integer)."""
    labels = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        ordered = sorted(labels, key=int)
    else:
        ordered = sorted(labels)
    return {label: camid for camid, label in enumerate(ordered)}


def pick_queries(
    images: list[str], camids: dict[str, int], num_query: int, rng: random.Random, cameras_known: bool
) -> set[str]:
    """Choose the query images of one test identity; at least one image always stays in the gallery.

    With known cameras the choice goes round-robin over the cameras (in a seeded order), so the queries come
    from as many different cameras as possible.
    """
    num_query = min(num_query, len(images) - 1)
    shuffled = images[:]
    rng.shuffle(shuffled)
    if cameras_known:
        by_camera: dict[int, list[str]] = {}
        for path in shuffled:
            by_camera.setdefault(camids[path], []).append(path)
        queues = list(by_camera.values())
        shuffled = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]
    return set(shuffled[:num_query])


def verify_readable(paths: Iterable[str]) -> None:
    """Open every image with PIL; raise naming the first one that cannot be read."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:
            raise DatasetFormatError(f"folder: cannot read image {path}: {error}") from error


def load_folder(
    root: str | Path,
    cameras_csv: str | None = None,
    camera_regex: str | None = None,
    train_fraction: float = 0.5,
    num_query_per_id: int = 1,
    seed: int = 0,
    verify_images: bool = False,
) -> ReIDSplits:
    """Load a dataset laid out as ``root/<identity>/<image files>``.

    The identity folder names, sorted, are the pids ``0 .. num_identities - 1``. A seeded permutation of
    them (independent of the file system's listing order) puts ``round(train_fraction * num_identities)``
    identities in train and the rest in test. Each test identity gives ``num_query_per_id`` images to the
    query split and the rest to the gallery; a test identity with a single image goes to the gallery only
    (a distractor for the other queries), and at least one image of every identity stays in the gallery.

    Args:
        root: the dataset folder.
        cameras_csv: CSV with a header ``path,camid``, one line per image, path relative to ``root``
            (a relative CSV path is looked up in the working directory, then in ``root``). Camera labels
            are mapped to 0-based camids in sorted order.
        camera_regex: regex searched in each file name; the camera is its group ``cam``, else group 1.
        train_fraction: fraction of identities used for training, in ``(0, 1)``.
        num_query_per_id: query images per test identity; with known cameras they are taken from
            different cameras where possible.
        seed: seed of the identity split and of the query choice.
        verify_images: open every image with PIL at load time (slow) and fail on an unreadable one.

    Returns:
        Splits named ``"folder"``. ``meta`` holds ``root``, ``identities`` (folder name -> pid),
        ``train_identities``, ``cameras_known`` and ``cameras`` (camera label -> camid, when known).
        Without camera information each image gets its own camid.

    Raises:
        ValueError: invalid options.
        DatasetFormatError: a layout, CSV or file name problem; the message names the file.
    """
    if cameras_csv is not None and camera_regex is not None:
        raise ValueError("folder: give cameras_csv or camera_regex, not both")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"folder: train_fraction must be in (0, 1), got {train_fraction}")
    if num_query_per_id < 1:
        raise ValueError(f"folder: num_query_per_id must be >= 1, got {num_query_per_id}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetFormatError(f"folder: {root} is not a folder; expected {FOLDER_LAYOUT}")
    root = root.resolve()
    csv_path = None
    if cameras_csv is not None:
        csv_path = Path(cameras_csv).expanduser()
        if not csv_path.is_absolute() and not csv_path.exists():
            csv_path = root / csv_path
        if not csv_path.is_file():
            raise DatasetFormatError(f"folder: cameras_csv {cameras_csv} not found (also tried {csv_path})")

    identities = scan_identities(root, ignore=[csv_path] if csv_path else [])
    names = sorted(identities)
    if len(names) < 2:
        raise DatasetFormatError(
            f"folder: {root} holds {len(names)} identity folder(s); need at least 2 to split train and test"
        )
    image_paths = [f"{name}/{image}" for name in names for image in identities[name]]

    cameras_known = csv_path is not None or camera_regex is not None
    if csv_path is not None:
        labels = read_cameras_csv(csv_path, image_paths, root)
    elif camera_regex is not None:
        labels = cameras_from_regex(camera_regex, image_paths)
    if cameras_known:
        label_to_camid = camera_label_to_camid(labels.values())
        camids = {path: label_to_camid[labels[path]] for path in image_paths}
    else:
        camids = {path: index for index, path in enumerate(image_paths)}

    rng = random.Random(seed)
    order = list(range(len(names)))
    rng.shuffle(order)
    num_train = min(max(round(train_fraction * len(names)), 1), len(names) - 1)
    train_pids = set(order[:num_train])

    def record(path: str, pid: int) -> ImageRecord:
        return ImageRecord(os.path.join(root, path), pid, camids[path])

    train, query, gallery = [], [], []
    for pid, name in enumerate(names):
        paths = [f"{name}/{image}" for image in identities[name]]
        if pid in train_pids:
            train += [record(path, pid) for path in paths]
            continue
        queries = pick_queries(paths, camids, num_query_per_id, rng, cameras_known)
        for path in paths:
            (query if path in queries else gallery).append(record(path, pid))
    if not query:
        raise DatasetFormatError(
            f"folder: no test identity in {root} has 2 or more images, so the query split is empty; "
            f"add images or change train_fraction / seed"
        )
    if verify_images:
        verify_readable(os.path.join(root, path) for path in image_paths)

    meta = {
        "root": str(root),
        "identities": {name: pid for pid, name in enumerate(names)},
        "train_identities": [names[pid] for pid in sorted(train_pids)],
        "cameras_known": cameras_known,
        "seed": seed,
    }
    if cameras_known:
        meta["cameras"] = label_to_camid
    return ReIDSplits(name="folder", train=relabel(train), query=query, gallery=gallery, meta=meta)
