"""Pre-flight check of a dataset's images: every bad file named at once, before any training starts.

A zero-byte gallery image used to surface at the first validation (epochs and no checkpoint later), a truncated
training JPEG mid-epoch. :func:`check_images` decodes every image a stage will read, in a thread pool (PIL
releases the GIL while decoding), JPEGs at 1/8 scale (``Image.draft``: the whole entropy-coded stream is still
read, so truncation is caught; ``Image.verify()`` alone does not catch a truncated JPEG). Images that passed
are cached by file stat (absolute path, size, ``mtime_ns``) in a small JSON file written atomically, so a
second run re-checks only new or changed files.

The cache lives in the dataset folder (``.reid_lab_preflight.json``) when that folder is writable, else
under ``$REID_LAB_CACHE/preflight/`` (default ``~/.cache/reid_lab``); the report of bad files
(``.reid_lab_bad_images.json``) goes next to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from reid_lab.atomic import atomic_write_json
from reid_lab.data.records import DatasetFormatError

logger = logging.getLogger(__name__)

CACHE_NAME = ".reid_lab_preflight.json"
REPORT_NAME = ".reid_lab_bad_images.json"
CACHE_VERSION = 1
MAX_LISTED = 200  # an error lists this many files; the report file lists all of them


class BadImagesError(DatasetFormatError):
    """Images of the dataset cannot be read. ``bad`` maps each path to the reason; the message names them."""

    def __init__(self, message: str, bad: dict[str, str]) -> None:
        super().__init__(message)
        self.bad = bad


def check_image(path: str) -> str | None:
    """Decode one image; ``None`` when it is readable, else why not (empty, truncated, not an image...)."""
    try:
        size = os.stat(path).st_size
    except OSError as err:
        return f"cannot stat: {err.strerror or err}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            if image.width < 1 or image.height < 1:
                return f"image has no pixels ({image.width}x{image.height})"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on bad data
        return f"{type(err).__name__}: {err}"
    return None


def cache_dir_for(dataset_dir: str | Path) -> Path:
    """The folder of the cache and report: the dataset folder if writable, else the user cache."""
    dataset_dir = Path(dataset_dir).resolve()
    if dataset_dir.is_dir() and os.access(dataset_dir, os.W_OK):
        return dataset_dir
    base = Path(os.environ.get("REID_LAB_CACHE") or Path.home() / ".cache" / "reid_lab").expanduser()
    digest = hashlib.sha1(str(dataset_dir).encode()).hexdigest()[:16]
    return base / "preflight" / f"{dataset_dir.name}-{digest}"


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_cache(path: Path) -> dict[str, list[int]]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
        return {}
    entries = payload.get("good")
    return entries if isinstance(entries, dict) else {}


def check_images(
    paths: Iterable[str],
    dataset_dir: str | Path,
    workers: int | None = None,
) -> tuple[dict[str, str], Path | None]:
    """Check every image of ``paths``; returns ``(bad, report)``.

    Args:
        paths: image files (duplicates are checked once).
        dataset_dir: the dataset folder, where the stat cache (and the report) is kept.
        workers: threads (default: ``min(16, 2 x CPUs)``).

    Returns:
        ``bad``: path -> reason, sorted by path, empty when every image is readable; ``report``: the JSON
        file listing the bad images (``None`` when there are none; a stale report is removed).
    """
    paths = sorted({os.path.abspath(p) for p in paths})
    folder = cache_dir_for(dataset_dir)
    cache_file, report_file = folder / CACHE_NAME, folder / REPORT_NAME
    cached = _read_cache(cache_file)
    stats = {p: _stat_key(p) for p in paths}
    todo = [p for p in paths if stats[p] is None or cached.get(p) != stats[p]]
    start = time.perf_counter()
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    if len(todo) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check_image, todo, chunksize=64))
    else:
        reasons = [check_image(p) for p in todo]
    bad = {p: r for p, r in zip(todo, reasons) if r is not None}
    logger.info("pre-flight: %d images, %d checked (%d from the cache) in %.1f s, %d bad",
                len(paths), len(todo), len(paths) - len(todo), time.perf_counter() - start, len(bad))
    good = {p: stats[p] for p in todo if p not in bad and stats[p] is not None}
    if good or any(p in cached for p in bad):
        merged = {p: s for p, s in cached.items() if p not in bad}
        merged.update(good)
        _write_quietly(cache_file, {"version": CACHE_VERSION, "good": merged})
    if not bad:
        report_file.unlink(missing_ok=True)
        return {}, None
    _write_quietly(report_file, {"dataset": str(Path(dataset_dir).resolve()), "num_bad": len(bad),
                                 "bad_images": [{"path": p, "reason": r} for p, r in sorted(bad.items())]})
    return dict(sorted(bad.items())), report_file if report_file.is_file() else None


def _write_quietly(path: Path, payload: dict) -> None:
    # The cache and report are conveniences: an unwritable place must not stop the check itself.
    try:
        atomic_write_json(path, payload, indent=None if path.name == CACHE_NAME else 1)
    except OSError as err:
        logger.warning("pre-flight: cannot write %s (%s)", path, err)


def describe_bad(bad: dict[str, str], report: Path | None) -> str:
    """One line per bad image (at most :data:`MAX_LISTED`), then where the full list is."""
    lines = [f"  - {path}: {reason}" for path, reason in list(bad.items())[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    if report is not None:
        lines.append(f"  (full list: {report})")
    return "\n".join(lines)
