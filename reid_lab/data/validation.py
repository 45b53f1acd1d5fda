"""A validation split carved from the training identities, so that no choice (best epoch, checkpoint, method
setting) reads the test split.

ReID benchmarks ship train / query / gallery only, and toolboxes validate on the test query / gallery; every
"best epoch" picked that way is chosen on test data and reported numbers are optimistic. Here a seeded share of
the *training identities* is held out (:func:`carve_validation_ids`), written as a subset file like the upgrade
splits (``{"paths": [...]}``) and given to a data module as ``val_subset``: those images leave training and
form the validation query / gallery (:func:`validation_query_gallery`), ranked under the same protocol as test.

Query / gallery inside the held-out identities follow Market-1501's construction: for every identity and
camera, the first image (by path) is a query and the rest of the identity's images are the gallery; an
identity seen by one camera only gives no query (the ReID protocol would leave it without a valid match) but
its images stay in the gallery. Without cameras (caption data) the first image of an identity is its query.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

DEFAULT_VAL_FRACTION = 0.15

R = TypeVar("R")


def carve_validation_ids(pids: Sequence[int], fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> set[int]:
    """``round(fraction * #identities)`` identities (at least one) drawn with ``seed`` from the distinct ``pids``.

    >>> sorted(carve_validation_ids([5, 5, 7, 8, 9, 9, 11], fraction=0.4, seed=0)) == sorted(
    ...     carve_validation_ids([11, 9, 8, 7, 5], fraction=0.4, seed=0))
    True
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    ids = np.array(sorted(set(int(p) for p in pids)))
    if len(ids) < 2:
        raise ValueError(f"cannot hold out validation identities from {len(ids)} training identity")
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    chosen = np.random.default_rng(seed).permutation(len(ids))[:count]
    return {int(i) for i in ids[chosen]}


def validation_query_gallery(records: Sequence[R], cameras_known: bool = True) -> tuple[list[R], list[R]]:
    """Split held-out records (with ``path``, ``pid`` and ``camid`` or None) into query and gallery (module
    docstring); both lists keep the records' own order.

    ``cameras_known=False`` (a ``folder`` dataset without camera labels gives every image its own camid, so
    the camids say nothing): the records are split as camera-less ones, the first image of each identity (by
    path) its query and the rest its gallery.
    """
    by_key: dict[tuple[int, int | None], list] = defaultdict(list)
    cameras: dict[int, set] = defaultdict(set)
    for r in records:
        camid = r.camid if cameras_known else None
        by_key[(r.pid, camid)].append(r)
        cameras[r.pid].add(camid)
    queries = set()
    for (pid, camid), group in by_key.items():
        has_cameras = camid is not None
        if has_cameras and len(cameras[pid]) < 2:
            continue  # no other camera: no valid match under the ReID protocol
        if not has_cameras and len(group) < 2:
            continue
        queries.add(id(min(group, key=lambda r: r.path)))
    return [r for r in records if id(r) in queries], [r for r in records if id(r) not in queries]


def check_query_gallery(query: Sequence[R], gallery: Sequence[R], split: str, cameras_known: bool = True) -> None:
    """Refuse a split that cannot be ranked: no query, no gallery, or a query without a positive.

    A positive is a gallery item of the query's identity that the protocol keeps: from another camera when
    cameras are known (same identity and camera is removed, as in Market-1501), any one otherwise.

    Raises:
        ValueError: naming ``split``, the counts and the first query without a positive.
    """
    if not query or not gallery:
        raise ValueError(f"the {split} split has {len(query)} query and {len(gallery)} gallery items; it needs "
                         "both (hold out more identities, or give the data camera labels)")
    kept: dict[int, set] = defaultdict(set)
    for g in gallery:
        kept[g.pid].add(g.camid if cameras_known else None)
    lonely = [q for q in query
              if not (kept.get(q.pid, set()) - ({q.camid} if cameras_known and q.camid is not None else set()))]
    if lonely:
        first = lonely[0]
        raise ValueError(f"the {split} split has {len(lonely)} of {len(query)} queries without a positive in its "
                         f"gallery (e.g. {getattr(first, 'path', first)!r}, identity {first.pid}); every query "
                         "needs a gallery image of its identity"
                         + (" from another camera" if cameras_known else ""))
