"""Hot-refresh (partial backfilling) evaluation: backfilling curves, orderings, flips along the curve.

Protocol (RACT, Zhang et al., ICLR 2022, arXiv 2201.09724; FastFill, Jaeckle et al., ICLR 2023,
arXiv 2303.04766):

1. Queries are always embedded by the new model φ_new.
2. For a backfill ratio β and an ordering π of the gallery, the first ``⌊β · num_gallery⌋`` items
   of π carry their φ_new feature, the others their stored feature: the raw φ_old feature
   (RACT/AdvBCT, backward compatibility) or the transformed ``h(φ_old)`` feature (FCT/FastFill,
   forward compatibility, ``transformed_old_gallery``).
3. The ReID metrics of the mixed gallery, plotted against β, form the *backfilling curve*;
   β = 0 is the cross-test M(φ_new, φ_old), β = 1 the new self-test M(φ_new, φ_new).
4. Against the old system (φ_old queries, φ_old gallery), each β gets negative/positive flip
   rates (:mod:`reid_lab.metrics.flips`).

Efficiency: nothing is re-embedded and no mixed distance matrix is built. Each block of query rows
gets its query × stored-gallery and query × new-gallery distances once, and
:class:`~reid_lab.metrics.backfill_rank.BackfillRanker` derives from the two blocks the exact
ranking statistics of every β of every ordering (moving only the items whose bucket among the
positives' distances changes when refreshed). The whole 11-point grid costs about two evaluations
instead of eleven; results equal evaluating ``torch.where(refreshed, d_new, d_stored)`` per β.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reid_lab.metrics.backfill_rank import BackfillRanker, refresh_steps
from reid_lab.metrics.distance import (
    TiledDistances,
    budget_cells,
    check_memory_budget,
    evaluate_features,
    reserved_bytes,
    tile_columns,
)
from reid_lab.metrics.flips import ap_negative_flips, negative_flips, retrieval_flip_rates, top1_correct
from reid_lab.metrics.rank import RankResult, clip_max_rank, ids_tensor, optional_camids
from reid_lab.metrics.ranking_engine import QueryStats, ranking_threads

__all__ = [
    "DEFAULT_BACKFILL_RATIOS",
    "UNCERTAINTY_ESTIMATORS",
    "BackfillCurve",
    "backfill_curve",
    "backfill_curves",
    "num_refreshed",
    "old_feature_groups",
    "old_model_uncertainty",
    "order_by_sigma",
    "order_by_uncertainty",
    "order_oracle",
    "order_random",
    "order_round_robin",
]

#: β grid 0, 0.1, …, 1.0 (equally spaced, endpoints included, as FastFill's evaluator).
DEFAULT_BACKFILL_RATIOS: tuple[float, ...] = tuple(k / 10 for k in range(11))

_PERCENT_FLIP_KEYS = ("NFR", "PFR", "NFR_AP", "PFR_AP")

#: Scores of the old classifier's softmax ``p`` accepted by :func:`old_model_uncertainty`, larger = less
#: confident: ``"entropy"`` ``−Σ_c p_c log p_c``, ``"least_confidence"`` ``1 − max_c p_c``, ``"margin"``
#: ``1 − (p_(1) − p_(2))`` (the three classic uncertainty-sampling scores of active learning).
UNCERTAINTY_ESTIMATORS: tuple[str, ...] = ("entropy", "least_confidence", "margin")


# ------------------------------------------------------------------------------------------------ orderings


def _check_permutation(order: Any, num_gallery: int) -> Tensor:
    order = torch.as_tensor(order)
    if order.ndim != 1 or order.shape[0] != num_gallery:
        raise ValueError(
            f"order must be a permutation of shape ({num_gallery},), got shape {tuple(order.shape)}"
        )
    if order.dtype.is_floating_point or order.dtype == torch.bool:
        raise TypeError(f"order must hold integer gallery indices, got {order.dtype}")
    order = order.to(torch.int64)
    seen = torch.zeros(num_gallery, dtype=torch.bool, device=order.device)
    if num_gallery and (int(order.min()) < 0 or int(order.max()) >= num_gallery):
        raise ValueError(
            f"order must hold gallery indices in [0, {num_gallery}), got min {int(order.min())} max {int(order.max())}"
        )
    seen[order] = True
    if not bool(seen.all()):
        raise ValueError(
            "order must be a permutation of range(num_gallery): some gallery indices repeat or are missing"
        )
    return order


def order_random(num_gallery: int, seed: int = 0) -> Tensor:
    """Random backfill order, reproducible by ``seed`` (the baseline of RACT, AdvBCT and FastFill).

    Args:
        num_gallery: gallery size.
        seed: seed of a private ``torch.Generator`` (the global RNG is untouched).

    Returns:
        ``(num_gallery,)`` int64 permutation of the gallery indices.
    """
    if isinstance(num_gallery, bool) or not isinstance(num_gallery, (int, np.integer)) or num_gallery < 0:
        raise ValueError(f"num_gallery must be a non-negative integer, got {num_gallery!r}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_gallery), generator=generator)


def _descending(scores: Any, name: str) -> Tensor:
    scores = torch.as_tensor(scores).detach()
    if scores.ndim != 1:
        raise ValueError(f"{name} must have shape (num_gallery,), got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        scores = scores.double()
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN; cannot order the gallery")
    # stable: ties keep gallery order, so the ordering is deterministic
    return torch.argsort(scores, descending=True, stable=True).cpu()


def order_by_uncertainty(scores: Any) -> Tensor:
    """Refresh the least reliable old gallery features first (uncertainty-based backfilling, RACT, ICLR 2022).

    What the papers and the public code prescribe:

    * RACT (Zhang et al., ICLR 2022, arXiv 2201.09724) introduces uncertainty-based backfilling "to fasten
      accuracy improvements" (abstract): items whose *old* feature is most uncertain are refreshed *first*.
      The abstract credits the reduction of negative flips to the RACT *loss*, not to the ordering. The
      estimator (entropy of the old classifier's softmax on the gallery image) comes from
      ``shared/reference/compatible-learning.md`` §1.2, tagged there as recalled, not checked in the PDF.
    * The official code (TencentARC/OpenCompatible = binjiezhang/RACT_ICLR2022, whole history to
      2022-07-02) has no backfilling order and no hot-refresh evaluation at all; AdvBCT's hot-refresh
      evaluator (``evaluate/eval_hot_refresh.py``) only refreshes random loader batches (seed 100); FastFill's
      (apple/ml-fct ``utils/eval_utils.py``, ``get_backfilling_orders``) offers ``random``, ``distance``
      and ``sigma``, each sorted descending (most uncertain / farthest first), as here.

    So the direction (descending) and the default estimator (:func:`old_model_uncertainty`, entropy) follow
    the paper as far as it can be checked; ``least_confidence`` and ``margin`` are the alternatives.

    Why it can *raise* negative flips on a ReID gallery: the gallery identities are unseen by the old
    classifier, so the score says how much an image looks like one *training* identity rather than many,
    and it is shared by the images of one person (on the synthetic demo the gallery pid explains 44 % of
    the entropy's variance). Any fixed order by such a score, most- or least-uncertain first, refreshes
    some identities whole and leaves others stale; a query whose positives are still old features then
    meets negatives that are already new, and new-to-new negatives outscore new-to-old positives (RACT's
    own account of negative flips). A random order refreshes every identity at the same pace. On the demo
    (BCT) mean NFR is 7.4 % for random, 12.2 % for entropy, 10.3 % for entropy *ascending*, 20.7 % for whole
    identities in random order, and 7.4 % for the entropy order taken round-robin over the gallery pids (AUC
    mAP 52.0 vs 48.1 random; a diagnostic only, a deployed gallery has no pids).

    Args:
        scores: ``(num_gallery,)`` uncertainty of the *old* model on each gallery image, larger =
            less reliable (e.g. :func:`old_model_uncertainty` of the old classifier's logits).

    Returns:
        ``(num_gallery,)`` int64 permutation, scores descending; ties keep gallery order.
    """
    return _descending(scores, "scores")


def old_model_uncertainty(old_logits: Tensor, estimator: str = "entropy") -> Tensor:
    """Uncertainty of the old classifier's softmax ``p`` per gallery image, for RACT's backfilling order.

    ``"entropy"`` (default, RACT as recorded in the reference notes): ``H(p) = −Σ_c p_c log p_c`` in nats,
    in ``[0, log C]``. ``"least_confidence"``: ``1 − max_c p_c``, in ``[0, 1 − 1/C]``. ``"margin"``:
    ``1 − (p_(1) − p_(2))`` with ``p_(1) ≥ p_(2)`` the two largest probabilities, in ``[0, 1]``. All are
    larger for flatter predictions and invariant to a constant added to a row of logits.

    What it measures: ``p`` is a posterior over the old *training* identities. Gallery identities are
    never among them, so the score says whether a gallery image resembles one training identity (peaked)
    or several (flat), not whether the image's own old feature is a good match for its own identity; the
    images of one person tend to share it (see :func:`order_by_uncertainty` for what that does to flips).

    Args:
        old_logits: ``(num_gallery, num_classes)`` logits of the old model.
        estimator: one of :data:`UNCERTAINTY_ESTIMATORS`.

    Returns:
        ``(num_gallery,)`` float64 uncertainties, larger = less confident.

    Example:
        >>> old_model_uncertainty(torch.tensor([[0.0, 0.0], [9.0, 0.0]]), "margin").round(decimals=3)
        tensor([1., 0.], dtype=torch.float64)
    """
    if not isinstance(old_logits, Tensor) or old_logits.ndim != 2:
        shape = tuple(old_logits.shape) if hasattr(old_logits, "shape") else type(old_logits).__name__
        raise ValueError(f"old_logits must be a 2-D tensor (num_gallery, num_classes), got {shape}")
    if estimator not in UNCERTAINTY_ESTIMATORS:
        raise ValueError(f"estimator must be one of {UNCERTAINTY_ESTIMATORS}, got {estimator!r}")
    if estimator == "margin" and old_logits.shape[1] < 2:
        raise ValueError(f"the margin estimator needs at least 2 classes, got {old_logits.shape[1]}")
    log_p = F.log_softmax(old_logits.detach().double(), dim=1)
    p = log_p.exp()
    if estimator == "entropy":
        # 0 · log 0 = 0: a saturated softmax gives log_p = -inf for the other classes
        return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
    if estimator == "least_confidence":
        return 1.0 - p.max(dim=1).values
    top2 = p.topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def order_by_sigma(log_var: Any) -> Tensor:
    """FastFill ordering (ICLR 2023): refresh items with the largest predicted uncertainty σ first.

    FastFill's transformation h predicts ``s = log σ²`` per gallery item; since log is monotone,
    sorting ``s`` descending equals sorting σ descending.

    Args:
        log_var: ``(num_gallery,)`` predicted ``log σ²``, or ``(num_gallery, k)`` per-dimension
            values, averaged over the last dimension.

    Returns:
        ``(num_gallery,)`` int64 permutation, σ descending; ties keep gallery order.
    """
    log_var = torch.as_tensor(log_var).detach()
    if log_var.ndim == 2:
        log_var = log_var.double().mean(dim=1)
    return _descending(log_var, "log_var")


def order_oracle(g_old: Tensor, g_new: Tensor) -> Tensor:
    """Oracle ordering: refresh first the gallery items whose stored feature is farthest from their new one.

    Distance ``‖ĝ_new − ĝ_stored‖₂`` between L2-normalised features of the same gallery image. It
    needs φ_new on the whole gallery, so it is an upper-bound reference, not a deployable policy
    (FastFill's ``distance`` policy). For FCT pass the transformed ``h(φ_old)`` features as
    ``g_old``; dimensions must agree.

    Args:
        g_old: ``(num_gallery, dim)`` stored (old or transformed old) gallery features.
        g_new: ``(num_gallery, dim)`` new gallery features.

    Returns:
        ``(num_gallery,)`` int64 permutation, distance descending; ties keep gallery order.
    """
    if g_old.ndim != 2 or g_old.shape != g_new.shape:
        raise ValueError(
            f"g_old and g_new must both be (num_gallery, dim) with equal shapes, got {tuple(g_old.shape)} and {tuple(g_new.shape)}"
        )
    gap = (F.normalize(g_new.detach().double(), dim=1) - F.normalize(g_old.detach().double(), dim=1)).norm(
        dim=1
    )
    return _descending(gap, "oracle distance")


# ------------------------------------------------------------------------------------------------ the curve


def order_round_robin(scores: Any, groups: Any) -> Tensor:
    """Refresh in rounds over groups: each round takes the next item of every group, groups by their items' score.

    ``order_by_uncertainty`` refreshes whole identities at once on a ReID gallery (the old model's uncertainty is
    shared by the images of one person), and the stale positives of a query then lose to refreshed negatives:
    negative flips rise above random refreshing (see :func:`order_by_uncertainty`). Taking the same scores
    round-robin over groups keeps the most uncertain items first *within* every group while every group
    refreshes at the same pace. Groups are the gallery's identities where the gallery has them (tracklets of a
    tracking system, labelled galleries) or clusters of the old features (:func:`old_feature_groups`) where it
    does not.

    Round ``r`` holds the ``r``-th most uncertain item of every group that has one, ordered by score descending;
    rounds follow each other. Ties keep gallery order.

    Args:
        scores: ``(num_gallery,)`` larger = refresh earlier (e.g. :func:`old_model_uncertainty`).
        groups: ``(num_gallery,)`` integer group of each gallery item.

    Returns:
        ``(num_gallery,)`` int64 permutation.

    >>> order_round_robin(torch.tensor([0.9, 0.8, 0.1, 0.5]), torch.tensor([0, 0, 1, 1])).tolist()
    [0, 3, 1, 2]
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    groups = torch.as_tensor(groups).flatten()
    if groups.shape != scores.shape:
        raise ValueError(f"groups has shape {tuple(groups.shape)} but scores {tuple(scores.shape)}; one group per "
                         "gallery item")
    if not torch.isfinite(scores).all():
        raise ValueError("scores holds NaN or infinite values")
    by_score = _descending(scores, "scores")  # stable: ties keep gallery order
    _, group_index = torch.unique(groups[by_score], return_inverse=True)
    rank_in_group = torch.zeros_like(by_score)
    seen = torch.zeros(int(group_index.max()) + 1 if len(group_index) else 0, dtype=torch.long)
    for position, g in enumerate(group_index.tolist()):  # O(n): the r-th best of its group
        rank_in_group[position] = seen[g]
        seen[g] += 1
    # sort by (round, position in the global score order): stable two-key sort
    key = rank_in_group * len(by_score) + torch.arange(len(by_score))
    return by_score[torch.argsort(key, stable=True)]


def old_feature_groups(g_old: Tensor, num_groups: int, seed: int = 0, iterations: int = 20) -> Tensor:
    """``(num_gallery,)`` k-means cluster of each old gallery feature (cosine, k-means++ seeding with ``seed``):
    the groups of :func:`order_round_robin` for a gallery without identity labels."""
    x = torch.nn.functional.normalize(g_old.detach().float(), dim=1)
    n = x.shape[0]
    k = max(1, min(int(num_groups), n))
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=generator)]
    for _ in range(1, k):  # k-means++
        d = (1 - x @ centres.T).clamp_min(0).min(dim=1).values
        probs = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1 / n)
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=generator)]])
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        assign = (x @ centres.T).argmax(dim=1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.mean(dim=0), dim=0)
    return assign


