from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_lab.metrics.compatibility import (
    CompatibilityMatrix,
    VersionFeatures,
    compatibility_criterion,
    compatibility_matrix,
    multi_step_matrix,
    multi_step_scores,
    update_gain,
)
from reid_lab.metrics.rank import evaluate_rank_reference

NUM_IDS, DIM = 10, 16


def _split(seed: int = 0):
    """10 identities; query: 1 image per id in camera 0; gallery: 3 per id in cameras 1, 2, 0 (the last is junk)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_IDS, DIM))
    q_pids = np.arange(NUM_IDS)
    g_pids = np.repeat(np.arange(NUM_IDS), 3)
    q_camids = np.zeros(NUM_IDS, dtype=np.int64)
    g_camids = np.tile([1, 2, 0], NUM_IDS)
    return rng, centres, q_pids, g_pids, q_camids, g_camids


def _embed(rng, centres, pids, noise):
    return centres[pids] + noise * rng.standard_normal((len(pids), centres.shape[1]))


@pytest.fixture(scope="module")
def study():
    rng, centres, q_pids, g_pids, q_camids, g_camids = _split()
    old_q, old_g = _embed(rng, centres, q_pids, 0.9), _embed(rng, centres, g_pids, 0.9)
    new_q, new_g = _embed(rng, centres, q_pids, 0.1), _embed(rng, centres, g_pids, 0.1)
    rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    features = {
        "old": (old_q, old_g),
        # same space, much less noise: the cross-test must beat the old self-test
        "new": (new_q, new_g),
        # old model plus a tiny perturbation: cross-test ~ old self-test
        "near_old": (
            old_q + 1e-4 * rng.standard_normal(old_q.shape),
            old_g + 1e-4 * rng.standard_normal(old_g.shape),
        ),
        # a new model in a randomly rotated space: good self-test, cross-test near chance
        "independent": (new_q @ rotation, new_g @ rotation),
        "wide": (rng.standard_normal((NUM_IDS, 24)), rng.standard_normal((3 * NUM_IDS, 24))),
    }
    versions = {
        name: VersionFeatures(
            name, torch.tensor(q, dtype=torch.float32), torch.tensor(g, dtype=torch.float32)
        )
        for name, (q, g) in features.items()
    }
    matrix = compatibility_matrix(versions, q_pids, g_pids, q_camids, g_camids)
    return features, versions, matrix, (q_pids, g_pids, q_camids, g_camids)


def _cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return 1.0 - query @ gallery.T


def test_every_cell_matches_a_direct_reference_evaluation(study):
    features, _, matrix, labels = study
    assert set(matrix.not_comparable) == {(a, "wide") for a in features if a != "wide"} | {
        ("wide", b) for b in features if b != "wide"
    }
    assert len(matrix.cells) == 4 * 4 + 1
    for (query_name, gallery_name), cell in matrix.cells.items():
        distmat = _cosine_distance(features[query_name][0], features[gallery_name][1])
        expected = evaluate_rank_reference(distmat, *labels).summary()
        assert cell == pytest.approx(expected, abs=1e-6), (query_name, gallery_name)


def test_criterion_holds_for_compatible_and_fails_for_independent(study):
    _, _, matrix, _ = study
    assert compatibility_criterion(matrix, new="new", old="old")
    assert not compatibility_criterion(matrix, new="independent", old="old")
    assert matrix.cell("independent", "independent") > matrix.cell("old", "old")
    # chance level: 2 positives among 29 kept gallery items
    assert matrix.cell("independent", "old") < 0.6 * matrix.cell("old", "old")
    assert abs(matrix.cell("near_old", "old") - matrix.cell("old", "old")) < 0.5


def test_update_gain_matches_hand_formula(study):
    _, _, matrix, _ = study
    m = {k: matrix.cell(*k) for k in [("new", "old"), ("old", "old"), ("independent", "independent")]}
    expected = (m["new", "old"] - m["old", "old"]) / (m["independent", "independent"] - m["old", "old"])
    assert update_gain(matrix, "new", "old", "independent") == pytest.approx(expected)


def _hand_matrix(values: dict[tuple[str, str], float]) -> CompatibilityMatrix:
    versions = tuple(dict.fromkeys(name for pair in values for name in pair))
    return CompatibilityMatrix(versions, {pair: {"mAP": v, "R1": v} for pair, v in values.items()})


def test_update_gain_by_hand_and_zero_denominator():
    matrix = _hand_matrix({("old", "old"): 40.0, ("new", "old"): 45.0, ("ind", "ind"): 60.0})
    assert update_gain(matrix, "new", "old", "ind") == pytest.approx(0.25)
    flat = _hand_matrix({("old", "old"): 40.0, ("new", "old"): 45.0, ("ind", "ind"): 40.0})
    assert math.isnan(update_gain(flat, "new", "old", "ind"))


def test_criterion_is_strict_a_tie_is_not_compatible():
    # BCT's criterion M(new, old) > M(old, old): a cross-test equal to the old self-test does not pass.
    tie = _hand_matrix({("old", "old"): 40.0, ("new", "old"): 40.0})
    assert compatibility_criterion(tie, "new", "old") is False
    assert compatibility_criterion(tie, "new", "old", metric="R1") is False
    above = _hand_matrix({("old", "old"): 40.0, ("new", "old"): 40.0 + 1e-9})
    assert compatibility_criterion(above, "new", "old") is True
    below = _hand_matrix({("old", "old"): 40.0, ("new", "old"): 39.0})
    assert compatibility_criterion(below, "new", "old") is False


def test_ac_am_on_hand_made_matrix_with_a_tie():
    # C = [[50], [52, 60], [50, 58, 70]]: (2,1) compatible, (3,1) tie, (3,2) fails
    matrix = _hand_matrix(
        {
            ("v1", "v1"): 50.0,
            ("v2", "v1"): 52.0,
            ("v2", "v2"): 60.0,
            ("v3", "v1"): 50.0,
            ("v3", "v2"): 58.0,
            ("v3", "v3"): 70.0,
        }
    )
    grid = multi_step_matrix(matrix, ["v1", "v2", "v3"])
    assert np.isnan(grid[0, 1]) and grid[2, 1] == 58.0
    strict = multi_step_scores(matrix, ["v1", "v2", "v3"])
    assert strict["AC"] == pytest.approx(1 / 3)
    assert strict["AM"] == pytest.approx((50 + 52 + 60 + 50 + 58 + 70) / 6)
    lenient = multi_step_scores(matrix, ["v1", "v2", "v3"], tie_counts_as_compatible=True)
    assert lenient["AC"] == pytest.approx(2 / 3) and lenient["AM"] == strict["AM"]
    with pytest.raises(ValueError, match="at least 2"):
        multi_step_scores(matrix, ["v1"])
    with pytest.raises(KeyError, match="not computed"):
        multi_step_scores(matrix, ["v2", "v1"])  # needs M(v1, v2)


def test_serialisation_and_markdown(study):
    _, _, matrix, _ = study
    again = CompatibilityMatrix.from_dict(matrix.to_dict())
    assert again == matrix
    table = matrix.to_markdown("mAP")
    assert table.splitlines()[0].startswith("| mAP (%) query")
    assert f"{matrix.cell('new', 'old'):.2f}" in table
    assert "n/a" in table
    with pytest.raises(KeyError, match="not comparable"):
        matrix.cell("wide", "old")
    with pytest.raises(KeyError, match="metric"):
        matrix.cell("old", "old", "accuracy")


def test_explicit_pairs_and_bad_input(study):
    _, versions, _, labels = study
    only = compatibility_matrix(versions, *labels, pairs=[("new", "old")])
    assert list(only.cells) == [("new", "old")]
    with pytest.raises(ValueError, match="not comparable"):
        compatibility_matrix(versions, *labels, pairs=[("wide", "old")])
    with pytest.raises(ValueError, match="pairs entries"):
        compatibility_matrix(versions, *labels, pairs=[("new", "missing")])
    q_pids, g_pids, q_camids, g_camids = labels
    with pytest.raises(ValueError, match="expected 10 / 29"):
        compatibility_matrix(versions, q_pids, g_pids[:-1], q_camids, g_camids[:-1])
    with pytest.raises(ValueError, match="differs from its VersionFeatures.name"):
        compatibility_matrix({"other": versions["old"]}, *labels)
    with pytest.raises(ValueError, match="query dim 4 != gallery dim 5"):
        VersionFeatures("bad", torch.zeros(2, 4), torch.zeros(3, 5))


def test_cross_modal_matrix_without_camids_matches_the_reference():
    """Caption queries of the new model against an old image gallery: no camera filter (text-to-person)."""
    g = torch.Generator().manual_seed(5)
    q_pids, g_pids = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 0, 1, 2, 2, 1, 3])
    versions = {name: VersionFeatures(name, torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g))
                for name in ("old", "new")}
    matrix = compatibility_matrix(versions, q_pids, g_pids, None, None)
    q = torch.nn.functional.normalize(versions["new"].query, dim=1)
    gal = torch.nn.functional.normalize(versions["old"].gallery, dim=1)
    reference = evaluate_rank_reference(1 - q @ gal.T, q_pids, g_pids)
    assert matrix.cell("new", "old") == pytest.approx(100 * reference.mAP, abs=1e-4)
    with pytest.raises(ValueError, match="for both queries and gallery"):
        compatibility_matrix(versions, q_pids, g_pids, torch.zeros(5), None)
