"""``generate_synthetic``: draw the whole set and write it as a Market-1501 tree, atomically and cached.

The tree is written into a sibling folder ``<out>.partial-<pid>``; ``manifest.json`` is written last, and
only then is the folder renamed to ``<out>``. A killed run therefore never leaves a half-written ``<out>``,
and its partial folder is removed by the next run. When ``<out>/manifest.json`` already records the same
parameters and generator version, the set is reused as it is.

Files written at ``<out>``:

* ``bounding_box_train/``, ``bounding_box_test/``, ``query/``: JPEGs in Market-1501 naming.
* ``reid_raw.json``: CUHK-PEDES-format captions, two per image, for every *person* image (train, query
  and gallery); distractor and junk images have no identity to describe and are left out.
* ``attributes.json``: per identity ``{"id", "split", <attributes>}``, colours with name and RGB.
* ``manifest.json``: generator name and version, parameters, counts, camera conditions.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from reid_lab.atomic import atomic_write_json
from reid_lab.data.synthetic.attributes import PersonAttributes, sample_identities
from reid_lab.data.synthetic.cameras import CameraStyle, encode_jpeg, sample_camera_style, sample_view
from reid_lab.data.synthetic.captions import describe, tokenize
from reid_lab.data.synthetic.layout import (
    GALLERY_DIR,
    MAX_CAMERAS,
    MIN_IMAGES_PER_ID,
    QUERY_DIR,
    TRAIN_DIR,
    ImageJob,
    num_train_ids,
    plan_dataset,
)
from reid_lab.data.synthetic.render import render_distractor, render_junk, render_person
from reid_lab.data.synthetic.seeds import Stream, rng_for

GENERATOR = "reid_lab.data.synthetic"
GENERATOR_VERSION = 1
"""Bump whenever a change alters any written byte, so cached sets are not silently reused."""

MANIFEST = "manifest.json"
CAPTIONS = "reid_raw.json"
ATTRIBUTES = "attributes.json"
_CHUNK = 64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Context:
    """What every worker needs to draw any image of the set."""

    seed: int
    image_size: tuple[int, int]
    identities: dict[int, PersonAttributes]
    cameras: tuple[CameraStyle, ...]
    root: str


_WORKER_CONTEXT: _Context | None = None


def validate_parameters(
    num_ids: int,
    num_cameras: int,
    seed: int,
    image_size: tuple[int, int],
    images_per_id: tuple[int, int],
    train_fraction: float,
    num_distractors: int,
    num_junk: int,
    workers: int,
) -> None:
    """Raise ``ValueError`` naming the offending value and what was expected."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(num_ids) or num_ids < 2:
        raise ValueError(
            f"num_ids must be an integer >= 2 (one train and one test identity); got {num_ids!r}"
        )
    if not is_int(num_cameras) or not 2 <= num_cameras <= MAX_CAMERAS:
        raise ValueError(
            f"num_cameras must be an integer in 2..{MAX_CAMERAS} (Market-1501 names hold one camera digit, "
            f"and every query needs a second camera); got {num_cameras!r}"
        )
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if len(image_size) != 2 or not all(is_int(v) and v >= 16 for v in image_size):
        raise ValueError(f"image_size must be (height, width) with integers >= 16; got {image_size!r}")
    if (
        len(images_per_id) != 2
        or not all(is_int(v) for v in images_per_id)
        or not MIN_IMAGES_PER_ID <= images_per_id[0] <= images_per_id[1]
    ):
        raise ValueError(
            f"images_per_id must be (min, max) integers with {MIN_IMAGES_PER_ID} <= min <= max (two cameras "
            f"with two images each); got {images_per_id!r}"
        )
    n_train = num_train_ids(num_ids, train_fraction) if isinstance(train_fraction, (int, float)) else -1
    if not 0 < train_fraction < 1 or not 1 <= n_train <= num_ids - 1:
        raise ValueError(
            f"train_fraction must leave at least one train and one test identity out of {num_ids}; "
            f"got {train_fraction!r} ({n_train} train identities)"
        )
    for name, value in (("num_distractors", num_distractors), ("num_junk", num_junk), ("workers", workers)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")


def _draw(job: ImageJob, ctx: _Context) -> list[str] | None:
    """Draw ``job``, write its JPEG under ``ctx.root`` and return its two captions (persons only)."""
    camera = ctx.cameras[job.camid]
    captions = None
    if job.kind == "person":
        attrs = ctx.identities[job.pid]
        rng = rng_for(ctx.seed, Stream.IMAGE, job.pid, job.index)
        view = sample_view(rng, camera)
        pixels = render_person(attrs, camera, view, ctx.image_size, rng)
        captions = describe(attrs, view, rng_for(ctx.seed, Stream.CAPTION, job.pid, job.index))
    elif job.kind == "distractor":
        pixels = render_distractor(camera, ctx.image_size, rng_for(ctx.seed, Stream.DISTRACTOR, job.index))
    else:
        pixels = render_junk(camera, ctx.image_size, rng_for(ctx.seed, Stream.JUNK, job.index))
    Path(ctx.root, job.path).write_bytes(encode_jpeg(pixels, camera.jpeg_quality))
    return captions


def _init_worker(ctx: _Context) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = ctx


def _draw_chunk(jobs: list[ImageJob]) -> list[list[str] | None]:
    assert _WORKER_CONTEXT is not None, "worker started without _init_worker"
    return [_draw(job, _WORKER_CONTEXT) for job in jobs]


def _remove(path: Path) -> None:
    """Remove a file or a folder tree, whichever ``path`` is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove partial / old folders of ``out`` left by runs that are no longer alive."""
    for suffix in (".partial-", ".old-"):
        for folder in out.parent.glob(out.name + suffix + "*"):
            owner = folder.name.rsplit("-", 1)[-1]
            if owner.isdigit() and int(owner) != os.getpid() and _process_alive(int(owner)):
                continue  # another run is writing it right now
            log.info("removing stale folder %s", folder)
            _remove(folder)


def _cached_manifest(out: Path, parameters: dict, force: bool) -> dict | None:
    """The manifest at ``out`` if it records ``parameters``; raise if ``out`` holds something else."""
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
        same = manifest.get("version") == GENERATOR_VERSION and manifest.get("parameters") == parameters
        if same:
            return manifest
        if not force:
            found = manifest.get("parameters") or {}
            changes = [
                f"{key}: {found.get(key)!r} on disk, {value!r} asked"
                for key, value in parameters.items()
                if found.get(key) != value
            ]
            if manifest.get("version") != GENERATOR_VERSION:
                changes.insert(0, f"version: {manifest.get('version')!r} on disk, {GENERATOR_VERSION} here")
            raise FileExistsError(
                f"{out} holds a synthetic set made with other parameters ({'; '.join(changes)}). "
                f"Pass force=True (--force) to replace it, or choose another output folder."
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(
            f"{out} exists and is not a synthetic set (no {MANIFEST}); expected a missing or empty folder. "
            f"Pass force=True (--force) to replace it."
        )
    return None


def generate_synthetic(
    out: str | Path,
    num_ids: int = 300,
    num_cameras: int = 6,
    seed: int = 0,
    image_size: tuple[int, int] = (128, 64),
    images_per_id: tuple[int, int] = (12, 24),
    train_fraction: float = 0.5,
    num_distractors: int = 200,
    num_junk: int = 100,
    workers: int = 0,
    force: bool = False,
) -> dict:
    """Generate (or reuse) a synthetic ReID set in Market-1501 layout with CUHK-PEDES captions.

    Args:
        out: dataset root; the Market folders are created directly inside it.
        num_ids: number of identities; pids ``1 .. num_ids``.
        num_cameras: number of cameras, 2..9.
        seed: dataset seed; the same seed gives byte-identical files whatever ``workers`` is.
        image_size: ``(height, width)`` of every image.
        images_per_id: ``(min, max)`` images per identity, ``min >= 4``.
        train_fraction: fraction of identities (the first ones) used for training.
        num_distractors: gallery images with pid 0 (false detections).
        num_junk: gallery images with pid -1 (bad detections, ignored by the evaluation).
        workers: processes drawing images; 0 draws in this process.
        force: replace an existing ``out`` made with other parameters (or not a synthetic set at all).

    Returns:
        The manifest: ``generator``, ``version``, ``parameters``, ``counts``, ``files``, ``cameras``.

    Raises:
        ValueError: a parameter is out of range.
        FileExistsError: ``out`` holds something else and ``force`` is False.
    """
    image_size, images_per_id = tuple(image_size), tuple(images_per_id)
    validate_parameters(
        num_ids,
        num_cameras,
        seed,
        image_size,
        images_per_id,
        train_fraction,
        num_distractors,
        num_junk,
        workers,
    )
    parameters = {
        "num_ids": num_ids,
        "num_cameras": num_cameras,
        "seed": seed,
        "image_size": list(image_size),
        "images_per_id": list(images_per_id),
        "train_fraction": float(train_fraction),
        "num_distractors": num_distractors,
        "num_junk": num_junk,
    }
    out = Path(out).absolute()
    cached = _cached_manifest(out, parameters, force)
    if cached is not None:
        log.info("reusing the synthetic set at %s", out)
        return cached
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)

    start = time.perf_counter()
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        for folder in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR):
            (partial / folder).mkdir(parents=True)
        manifest = _write_tree(partial, parameters, workers)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            partial.rename(out)
            _remove(old)
        else:
            partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - start
    total = manifest["counts"]["images"]
    log.info(
        "wrote %d images to %s in %.1f s (%.0f images/s)", total, out, seconds, total / max(seconds, 1e-9)
    )
    return manifest


