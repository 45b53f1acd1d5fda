"""Ranked lists: what a query retrieves, item by item, marked the way the ReID protocol scores it.

For each query, the ``top_k`` nearest gallery items in ranking order (ties: the smaller gallery index first, as
:func:`~reid_lab.metrics.evaluate_rank` breaks them), each with a mark:

* ``correct``: same identity, another camera (a positive);
* ``junk``: same identity and same camera: the protocol drops it from the ranking (Market-1501 / fast-reid /
  torchreid, ``reid-toolboxes.md`` §3), so it neither helps nor hurts; shown, greyed;
* ``wrong``: another identity that is itself queried;
* ``distractor``: an identity no query has (Market-1501's pid 0 images, the synthetic set's extra gallery ids).

Without camera ids (caption queries, the cross-modal protocol) nothing is junk. The query's AP and its
first-positive rank come from :func:`~reid_lab.metrics.evaluate_rank` on the same distances, so a list and the
numbers printed next to it cannot disagree.

:func:`compare_systems` ranks the same queries in several systems (e.g. an upgrade study's old → old, new → old
and new → new) and orders negatively flipped queries first: right at rank 1 in the reference system, wrong in
another (Yan et al., CVPR'21, the flip that compatible training tries to avoid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from reid_lab.embedding.features import FeatureSet
from reid_lab.metrics import compute_distance, evaluate_rank

MARKS = ("correct", "junk", "wrong", "distractor")


@dataclass
class RankedList:
    """One query's ranking.

    Attributes:
        query: row of the query in its query set.
        item: the query's image path or caption.
        modality: ``"image"`` or ``"text"`` (what ``item`` is).
        pid / camid: the query's identity and camera (camid None without cameras).
        ap: average precision in ``[0, 1]`` under the protocol; NaN when the query has no positive.
        first_match: 0-based rank of the first positive after junk removal (0: a rank-1 hit), -1 without one.
        gallery: the ``top_k`` gallery rows in ranking order (junk included).
        items: their image paths (or captions).
        marks: one of :data:`MARKS` per entry of ``gallery``.
        distances: their distances to the query.
    """

    query: int
    item: str
    modality: str
    pid: int
    camid: int | None
    ap: float
    first_match: int
    gallery: list[int] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """The query has a positive in the gallery (it counts in R1 / mAP)."""
        return self.first_match >= 0

    @property
    def hit(self) -> bool:
        """Rank-1 correct (after junk removal)."""
        return self.first_match == 0


def _marks(q_pid: int, q_camid: int | None, g_pids: np.ndarray, g_camids: np.ndarray | None,
           queried: set[int]) -> list[str]:
    out = []
    for i, pid in enumerate(g_pids.tolist()):
        if pid == q_pid:
            junk = g_camids is not None and q_camid is not None and int(g_camids[i]) == q_camid
            out.append("junk" if junk else "correct")
        else:
            out.append("wrong" if pid in queried else "distractor")
    return out


def rank_lists(query: FeatureSet, gallery: FeatureSet, top_k: int = 10, distance: str = "cosine",
               chunk_size: int = 256) -> list[RankedList]:
    """The ranked list of every query of ``query`` against ``gallery``.

    Args:
        query / gallery: feature sets of one embedding space (query rows / gallery rows of a split).
        top_k: gallery entries kept per query (junk included), at most the gallery size.
        distance: ``"cosine"`` or ``"euclidean"`` (as :func:`~reid_lab.metrics.compute_distance`).
        chunk_size: query rows sorted at a time.

    Returns:
        One :class:`RankedList` per query row, in query order.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if query.features.shape[1] != gallery.features.shape[1]:
        raise ValueError(f"query features are {query.features.shape[1]}-d but gallery features are "
                         f"{gallery.features.shape[1]}-d: they come from different embedding spaces")
    k = min(int(top_k), gallery.features.shape[0])
    use_cams = query.camids is not None and gallery.camids is not None
    q_cams = query.camids if use_cams else None
    g_cams = gallery.camids if use_cams else None
    dist = compute_distance(query.features.float(), gallery.features.float(), metric=distance)
    result = evaluate_rank(dist, query.pids, gallery.pids, q_cams, g_cams, max_rank=1)
    g_pids = gallery.pids.numpy()
    g_camids = None if g_cams is None else g_cams.numpy()
    queried = set(query.pids.tolist())
    q_modality = query.modalities[0]
    lists = []
    for start in range(0, dist.shape[0], chunk_size):
        block = dist[start:start + chunk_size]
        order = torch.sort(block, dim=1, stable=True).indices[:, :k]
        for row, idx in enumerate(order.tolist()):
            q = start + row
            q_pid = int(query.pids[q])
            q_cam = None if q_cams is None else int(q_cams[q])
            sel = np.asarray(idx, dtype=np.int64)
            lists.append(RankedList(
                query=q, item=query.items[q], modality=q_modality, pid=q_pid, camid=q_cam,
                ap=float(result.all_AP[q]), first_match=int(result.first_match_rank[q]),
                gallery=list(idx), items=[gallery.items[i] for i in idx],
                marks=_marks(q_pid, q_cam, g_pids[sel], None if g_camids is None else g_camids[sel], queried),
                distances=[float(v) for v in block[row, sel].tolist()],
            ))
    return lists


