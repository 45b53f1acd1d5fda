"""Negative and positive flips between an old and a new retrieval system.

A *negative flip* is a query that the old system answered correctly and the new one gets wrong
(model regression). The classification definition comes from Positive-Congruent Training
(Yan et al., CVPR 2021, arXiv 2011.09161):

    NFR = (1/N) Σ_i 1[ŷ_o(x_i) = y_i ∧ ŷ_n(x_i) ≠ y_i]

Hot-refresh upgrades (RACT, Zhang et al., ICLR 2022, arXiv 2201.09724) carry it over to retrieval:
each query gets a binary correctness c(q) under the old system (old query, old gallery) and under
the new system (new query, partially backfilled gallery), and

    NFR = (1/|Q|) Σ_q 1[c_old(q) = 1 ∧ c_new(q) = 0],   PFR = (1/|Q|) Σ_q 1[c_old(q) = 0 ∧ c_new(q) = 1].

Two correctness criteria are offered: top-1 (the first retrieved gallery item is a positive,
:func:`top1_correct`) and an AP-based variant in which a query regresses when its average
precision drops (:func:`ap_negative_flips`). All rates are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from reid_lab.metrics.rank import RankResult

__all__ = [
    "ap_flip_rates",
    "ap_negative_flips",
    "ap_positive_flips",
    "flip_rates",
    "negative_flip_impact",
    "negative_flips",
    "positive_flips",
    "relative_nfr",
    "retrieval_flip_rates",
    "top1_correct",
]


def _as_bool_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (num_query,), got shape {array.shape}")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got dtype {array.dtype} with other values")
        array = array.astype(bool)
    return array


def _as_float_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (num_query,), got shape {array.shape}")
    return array


def _check_pair(old_correct, new_correct, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    old = _as_bool_vector(old_correct, "old_correct")
    new = _as_bool_vector(new_correct, "new_correct")
    if old.shape != new.shape:
        raise ValueError(
            f"old_correct and new_correct must have the same shape (num_query,), got {old.shape} and {new.shape}"
        )
    if valid is None:
        mask = np.ones_like(old)
    else:
        mask = _as_bool_vector(valid, "valid")
        if mask.shape != old.shape:
            raise ValueError(f"valid must have shape {old.shape}, got {mask.shape}")
    return old, new, mask


def negative_flips(old_correct, new_correct, valid=None) -> np.ndarray:
    """Indices of queries that were correct under the old system and are wrong under the new one.

    Args:
        old_correct: ``(num_query,)`` bool, correctness under the old system.
        new_correct: ``(num_query,)`` bool, correctness under the new system.
        valid: optional ``(num_query,)`` bool; queries outside it are never reported.

    Returns:
        ``(num_negative_flips,)`` int64 query indices, ascending.

    Example:
        >>> negative_flips([True, True, False], [True, False, True]).tolist()
        [1]
    """
    old, new, mask = _check_pair(old_correct, new_correct, valid)
    return np.flatnonzero(old & ~new & mask).astype(np.int64)


def positive_flips(old_correct, new_correct, valid=None) -> np.ndarray:
    """Indices of queries that were wrong under the old system and are correct under the new one.

    Args:
        old_correct: ``(num_query,)`` bool, correctness under the old system.
        new_correct: ``(num_query,)`` bool, correctness under the new system.
        valid: optional ``(num_query,)`` bool; queries outside it are never reported.

    Returns:
        ``(num_positive_flips,)`` int64 query indices, ascending.
    """
    old, new, mask = _check_pair(old_correct, new_correct, valid)
    return np.flatnonzero(~old & new & mask).astype(np.int64)


def flip_rates(old_correct, new_correct, valid=None) -> dict[str, float]:
    """Negative and positive flip rates over the valid queries (PCT, CVPR 2021; RACT, ICLR 2022).

    ``NFR = #{old correct ∧ new wrong} / #valid`` and ``PFR = #{old wrong ∧ new correct} / #valid``.

    Args:
        old_correct: ``(num_query,)`` bool, correctness under the old system.
        new_correct: ``(num_query,)`` bool, correctness under the new system.
        valid: optional ``(num_query,)`` bool mask of the queries to count (e.g. queries with at
            least one positive in the gallery); all queries when omitted.

    Returns:
        ``{"NFR": float, "PFR": float}`` as fractions in [0, 1].

    Raises:
        ValueError: if no query is valid, or shapes disagree.

    Example:
        >>> flip_rates([1, 1, 0, 0], [1, 0, 1, 0])
        {'NFR': 0.25, 'PFR': 0.25}
    """
    old, new, mask = _check_pair(old_correct, new_correct, valid)
    num_valid = int(mask.sum())
    if num_valid == 0:
        raise ValueError("flip_rates needs at least one valid query, but valid is all False (or empty)")
    return {
        "NFR": float((old & ~new & mask).sum()) / num_valid,
        "PFR": float((~old & new & mask).sum()) / num_valid,
    }


def top1_correct(rank_result: RankResult) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 correctness per query: the first retrieved (non-junk) gallery item is a positive.

    Args:
        rank_result: a :class:`reid_lab.metrics.rank.RankResult`; uses ``first_match_rank``
            (0-based, -1 for skipped queries) and ``valid``.

    Returns:
        ``(correct, valid)``, both ``(num_query,)`` bool. Skipped queries (no positive in the
        gallery) are ``False`` in both arrays.
    """
    first_match_rank = np.asarray(rank_result.first_match_rank)
    valid = np.asarray(rank_result.valid, dtype=bool)
    correct = (first_match_rank == 0) & valid
    return correct, valid.copy()


