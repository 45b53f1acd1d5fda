"""The Market-1501 layout of a synthetic set: which image goes to which folder under which name.

Market-1501 conventions (Zheng et al., ICCV 2015): ``bounding_box_train/``, ``bounding_box_test/`` and
``query/`` hold JPEGs named ``{pid:04d}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg`` with a 1-based camera
digit. Train and test identities are disjoint. For each test identity the query holds one image per camera
it was seen in and the gallery the rest; pid ``0000`` marks distractors and ``-1`` junk, both only in the
gallery. Every identity is seen by at least two cameras with at least two images each, so every query
has a gallery positive from another camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reid_lab.data.synthetic.seeds import Stream, rng_for

TRAIN_DIR = "bounding_box_train"
GALLERY_DIR = "bounding_box_test"
QUERY_DIR = "query"
MAX_CAMERAS = 9
"""Market file names hold the camera in one digit."""

MIN_IMAGES_PER_ID = 4
"""Two cameras times two images: a query and a cross-camera gallery positive for each camera."""


@dataclass(frozen=True)
class ImageJob:
    """One image to draw and where it goes.

    Attributes:
        path: file path relative to the dataset root, e.g. ``query/0151_c2s1_004711_01.jpg``.
        kind: ``"person"``, ``"distractor"`` (pid 0) or ``"junk"`` (pid -1).
        pid: 1-based identity, 0 for distractors, -1 for junk.
        camid: 0-based camera.
        index: image index within the identity (persons) or within its kind (distractors, junk).
    """

    path: str
    kind: str
    pid: int
    camid: int
    index: int

    @property
    def split(self) -> str:
        """``"train"`` for bounding_box_train images, ``"test"`` for query and gallery images."""
        return "train" if self.path.startswith(TRAIN_DIR + "/") else "test"


def market_filename(pid: int, camid: int, frame: int, box: int = 1) -> str:
    """Market-1501 file name; ``camid`` is 0-based and written 1-based.

    >>> market_filename(7, 0, 123)
    '0007_c1s1_000123_01.jpg'
    >>> market_filename(-1, 2, 5, 3)
    '-1_c3s1_000005_03.jpg'
    """
    prefix = "-1" if pid == -1 else f"{pid:04d}"
    return f"{prefix}_c{camid + 1}s1_{frame:06d}_{box:02d}.jpg"


def num_train_ids(num_ids: int, train_fraction: float) -> int:
    """How many of the ``num_ids`` identities (the first ones) are training identities."""
    return int(round(num_ids * train_fraction))


def plan_identity(
    seed: int, pid: int, num_cameras: int, images_per_id: tuple[int, int]
) -> list[tuple[int, int, bool]]:
    """The sightings of one identity: ``(camid, frame, is_query)`` in image-index order.

    The identity is seen by 2 .. ``num_cameras`` cameras, each at least twice, with uneven counts per
    camera; exactly one sighting per camera is marked as the query candidate.
    """
    rng = rng_for(seed, Stream.PLAN, pid)
    low, high = images_per_id
    total = int(rng.integers(low, high + 1))
    most = min(num_cameras, total // 2)
    count = int(rng.integers(2, most + 1))
    cameras = np.sort(rng.choice(num_cameras, size=count, replace=False))
    per_camera = 2 + rng.multinomial(total - 2 * count, rng.dirichlet(np.ones(count)))
    sightings = []
    for camid, n in zip(cameras, per_camera):
        frame = int(rng.integers(1, 50_000))
        query = int(rng.integers(n))
        for k in range(int(n)):
            sightings.append((int(camid), frame, k == query))
            frame += int(rng.integers(5, 200))
    return sightings


def plan_dataset(
    num_ids: int,
    num_cameras: int,
    seed: int,
    images_per_id: tuple[int, int],
    train_fraction: float,
    num_distractors: int,
    num_junk: int,
) -> list[ImageJob]:
    """Every image of the set, in a fixed order (persons by pid, then distractors, then junk).

    Identities ``1 .. num_train_ids`` are training identities; the rest are split into query and gallery.
    Arguments are assumed valid (see ``writer.validate_parameters``).
    """
    n_train = num_train_ids(num_ids, train_fraction)
    jobs = []
    for pid in range(1, num_ids + 1):
        for index, (camid, frame, is_query) in enumerate(
            plan_identity(seed, pid, num_cameras, images_per_id)
        ):
            folder = TRAIN_DIR if pid <= n_train else (QUERY_DIR if is_query else GALLERY_DIR)
            jobs.append(
                ImageJob(f"{folder}/{market_filename(pid, camid, frame)}", "person", pid, camid, index)
            )
    for kind, pid, stream, count in (
        ("distractor", 0, Stream.DISTRACTOR, num_distractors),
        ("junk", -1, Stream.JUNK, num_junk),
    ):
        for index in range(count):
            camid = int(rng_for(seed, Stream.PLAN, int(stream), index).integers(num_cameras))
            name = market_filename(pid, camid, index + 1)
            jobs.append(ImageJob(f"{GALLERY_DIR}/{name}", kind, pid, camid, index))
    return jobs