def worst_first(lists: Sequence[RankedList]) -> list[RankedList]:
    """Valid queries by AP ascending (later first positive first on ties), queries without a positive last."""
    def key(r: RankedList) -> tuple[int, float, int, int]:
        return (0 if r.valid else 1, r.ap if r.valid else math.inf, -r.first_match, r.query)
    return sorted(lists, key=key)


@dataclass
class SystemComparison:
    """One query ranked by several systems.

    Attributes:
        query: row of the query.
        lists: ``{system: RankedList}`` in the order the systems were given.
        flipped: systems where the query is a negative flip: rank-1 correct in the reference system, wrong here.
    """

    query: int
    lists: dict[str, RankedList]
    flipped: list[str]

    def ap_drop(self, reference: str) -> float:
        """The largest AP loss against the reference system (0 when none is lower)."""
        ref = self.lists[reference].ap
        drops = [ref - r.ap for name, r in self.lists.items() if name != reference and r.valid]
        return max([0.0, *drops])


def compare_systems(systems: Mapping[str, tuple[FeatureSet, FeatureSet]], reference: str, top_k: int = 10,
                    distance: str = "cosine") -> list[SystemComparison]:
    """Rank the same queries in every system; negatively flipped queries first, then by AP loss.

    Args:
        systems: ``{name: (query features, gallery features)}``; every system's queries are the same items in
            the same order (checked), galleries may differ (e.g. an old and a new model's gallery features).
        reference: the system flips are counted against (the old model's).
        top_k / distance: as :func:`rank_lists`.
    """
    if reference not in systems:
        raise ValueError(f"reference system {reference!r} is not one of {list(systems)}")
    ranked = {name: rank_lists(q, g, top_k, distance) for name, (q, g) in systems.items()}
    ref_items = [r.item for r in ranked[reference]]
    for name, lists in ranked.items():
        if [r.item for r in lists] != ref_items:
            raise ValueError(f"system {name!r} ranks other queries than {reference!r} (items differ in content "
                             "or order): compare feature files of the same evaluation split")
    out = []
    for q in range(len(ref_items)):
        lists = {name: ranked[name][q] for name in systems}
        ref = lists[reference]
        flipped = [n for n, r in lists.items() if n != reference and ref.hit and r.valid and not r.hit]
        out.append(SystemComparison(q, lists, flipped))
    return sorted(out, key=lambda c: (0 if c.flipped else 1, -len(c.flipped), -c.ap_drop(reference), c.query))


def as_feature_sets(features: FeatureSet) -> tuple[FeatureSet, FeatureSet]:
    """(query, gallery) of an evaluation-split feature file, refusing one without query rows."""
    if not bool(features.is_query.any()) or bool(features.is_query.all()):
        raise ValueError("the feature file needs query and gallery rows (is_query both True and False): write "
                         "it with `reid-lab predict` on the test split or take it from a study's features/")
    return features.split()