def _check_ap_pair(old_ap, new_ap, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    old = _as_float_vector(old_ap, "old_ap")
    new = _as_float_vector(new_ap, "new_ap")
    if old.shape != new.shape:
        raise ValueError(
            f"old_ap and new_ap must have the same shape (num_query,), got {old.shape} and {new.shape}"
        )
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    both = ~np.isnan(old) & ~np.isnan(new)
    return old, new, both


def ap_negative_flips(old_ap, new_ap, tol: float = 0.0) -> np.ndarray:
    """AP-based negative flips: queries whose average precision dropped by more than ``tol``.

    The top-1 criterion ignores regressions below rank 1; this variant counts a query as
    regressed when ``new_ap < old_ap - tol``. Queries with NaN AP in either system (skipped,
    no positive in the gallery) are ignored. ``tol`` absorbs numerically equal rankings.

    Args:
        old_ap: ``(num_query,)`` per-query AP under the old system (``RankResult.all_AP``).
        new_ap: ``(num_query,)`` per-query AP under the new system.
        tol: non-negative tolerance, in the units of the AP arrays (fractions).

    Returns:
        ``(num_negative_flips,)`` int64 query indices, ascending.
    """
    old, new, both = _check_ap_pair(old_ap, new_ap, tol)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(both & (new < old - tol)).astype(np.int64)


def ap_positive_flips(old_ap, new_ap, tol: float = 0.0) -> np.ndarray:
    """AP-based positive flips: queries whose AP rose by more than ``tol`` (see :func:`ap_negative_flips`).

    Returns:
        ``(num_positive_flips,)`` int64 query indices, ascending.
    """
    old, new, both = _check_ap_pair(old_ap, new_ap, tol)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(both & (new > old + tol)).astype(np.int64)


def ap_flip_rates(old_ap, new_ap, tol: float = 0.0) -> dict[str, float]:
    """AP-based flip rates over the queries with a defined AP under both systems.

    ``NFR = #{new_ap < old_ap − tol} / #both``, ``PFR = #{new_ap > old_ap + tol} / #both``.

    Args:
        old_ap: ``(num_query,)`` per-query AP under the old system, NaN for skipped queries.
        new_ap: ``(num_query,)`` per-query AP under the new system, NaN for skipped queries.
        tol: non-negative tolerance (fractions of AP).

    Returns:
        ``{"NFR": float, "PFR": float}`` as fractions in [0, 1].

    Raises:
        ValueError: if no query has a defined AP under both systems.
    """
    old, new, both = _check_ap_pair(old_ap, new_ap, tol)
    num_valid = int(both.sum())
    if num_valid == 0:
        raise ValueError("ap_flip_rates needs at least one query with a non-NaN AP in both old_ap and new_ap")
    with np.errstate(invalid="ignore"):
        return {
            "NFR": float((both & (new < old - tol)).sum()) / num_valid,
            "PFR": float((both & (new > old + tol)).sum()) / num_valid,
        }


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
    return value


def relative_nfr(nfr: float, old_error_rate: float, new_error_rate: float) -> float:
    """Relative negative flip rate (ELODI, Zhao et al., "ELODI: Ensemble Logit Difference Inhibition").

    ``NFR_rel = NFR / ((1 − ER_old) · ER_new)``: the observed NFR divided by the NFR expected if
    the old and new errors were independent, so 1 means "no better than chance overlap".

    Args:
        nfr: negative flip rate, fraction in [0, 1].
        old_error_rate: error rate of the old system ER_old, fraction in [0, 1].
        new_error_rate: error rate of the new system ER_new, fraction in [0, 1].

    Returns:
        The relative NFR; NaN when the denominator is 0 (old never right or new never wrong,
        where flips are impossible and the ratio is undefined).
    """
    nfr = _check_rate(nfr, "nfr")
    denominator = (1.0 - _check_rate(old_error_rate, "old_error_rate")) * _check_rate(
        new_error_rate, "new_error_rate"
    )
    return nfr / denominator if denominator > 0 else float("nan")


def negative_flip_impact(nfr: float, new_error_rate: float) -> float:
    """Negative flip impact NFI = NFR / ER_new (Xie et al., ACL 2021): share of new errors that are regressions.

    Args:
        nfr: negative flip rate, fraction in [0, 1].
        new_error_rate: error rate of the new system, fraction in [0, 1].

    Returns:
        NFI in [0, 1]; NaN when ``new_error_rate`` is 0.
    """
    nfr = _check_rate(nfr, "nfr")
    new_error_rate = _check_rate(new_error_rate, "new_error_rate")
    return nfr / new_error_rate if new_error_rate > 0 else float("nan")


def retrieval_flip_rates(
    old_result: RankResult, new_result: RankResult, ap_tol: float = 0.0
) -> dict[str, float]:
    """All flip statistics between two evaluations of the same queries.

    Args:
        old_result: :class:`RankResult` of the old system (old query model, old gallery).
        new_result: :class:`RankResult` of the new system (new query model, current gallery).
        ap_tol: tolerance of the AP-based criterion, see :func:`ap_negative_flips`.

    Returns:
        Fractions ``{"NFR", "PFR", "NFR_AP", "PFR_AP", "relative_NFR", "NFI"}``. The top-1 rates
        count queries valid in both results; the error rates of the relative NFR and NFI are the
        top-1 error rates over the same queries.
    """
    old_correct, old_valid = top1_correct(old_result)
    new_correct, new_valid = top1_correct(new_result)
    if old_correct.shape != new_correct.shape:
        raise ValueError(
            f"old_result and new_result must cover the same queries, got {old_correct.shape[0]} and {new_correct.shape[0]}"
        )
    valid = old_valid & new_valid
    rates = flip_rates(old_correct, new_correct, valid)
    ap_rates = ap_flip_rates(old_result.all_AP, new_result.all_AP, tol=ap_tol)
    num_valid = int(valid.sum())
    old_error = 1.0 - float((old_correct & valid).sum()) / num_valid
    new_error = 1.0 - float((new_correct & valid).sum()) / num_valid
    return {
        "NFR": rates["NFR"],
        "PFR": rates["PFR"],
        "NFR_AP": ap_rates["NFR"],
        "PFR_AP": ap_rates["PFR"],
        "relative_NFR": relative_nfr(rates["NFR"], old_error, new_error),
        "NFI": negative_flip_impact(rates["NFR"], new_error),
    }
