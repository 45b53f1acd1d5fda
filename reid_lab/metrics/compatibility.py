"""Compatibility matrix between model versions, the empirical criterion, update gain and AC/AM.

For model versions φ_a, φ_b that embed the same query and gallery images, the cell
``M(a, b)`` is the retrieval accuracy with queries embedded by φ_a and the gallery by φ_b
(query model first). The diagonal holds the *self-tests*, ``M(new, old)`` is the *cross-test*
of a backward-compatible upgrade (BCT, Shen et al., CVPR 2020, arXiv 2003.11942).

Example (two identities; the old model puts query 2 nearer identity 1, the compatible one does not):
    >>> import torch
    >>> g_old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> q_old, q_bct = torch.tensor([[1.0, 0.1], [1.0, 0.9]]), torch.tensor([[1.0, 0.0], [0.1, 1.0]])
    >>> versions = [VersionFeatures("old", q_old, g_old), VersionFeatures("bct", q_bct, g_old)]
    >>> matrix = compatibility_matrix(versions, [1, 2], [1, 2], [0, 0], [1, 1])
    >>> matrix.cell("old", "old", "R1"), matrix.cell("bct", "old", "R1")
    (50.0, 100.0)
    >>> compatibility_criterion(matrix, new="bct", old="old")  # M(bct, old) > M(old, old)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from reid_lab.metrics.distance import evaluate_features
from reid_lab.metrics.rank import RankResult

__all__ = [
    "RANK_METRICS",
    "CompatibilityMatrix",
    "VersionFeatures",
    "compatibility_criterion",
    "compatibility_matrix",
    "multi_step_matrix",
    "multi_step_scores",
    "update_gain",
]

#: Keys of ``RankResult.summary()`` stored in every cell, all in percent.
RANK_METRICS = ("R1", "R5", "R10", "mAP", "mINP")


@dataclass(frozen=True)
class VersionFeatures:
    """Features of one model version on the shared query and gallery images.

    All versions of a study embed the *same* images in the same order, so they share
    ``q_pids, g_pids, q_camids, g_camids``.

    Attributes:
        name: version name, e.g. ``"old"``, ``"bct"``, ``"independent"``.
        query: ``(num_query, dim)`` query features.
        gallery: ``(num_gallery, dim)`` gallery features.
    """

    name: str
    query: Tensor
    gallery: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"VersionFeatures.name must be a non-empty string, got {self.name!r}")
        for side in ("query", "gallery"):
            value = getattr(self, side)
            if not isinstance(value, Tensor) or value.ndim != 2:
                shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
                raise ValueError(
                    f"VersionFeatures({self.name!r}).{side} must be a 2-D tensor (n, dim), got {shape}"
                )
        if self.query.shape[1] != self.gallery.shape[1]:
            raise ValueError(
                f"VersionFeatures({self.name!r}): query dim {self.query.shape[1]} != gallery dim {self.gallery.shape[1]}"
            )

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.query.shape[1])


@dataclass
class CompatibilityMatrix:
    """Retrieval accuracy for (query version, gallery version) pairs.

    Attributes:
        versions: version names in matrix order.
        cells: ``{(query_version, gallery_version): {"R1", "R5", "R10", "mAP", "mINP"}}`` in percent.
        not_comparable: ``{(query_version, gallery_version): reason}`` for pairs skipped because
            their embedding dimensions differ.
        distance: distance metric used (``"cosine"`` or ``"euclidean"``...).
        results: the full :class:`RankResult` per computed pair (per-query AP, first match rank),
            kept for flip analysis; not serialised.
    """

    versions: tuple[str, ...]
    cells: dict[tuple[str, str], dict[str, float]]
    not_comparable: dict[tuple[str, str], str] = field(default_factory=dict)
    distance: str = "cosine"
    results: dict[tuple[str, str], RankResult] = field(default_factory=dict, repr=False, compare=False)

    def cell(self, query: str, gallery: str, metric: str = "mAP") -> float:
        """``M(query, gallery)`` for one metric, in percent.

        Raises:
            KeyError: if the pair was not computed or is not comparable, or the metric is unknown.
        """
        key = (query, gallery)
        if key in self.not_comparable:
            raise KeyError(
                f"pair (query={query!r}, gallery={gallery!r}) is not comparable: {self.not_comparable[key]}"
            )
        if key not in self.cells:
            raise KeyError(
                f"pair (query={query!r}, gallery={gallery!r}) was not computed; versions are {list(self.versions)}"
            )
        values = self.cells[key]
        if metric not in values:
            raise KeyError(f"metric must be one of {sorted(values)}, got {metric!r}")
        return float(values[metric])

    def has(self, query: str, gallery: str) -> bool:
        """Whether ``M(query, gallery)`` was computed."""
        return (query, gallery) in self.cells

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inverse of :meth:`from_dict`."""
        return {
            "versions": list(self.versions),
            "distance": self.distance,
            "cells": [
                {"query": q, "gallery": g, **{k: float(v) for k, v in vals.items()}}
                for (q, g), vals in self.cells.items()
            ],
            "not_comparable": [
                {"query": q, "gallery": g, "reason": r} for (q, g), r in self.not_comparable.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompatibilityMatrix:
        """Rebuild a matrix (without per-query results) from :meth:`to_dict` output."""
        cells = {}
        for row in data["cells"]:
            row = dict(row)
            key = (row.pop("query"), row.pop("gallery"))
            cells[key] = {k: float(v) for k, v in row.items()}
        not_comparable = {(r["query"], r["gallery"]): r["reason"] for r in data.get("not_comparable", [])}
        return cls(tuple(data["versions"]), cells, not_comparable, data.get("distance", "cosine"))

    def to_array(self, metric: str = "mAP") -> np.ndarray:
        """``(num_versions, num_versions)`` array, rows = query version, columns = gallery version; NaN where missing."""
        out = np.full((len(self.versions), len(self.versions)), np.nan)
        for i, q in enumerate(self.versions):
            for j, g in enumerate(self.versions):
                if (q, g) in self.cells:
                    out[i, j] = self.cells[(q, g)][metric]
        return out

    def to_markdown(self, metric: str = "mAP", digits: int = 2) -> str:
        """Markdown table: rows = query version, columns = gallery version.

        Missing cells read ``—``, pairs with different dimensions ``n/a``.
        """
        if metric not in RANK_METRICS:
            raise ValueError(f"metric must be one of {RANK_METRICS}, got {metric!r}")
        header = f"| {metric} (%) query ↓ / gallery → | " + " | ".join(self.versions) + " |"
        lines = [header, "|" + "---|" * (len(self.versions) + 1)]
        for q in self.versions:
            row = []
            for g in self.versions:
                if (q, g) in self.cells:
                    row.append(f"{self.cells[(q, g)][metric]:.{digits}f}")
                elif (q, g) in self.not_comparable:
                    row.append("n/a")
                else:
                    row.append("—")
            lines.append(f"| **{q}** | " + " | ".join(row) + " |")
        return "\n".join(lines)


def _normalise_versions(
    versions: Mapping[str, VersionFeatures] | Sequence[VersionFeatures],
) -> dict[str, VersionFeatures]:
    if isinstance(versions, Mapping):
        for key, version in versions.items():
            if not isinstance(version, VersionFeatures):
                raise TypeError(f"versions[{key!r}] must be a VersionFeatures, got {type(version).__name__}")
            if key != version.name:
                raise ValueError(
                    f"versions key {key!r} differs from its VersionFeatures.name {version.name!r}"
                )
        out = dict(versions)
    else:
        out = {}
        for version in versions:
            if not isinstance(version, VersionFeatures):
                raise TypeError(f"versions must contain VersionFeatures, got {type(version).__name__}")
            if version.name in out:
                raise ValueError(f"duplicate version name {version.name!r} in versions")
            out[version.name] = version
    if not out:
        raise ValueError("versions must contain at least one VersionFeatures")
    return out


def _length(values, name: str) -> int:
    shape = getattr(values, "shape", None)
    if shape is not None:
        if len(shape) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(shape)}")
        return int(shape[0])
    return len(values)


def compatibility_matrix(
    versions: Mapping[str, VersionFeatures] | Sequence[VersionFeatures],
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metric: str = "cosine",
    pairs: Iterable[tuple[str, str]] | None = None,
    max_rank: int = 50,
) -> CompatibilityMatrix:
    """Evaluate every (query version a, gallery version b) pair: ``M(a, b)`` (BCT, CVPR 2020).

    Each cell equals ``evaluate_rank(compute_distance(φ_a(query), φ_b(gallery)), ...)`` under the
    Market-1501 protocol (same pid and camid gallery items are junk), summarised as
    R1/R5/R10/mAP/mINP in percent. It is computed block-wise by ``evaluate_features``, so the
    full distance matrix is never held.

    Args:
        versions: ``{name: VersionFeatures}`` (keys must equal the names) or a sequence of them.
        q_pids: ``(num_query,)`` query identity labels.
        g_pids: ``(num_gallery,)`` gallery identity labels.
        q_camids: ``(num_query,)`` query camera ids, or None (with ``g_camids``) for the cross-modal protocol
            (e.g. caption queries against an image gallery: nothing is removed).
        g_camids: ``(num_gallery,)`` gallery camera ids, or None.
        metric: ``"cosine"`` or ``"euclidean"``, see :func:`reid_lab.metrics.distance.compute_distance`.
        pairs: ordered ``(query_version, gallery_version)`` pairs to compute. By default every
            ordered pair including the diagonal; pairs whose dimensions differ are then recorded
            in ``not_comparable`` instead of raising.
        max_rank: length of the CMC curve.

    Returns:
        A :class:`CompatibilityMatrix`.

    Raises:
        ValueError: on shape mismatches, unknown version names in ``pairs``, or an explicitly
            requested pair whose dimensions differ.
    """
    table = _normalise_versions(versions)
    num_query, num_gallery = _length(q_pids, "q_pids"), _length(g_pids, "g_pids")
    if (q_camids is None) != (g_camids is None):
        raise ValueError("give camids for both queries and gallery (ReID protocol) or for neither (cross-modal)")
    if q_camids is not None and _length(q_camids, "q_camids") != num_query:
        raise ValueError(
            f"q_camids must have length num_query={num_query}, got {_length(q_camids, 'q_camids')}"
        )
    if g_camids is not None and _length(g_camids, "g_camids") != num_gallery:
        raise ValueError(
            f"g_camids must have length num_gallery={num_gallery}, got {_length(g_camids, 'g_camids')}"
        )
    for name, version in table.items():
        if version.query.shape[0] != num_query or version.gallery.shape[0] != num_gallery:
            raise ValueError(
                f"version {name!r} has {version.query.shape[0]} query / {version.gallery.shape[0]} gallery features, "
                f"expected {num_query} / {num_gallery} (the length of q_pids / g_pids)"
            )

    explicit = pairs is not None
    if pairs is None:
        pair_list = [(a, b) for a in table for b in table]
    else:
        pair_list = [tuple(p) for p in pairs]
        for pair in pair_list:
            if len(pair) != 2 or any(name not in table for name in pair):
                raise ValueError(
                    f"pairs entries must be (query_version, gallery_version) from {list(table)}, got {pair!r}"
                )

    cells: dict[tuple[str, str], dict[str, float]] = {}
    not_comparable: dict[tuple[str, str], str] = {}
    results: dict[tuple[str, str], RankResult] = {}
    for query_name, gallery_name in pair_list:
        query_version, gallery_version = table[query_name], table[gallery_name]
        if query_version.dim != gallery_version.dim:
            reason = f"dimension {query_version.dim} (query {query_name!r}) != {gallery_version.dim} (gallery {gallery_name!r})"
            if explicit:
                raise ValueError(
                    f"requested pair ({query_name!r}, {gallery_name!r}) is not comparable: {reason}"
                )
            not_comparable[(query_name, gallery_name)] = reason
            continue
        result = evaluate_features(
            query_version.query,
            gallery_version.gallery,
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            metric=metric,
            max_rank=max_rank,
        )
        results[(query_name, gallery_name)] = result
        cells[(query_name, gallery_name)] = {k: float(v) for k, v in result.summary().items()}
    return CompatibilityMatrix(tuple(table), cells, not_comparable, metric, results)


def compatibility_criterion(matrix: CompatibilityMatrix, new: str, old: str, metric: str = "mAP") -> bool:
    """Empirical compatibility criterion ``M(φ_new, φ_old) > M(φ_old, φ_old)`` (BCT, CVPR 2020).

    The cross-test (new queries against the old gallery) must beat the old self-test.

    Args:
        matrix: a :class:`CompatibilityMatrix` holding ``(new, old)`` and ``(old, old)``.
        new: name of the new version.
        old: name of the old version.
        metric: one of :data:`RANK_METRICS`.

    Returns:
        ``True`` when the cross-test is strictly better than the old self-test.
    """
    return matrix.cell(new, old, metric) > matrix.cell(old, old, metric)


def update_gain(
    matrix: CompatibilityMatrix, new: str, old: str, independent: str, metric: str = "mAP"
) -> float:
    """Update gain (BCT, CVPR 2020): share of the achievable improvement reached without backfilling.

        gain = (M(φ_new, φ_old) − M(φ_old, φ_old)) / (M(φ_new*, φ_new*) − M(φ_old, φ_old))

    where φ_new* is the independently trained new model (the upper bound).

    Args:
        matrix: holds ``(new, old)``, ``(old, old)`` and ``(independent, independent)``.
        new: name of the compatible new version.
        old: name of the old version.
        independent: name of the independently trained new version.
        metric: one of :data:`RANK_METRICS`.

    Returns:
        The gain (1 = cross-test as good as the independent self-test, negative = cross-test below
        the old self-test); NaN when the independent model does not improve on the old one
        (zero denominator).
    """
    old_self = matrix.cell(old, old, metric)
    denominator = matrix.cell(independent, independent, metric) - old_self
    if denominator == 0:
        return float("nan")
    return (matrix.cell(new, old, metric) - old_self) / denominator


def multi_step_matrix(matrix: CompatibilityMatrix, chain: Sequence[str], metric: str = "mAP") -> np.ndarray:
    """Lower-triangular multi-step matrix ``C[t][k] = M(φ_t, φ_k)`` for ``k ≤ t`` (CoReS, TPAMI 2023).

    Args:
        matrix: holds every ``(chain[t], chain[k])`` with ``k ≤ t``.
        chain: version names in upgrade order φ_1, …, φ_T.
        metric: one of :data:`RANK_METRICS`.

    Returns:
        ``(T, T)`` float array, NaN above the diagonal.
    """
    chain = list(chain)
    if len(set(chain)) != len(chain):
        raise ValueError(f"chain must not repeat versions, got {chain}")
    size = len(chain)
    out = np.full((size, size), np.nan)
    for t in range(size):
        for k in range(t + 1):
            out[t, k] = matrix.cell(chain[t], chain[k], metric)
    return out


def multi_step_scores(
    matrix: CompatibilityMatrix,
    chain: Sequence[str],
    metric: str = "mAP",
    tie_counts_as_compatible: bool = False,
) -> dict[str, float]:
    """Multi-step compatibility AC and average multi-model accuracy AM (CoReS, Biondi et al., TPAMI 2023).

    With ``C[t][k] = M(φ_t, φ_k)`` for ``k ≤ t`` over T versions:

        AC = (2 / (T (T − 1))) · #{(t, k), k < t : C[t][k] > C[k][k]}
        AM = (2 / (T (T + 1))) · Σ_{k ≤ t} C[t][k]

    Tie handling differs between public codebases: the CoReS code compares with ``>=`` (a tie
    counts as compatible), IAM-CL²R's ``iamcl2r`` code with ``>`` (a tie is a failure, as in the
    formula above). The default follows the formula; pass ``tie_counts_as_compatible=True`` to
    reproduce CoReS numbers.

    Args:
        matrix: holds every ``(chain[t], chain[k])`` with ``k ≤ t``.
        chain: version names in upgrade order (at least two).
        metric: one of :data:`RANK_METRICS`.
        tie_counts_as_compatible: count ``C[t][k] == C[k][k]`` as compatible.

    Returns:
        ``{"AC": fraction in [0, 1], "AM": mean accuracy in the metric's units (percent)}``.
    """
    if len(chain) < 2:
        raise ValueError(f"chain needs at least 2 versions to define AC, got {list(chain)}")
    grid = multi_step_matrix(matrix, chain, metric)
    size = grid.shape[0]
    compatible = 0
    for t in range(1, size):
        for k in range(t):
            cross, self_test = grid[t, k], grid[k, k]
            if cross > self_test or (tie_counts_as_compatible and cross == self_test):
                compatible += 1
    filled = grid[np.tril_indices(size)]
    return {"AC": 2.0 * compatible / (size * (size - 1)), "AM": float(filled.mean())}