def _write_tree(root: Path, parameters: dict, workers: int) -> dict:
    """Draw every image into ``root``, then the captions, attributes and (last) the manifest."""
    p = parameters
    seed, num_cameras = p["seed"], p["num_cameras"]
    identities = sample_identities(p["num_ids"], seed)
    cameras = tuple(sample_camera_style(seed, camid) for camid in range(num_cameras))
    jobs = plan_dataset(
        p["num_ids"],
        num_cameras,
        seed,
        tuple(p["images_per_id"]),
        p["train_fraction"],
        p["num_distractors"],
        p["num_junk"],
    )
    ctx = _Context(seed, tuple(p["image_size"]), identities, cameras, str(root))
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    if workers:
        with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
            captions = [c for chunk in pool.imap(_draw_chunk, chunks) for c in chunk]
    else:
        captions = [_draw(job, ctx) for job in jobs]

    records = [
        {
            "split": job.split,
            "captions": texts,
            "file_path": job.path,
            "processed_tokens": [tokenize(t) for t in texts],
            "id": job.pid,
        }
        for job, texts in zip(jobs, captions)
        if texts is not None
    ]
    atomic_write_json(root / CAPTIONS, records, indent=None)
    n_train = num_train_ids(p["num_ids"], p["train_fraction"])
    atomic_write_json(
        root / ATTRIBUTES,
        [
            {"id": pid, "split": "train" if pid <= n_train else "test", **a.to_dict()}
            for pid, a in identities.items()
        ],
    )
    folders = Counter(job.path.split("/", 1)[0] for job in jobs)
    kinds = Counter(job.kind for job in jobs)
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "format": "market1501",
        "parameters": p,
        "counts": {
            "images": len(jobs),
            "train_ids": n_train,
            "test_ids": p["num_ids"] - n_train,
            "train_images": folders[TRAIN_DIR],
            "query_images": folders[QUERY_DIR],
            "gallery_images": folders[GALLERY_DIR],
            "distractors": kinds["distractor"],
            "junk": kinds["junk"],
            "captions": 2 * len(records),
        },
        "files": {"captions": CAPTIONS, "attributes": ATTRIBUTES},
        "cameras": [asdict(c) for c in cameras],
    }
    atomic_write_json(root / MANIFEST, manifest)
    return json.loads((root / MANIFEST).read_text(encoding="utf-8"))  # exactly what a cached call returns
