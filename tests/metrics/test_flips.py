from __future__ import annotations

import math

import numpy as np
import pytest

from reid_lab.metrics.flips import (
    ap_flip_rates,
    ap_negative_flips,
    ap_positive_flips,
    flip_rates,
    negative_flip_impact,
    negative_flips,
    positive_flips,
    relative_nfr,
    retrieval_flip_rates,
    top1_correct,
)
from reid_lab.metrics.rank import evaluate_rank

OLD = np.array([True, True, False, False, True])
NEW = np.array([True, False, True, False, False])


def test_hand_case_five_queries():
    # query 1 and 4: correct -> wrong (negative flips); query 2: wrong -> correct (positive flip)
    assert negative_flips(OLD, NEW).tolist() == [1, 4]
    assert positive_flips(OLD, NEW).tolist() == [2]
    assert flip_rates(OLD, NEW) == {"NFR": 2 / 5, "PFR": 1 / 5}


def test_valid_mask_restricts_numerator_and_denominator():
    valid = np.array([True, True, True, False, False])
    assert negative_flips(OLD, NEW, valid).tolist() == [1]
    rates = flip_rates(OLD, NEW, valid)
    assert rates == pytest.approx({"NFR": 1 / 3, "PFR": 1 / 3})


def test_accepts_0_1_integers_and_torch():
    torch = pytest.importorskip("torch")
    rates = flip_rates(torch.tensor(OLD.astype(int)), NEW.astype(int).tolist())
    assert rates == {"NFR": 2 / 5, "PFR": 1 / 5}


@pytest.mark.parametrize(
    "old, new, valid, match",
    [
        (OLD, NEW[:4], None, "same shape"),
        (OLD, NEW, np.zeros(5, bool), "at least one valid"),
        (np.array([0, 2, 1, 0, 1]), NEW, None, "old_correct must be boolean"),
        (OLD[None], NEW[None], None, "1-D"),
        (OLD, NEW, np.ones(4, bool), "valid must have shape"),
    ],
)
def test_bad_input_is_named(old, new, valid, match):
    with pytest.raises(ValueError, match=match):
        flip_rates(old, new, valid)


def test_ap_based_flips_by_hand():
    old_ap = np.array([0.5, 0.8, np.nan, 0.2])
    new_ap = np.array([0.4, 0.8, 0.9, 0.3])
    assert ap_negative_flips(old_ap, new_ap).tolist() == [0]
    assert ap_positive_flips(old_ap, new_ap).tolist() == [3]
    # query 2 has no AP under the old system: excluded from the denominator
    assert ap_flip_rates(old_ap, new_ap) == pytest.approx({"NFR": 1 / 3, "PFR": 1 / 3})
    assert ap_negative_flips(old_ap, new_ap, tol=0.15).tolist() == []
    assert ap_flip_rates(old_ap, new_ap, tol=0.15) == {"NFR": 0.0, "PFR": 0.0}
    with pytest.raises(ValueError, match="tol"):
        ap_negative_flips(old_ap, new_ap, tol=-1)
    with pytest.raises(ValueError, match="non-NaN"):
        ap_flip_rates([np.nan], [0.3])


def test_relative_nfr_and_nfi_formulas():
    # ELODI: NFR / ((1 - ER_old) * ER_new) = 0.1 / (0.8 * 0.25)
    assert relative_nfr(0.1, 0.2, 0.25) == pytest.approx(0.5)
    assert negative_flip_impact(0.1, 0.25) == pytest.approx(0.4)
    assert math.isnan(relative_nfr(0.0, 0.2, 0.0))
    assert math.isnan(negative_flip_impact(0.0, 0.0))
    with pytest.raises(ValueError, match="old_error_rate"):
        relative_nfr(0.1, 1.5, 0.2)


def _result(distmat):
    # 3 queries (pids 1, 2, 3; camera 0); gallery pids [1, 2, 3, 9] in camera 1; query 3 has a positive too
    return evaluate_rank(
        np.asarray(distmat, dtype=np.float64), [1, 2, 3], [1, 2, 3, 9], [0, 0, 0], [1, 1, 1, 1], max_rank=4
    )


def test_top1_correct_and_retrieval_flip_rates_on_rank_results():
    old = _result([[0.1, 0.5, 0.6, 0.7], [0.5, 0.1, 0.6, 0.7], [0.5, 0.6, 0.9, 0.1]])
    new = _result([[0.5, 0.1, 0.6, 0.7], [0.5, 0.1, 0.6, 0.7], [0.5, 0.6, 0.1, 0.9]])
    correct, valid = top1_correct(old)
    assert correct.tolist() == [True, True, False] and valid.all()
    rates = retrieval_flip_rates(old, new)
    assert rates["NFR"] == pytest.approx(1 / 3) and rates["PFR"] == pytest.approx(1 / 3)
    # AP: query 0 drops 1 -> 1/2, query 2 rises 1/4 -> 1
    assert rates["NFR_AP"] == pytest.approx(1 / 3) and rates["PFR_AP"] == pytest.approx(1 / 3)
    # ER_old = ER_new = 1/3 -> relative NFR = (1/3) / ((2/3) * (1/3))
    assert rates["relative_NFR"] == pytest.approx(1.5)
    assert rates["NFI"] == pytest.approx(1.0)


def test_top1_correct_is_false_for_skipped_queries():
    # query pid 4 has no positive in the gallery -> skipped
    result = evaluate_rank(np.array([[0.1, 0.2], [0.3, 0.4]]), [1, 4], [1, 2], [0, 0], [1, 1], max_rank=2)
    correct, valid = top1_correct(result)
    assert correct.tolist() == [True, False] and valid.tolist() == [True, False]