def _check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(r) for r in ratios)
    if not values:
        raise ValueError("ratios must contain at least one backfill ratio")
    if any(not (0.0 <= r <= 1.0) for r in values):
        raise ValueError(f"ratios must lie in [0, 1], got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"ratios must be strictly increasing, got {list(values)}")
    return values


def num_refreshed(backfill_ratio: float, num_gallery: int) -> int:
    """``⌊β · num_gallery⌋``, robust to float error (``0.29 · 100`` gives 29, not 28)."""
    return min(num_gallery, math.floor(round(backfill_ratio * num_gallery, 9)))


@dataclass
class BackfillCurve:
    """One backfilling curve: metrics of the mixed gallery at each backfill ratio β.

    Attributes:
        ratios: the β grid, strictly increasing in [0, 1].
        num_refreshed: gallery items carrying φ_new features at each β, ``⌊β · num_gallery⌋``.
        values: per-β lists, all in percent: ``"R1", "R5", "R10", "mAP", "mINP"`` and, when the
            old system was given, ``"NFR", "PFR"`` (top-1 criterion), ``"NFR_AP", "PFR_AP"``
            (AP-based criterion) and ``"relative_NFR"`` (ELODI ratio, not a percentage).
        ordering: name of the ordering π, for reports.
        old_self_test: summary (percent) of the old system M(φ_old, φ_old), or ``None``.
        negative_flip_queries: per β, int64 indices of queries that flipped negative (top-1).
        ap_negative_flip_queries: per β, int64 indices of queries whose AP dropped.
    """

    ratios: tuple[float, ...]
    num_refreshed: tuple[int, ...]
    values: dict[str, list[float]]
    ordering: str = ""
    old_self_test: dict[str, float] | None = None
    negative_flip_queries: tuple[np.ndarray, ...] = field(default=(), repr=False)
    ap_negative_flip_queries: tuple[np.ndarray, ...] = field(default=(), repr=False)

    def metric(self, name: str = "mAP") -> np.ndarray:
        """``(len(ratios),)`` values of one metric along the curve."""
        if name not in self.values:
            raise KeyError(f"metric must be one of {sorted(self.values)}, got {name!r}")
        return np.asarray(self.values[name], dtype=np.float64)

    def auc(self, name: str = "mAP") -> float:
        """Area under the backfilling curve, the one definition used everywhere in reid_lab (FastFill, ICLR 2023).

        ``AUC = (1 / K) * sum_k M(β_k)``, the plain mean of the metric over the ``K`` points of the β grid,
        which must be equally spaced from β = 0 to β = 1 (default 0, 0.1, …, 1): FastFill's estimate of
        M̃ = E_{β∼U[0,1]} M(G_{π,β}, Q). Every grid point weighs ``1 / K``, the endpoints included (no trapezoid
        weights): e.g. the curve 10, 60, 70 at β = 0, 0.5, 1 has AUC 140 / 3, not 50.

        Raises:
            ValueError: if the grid is not equally spaced from 0 to 1 with at least two points (a plain mean of
                an uneven grid would not estimate the expectation over β).
        """
        ratios = np.asarray(self.ratios)
        if (
            len(ratios) < 2
            or ratios[0] != 0.0
            or ratios[-1] != 1.0
            or not np.allclose(np.diff(ratios), ratios[1] - ratios[0])
        ):
            raise ValueError(
                f"auc needs an equally spaced ratio grid from 0 to 1 (FastFill's mean over the grid), got "
                f"{list(self.ratios)}"
            )
        return float(self.metric(name).mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (flip query lists as lists of ints); inverse of :meth:`from_dict`."""
        return {
            "ordering": self.ordering,
            "ratios": list(self.ratios),
            "num_refreshed": list(self.num_refreshed),
            "values": {k: [float(v) for v in vs] for k, vs in self.values.items()},
            "old_self_test": self.old_self_test,
            "negative_flip_queries": [q.tolist() for q in self.negative_flip_queries],
            "ap_negative_flip_queries": [q.tolist() for q in self.ap_negative_flip_queries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackfillCurve:
        """Rebuild a curve from :meth:`to_dict` output."""
        return cls(
            ratios=tuple(float(r) for r in data["ratios"]),
            num_refreshed=tuple(int(n) for n in data["num_refreshed"]),
            # None: a value JSON could not hold (NaN, e.g. mINP of a step with no valid query)
            values={k: [float("nan") if v is None else float(v) for v in vs] for k, vs in data["values"].items()},
            ordering=data.get("ordering", ""),
            old_self_test=data.get("old_self_test"),
            negative_flip_queries=tuple(
                np.asarray(q, dtype=np.int64) for q in data.get("negative_flip_queries", [])
            ),
            ap_negative_flip_queries=tuple(
                np.asarray(q, dtype=np.int64) for q in data.get("ap_negative_flip_queries", [])
            ),
        )


def _check_features(features: Any, name: str) -> Tensor:
    if not isinstance(features, Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if hasattr(features, "shape") else type(features).__name__
        raise ValueError(f"{name} must be a 2-D tensor (n, dim), got {shape}")
    return features.detach()


def backfill_curves(
    q_new: Tensor,
    g_old: Tensor | None,
    g_new: Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    orders: Mapping[str, Any],
    ratios: Sequence[float] = DEFAULT_BACKFILL_RATIOS,
    old_system: tuple[Tensor, Tensor] | None = None,
    transformed_old_gallery: Tensor | None = None,
    metric: str = "cosine",
    max_rank: int = 50,
    chunk_size: int = 4096,
    ap_tol: float = 0.0,
    memory_budget: int | None = None,
) -> dict[str, BackfillCurve]:
    """Backfilling curves for several orderings, sharing the two distance matrices.

    Same arguments as :func:`backfill_curve`, with ``orders = {ordering_name: permutation}``.
    The query × stored-gallery and query × new-gallery distances are computed once for all
    orderings and β.

    Returns:
        ``{ordering_name: BackfillCurve}`` in the order of ``orders``.
    """
    q_new = _check_features(q_new, "q_new")
    g_new = _check_features(g_new, "g_new")
    if transformed_old_gallery is not None:
        stored = _check_features(transformed_old_gallery, "transformed_old_gallery")
        stored_name = "transformed_old_gallery"
    elif g_old is not None:
        stored = _check_features(g_old, "g_old")
        stored_name = "g_old"
    else:
        raise ValueError("g_old is required unless transformed_old_gallery is given")
    num_gallery = g_new.shape[0]
    if stored.shape[0] != num_gallery:
        raise ValueError(
            f"{stored_name} has {stored.shape[0]} rows but g_new has {num_gallery}; both embed the same gallery"
        )
    for name, tensor in (("g_new", g_new), (stored_name, stored)):
        if tensor.shape[1] != q_new.shape[1]:
            raise ValueError(
                f"{name} has dim {tensor.shape[1]} but q_new has dim {q_new.shape[1]}; the mixed gallery is searched "
                "with new queries, so both must live in the new space (pass h(old) as transformed_old_gallery for FCT)"
            )
    if not orders:
        raise ValueError("orders must contain at least one ordering")
    checked_orders = {
        name: _check_permutation(order, num_gallery).to(q_new.device) for name, order in orders.items()
    }
    grid = _check_ratios(ratios)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    cmc_depth = clip_max_rank(max_rank, num_gallery)
    # cosine ranks normalised float32 copies of both galleries and of the queries (twice)
    copies = (g_new.numel() + stored.numel() + 2 * q_new.numel()) * 4 if metric == "cosine" else 0
    # plus the orderings: each permutation, its checked copy and refresh steps, and their temporaries (int64)
    reserved = reserved_bytes(num_gallery) + copies + 8 * num_gallery * (4 + 3 * len(orders))
    budget = check_memory_budget(memory_budget, q_new.device, reserved)

    old_result: RankResult | None = None
    old_summary: dict[str, float] | None = None
    if old_system is not None:
        if len(old_system) != 2:
            raise ValueError("old_system must be a (q_old, g_old) pair of feature tensors")
        q_old = _check_features(old_system[0], "old_system[0] (q_old)")
        g_old_system = _check_features(old_system[1], "old_system[1] (g_old)")
        if q_old.shape[0] != q_new.shape[0] or g_old_system.shape[0] != num_gallery:
            raise ValueError(
                f"old_system features cover {q_old.shape[0]} queries / {g_old_system.shape[0]} gallery items, "
                f"expected {q_new.shape[0]} / {num_gallery}"
            )
        old_result = evaluate_features(
            q_old, g_old_system, q_pids, g_pids, q_camids, g_camids, metric=metric, max_rank=max_rank,
            memory_budget=budget,
        )
        old_summary = {k: float(v) for k, v in old_result.summary().items()}
        old_correct, old_valid = top1_correct(old_result)

    counts = tuple(num_refreshed(beta, num_gallery) for beta in grid)
    names = list(checked_orders)
    with ranking_threads():  # the cores left free by other jobs (results do not depend on threads)
        stats = _curve_query_stats(
            q_new,
            stored,
            g_new,
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            torch.stack([refresh_steps(checked_orders[name], counts) for name in names]),
            len(counts),
            metric,
            budget,
            reserved,
        )

    curves: dict[str, BackfillCurve] = {}
    for name, per_step in zip(names, stats):
        values: dict[str, list[float]] = {}
        flips: list[np.ndarray] = []
        ap_flips: list[np.ndarray] = []
        for step_stats in per_step:
            result = RankResult.from_query_stats(step_stats, cmc_depth)
            for key, value in result.summary().items():
                values.setdefault(key, []).append(float(value))
            if old_result is not None:
                rates = retrieval_flip_rates(old_result, result, ap_tol=ap_tol)
                for key in _PERCENT_FLIP_KEYS:
                    values.setdefault(key, []).append(100.0 * rates[key])
                values.setdefault("relative_NFR", []).append(rates["relative_NFR"])
                new_correct, new_valid = top1_correct(result)
                flips.append(negative_flips(old_correct, new_correct, old_valid & new_valid))
                ap_flips.append(ap_negative_flips(old_result.all_AP, result.all_AP, tol=ap_tol))
        curves[name] = BackfillCurve(
            ratios=grid,
            num_refreshed=counts,
            values=values,
            ordering=name,
            old_self_test=dict(old_summary) if old_summary is not None else None,
            negative_flip_queries=tuple(flips),
            ap_negative_flip_queries=tuple(ap_flips),
        )
    return curves


BACKFILL_ELEMENT_BYTES = 112
BACKFILL_ROWS = 256  # query rows per block of a backfill curve (both galleries' tiles and every step's histograms)


def _normalized_pair(query: Tensor, gallery: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Query and gallery in their common float dtype, L2-normalised for cosine, as ``compute_distance`` does."""
    dtype = torch.promote_types(*(t.dtype if t.dtype == torch.float64 else torch.float32 for t in (query, gallery)))
    query, gallery = query.to(dtype), gallery.to(dtype)
    if metric == "cosine":
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    return query, gallery


def _curve_query_stats(
    q_new: Tensor,
    stored: Tensor,
    g_new: Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    steps: Tensor,
    num_steps: int,
    metric: str,
    memory_budget: int,
    reserved: int,
) -> list[list[QueryStats]]:
    """``stats[o][k]`` of all queries, for ordering ``o`` at grid step ``k``, one pass over query blocks.

    Each block of up to 256 query rows gets its stored-gallery and new-gallery distances once, tile by tile
    (:class:`~reid_lab.metrics.distance.TiledDistances`, within ``memory_budget``); a
    :class:`~reid_lab.metrics.backfill_rank.BackfillBlock` turns the tiles into the stats of every step of every
    ordering. The stats do not depend on the budget nor on the thread count.
    """
    num_query, num_gallery = q_new.shape[0], g_new.shape[0]
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"no valid query: {num_query} query and {num_gallery} gallery features")
    device = q_new.device
    q_stored, stored = _normalized_pair(q_new, stored, metric)
    q_fresh, g_new = _normalized_pair(q_new, g_new, metric)
    qp = ids_tensor(q_pids, "q_pids", num_query, device)
    gp = ids_tensor(g_pids, "g_pids", num_gallery, device)
    qc, gc = optional_camids(q_camids, g_camids, num_query, num_gallery, device)
    ranker = BackfillRanker(gp, gc, steps.to(device), num_steps,
                            num_cells=budget_cells(memory_budget, num_gallery, reserved, BACKFILL_ROWS))
    # Two galleries share the budget: each tile pair is two distance tiles plus the ranker's scratch.
    # Per element of a tile pair, worst case (every item a candidate, i.e. between the row's thresholds): the
    # two distances, their max/min, masks, and ~12 int64 / float index arrays of the candidates' bucketing.
    columns = tile_columns(memory_budget, num_gallery, q_fresh.dtype.itemsize, ranker.num_cells,
                           reserved=reserved, element_bytes=BACKFILL_ELEMENT_BYTES, product_rows=BACKFILL_ROWS,
                           rank_rows=BACKFILL_ROWS)
    sq = (lambda g: torch.linalg.vector_norm(g, dim=1).square()) if metric == "euclidean" else (lambda g: None)
    old_side = TiledDistances(q_stored, stored, sq(stored), columns, BACKFILL_ROWS)
    new_side = TiledDistances(q_fresh, g_new, sq(g_new), columns, BACKFILL_ROWS)
    parts: list[list[list[QueryStats]]] = [[[] for _ in range(num_steps)] for _ in range(steps.shape[0])]
    for (start, rows), _ in zip(old_side.blocks(), new_side.blocks(), strict=True):
        block_qc = None if qc is None else qc[start : start + rows]
        pairs = ranker._ranker.positive_and_junk_pairs(qp[start : start + rows], block_qc)
        pair_rows, pair_cols = torch.cat([pairs[0], pairs[2]]), torch.cat([pairs[1], pairs[3]])
        d_old, d_new = old_side.pairs(pair_rows, pair_cols), new_side.pairs(pair_rows, pair_cols)
        num_pos = pairs[0].numel()
        block = ranker.start(rows, pairs, d_old[:num_pos], d_new[:num_pos], d_old[num_pos:], d_new[num_pos:])
        for (c0, tile_old), (_, tile_new) in zip(old_side.block_tiles(), new_side.block_tiles(), strict=True):
            block.add_tile(tile_old, tile_new, c0)
        for per_step, block_steps in zip(parts, block.finish()):
            for acc, part in zip(per_step, block_steps):
                acc.append(part)
    return [[QueryStats.concat(acc) for acc in per_step] for per_step in parts]


def backfill_curve(
    q_new: Tensor,
    g_old: Tensor | None,
    g_new: Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    order: Any,
    ratios: Sequence[float] = DEFAULT_BACKFILL_RATIOS,
    old_system: tuple[Tensor, Tensor] | None = None,
    transformed_old_gallery: Tensor | None = None,
    metric: str = "cosine",
    max_rank: int = 50,
    chunk_size: int = 4096,
    ap_tol: float = 0.0,
    ordering: str = "",
    memory_budget: int | None = None,
) -> BackfillCurve:
    """Backfilling curve of a hot-refresh upgrade (RACT, ICLR 2022; FastFill, ICLR 2023).

    At each β the gallery item ``order[i]`` carries its φ_new feature for ``i < ⌊β·num_gallery⌋``
    and its stored feature otherwise; queries are φ_new. Distances are ``compute_distance``
    with ``metric`` (default cosine = 1 − cos of L2-normalised features).

    Args:
        q_new: ``(num_query, dim)`` queries embedded by φ_new.
        g_old: ``(num_gallery, dim)`` stored old gallery features φ_old (may be ``None`` when
            ``transformed_old_gallery`` is given).
        g_new: ``(num_gallery, dim)`` gallery embedded by φ_new.
        q_pids: ``(num_query,)`` query pids.
        g_pids: ``(num_gallery,)`` gallery pids.
        q_camids: ``(num_query,)`` query camera ids, or ``None`` with ``g_camids`` (cross-modal protocol, no
            junk removal; see :func:`~reid_lab.metrics.rank.evaluate_rank`).
        g_camids: ``(num_gallery,)`` gallery camera ids, or ``None``.
        order: ``(num_gallery,)`` permutation π of the gallery indices (see ``order_*``).
        ratios: strictly increasing β grid in [0, 1]; default 0, 0.1, …, 1.
        old_system: optional ``(q_old, g_old)`` features of the old system, for flip rates.
        transformed_old_gallery: ``(num_gallery, dim)`` ``h(φ_old)`` features (FCT/FastFill);
            when given they replace ``g_old`` as the not-yet-refreshed gallery.
        metric: distance passed to ``compute_distance``.
        max_rank: CMC depth.
        chunk_size: superseded by ``memory_budget`` (validated, no longer used: blocks are up to 256 query rows in
            gallery tiles sized by the budget).
        ap_tol: tolerance of the AP-based flip criterion.
        ordering: name stored in the curve (for reports).
        memory_budget: bytes of working memory beyond the inputs (both distance tiles and the ranking state);
            ``None``: :func:`~reid_lab.metrics.distance.default_memory_budget`. The curve does not depend on it.

    Returns:
        A :class:`BackfillCurve` (metrics in percent).

    Example:
        >>> order = order_random(len(g_pids), seed=0)  # doctest: +SKIP
        >>> curve = backfill_curve(q_new, g_old, g_new, q_pids, g_pids, q_camids, g_camids, order)  # doctest: +SKIP
        >>> curve.auc("mAP")  # doctest: +SKIP
    """
    return backfill_curves(
        q_new,
        g_old,
        g_new,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        {ordering: order},
        ratios=ratios,
        old_system=old_system,
        transformed_old_gallery=transformed_old_gallery,
        metric=metric,
        max_rank=max_rank,
        chunk_size=chunk_size,
        ap_tol=ap_tol,
        memory_budget=memory_budget,
    )[ordering]
