"""LCE alignment and boundary terms against hand-worked numbers and a per-sample loop."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.lce import LCELoss


def naive_lce(new, labels, classifier, centres, bounds, lambda_a, lambda_b) -> tuple[float, float, float]:
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    centres = [unit(c) for c in centres]
    sq = [(a - b) ** 2 for w, c in zip(classifier, centres) for a, b in zip(unit(w), c)]
    align = sum(sq) / len(sq)
    hinge = []
    for n, y in zip(new, labels):
        cos = sum(a * b for a, b in zip(unit(n), centres[y]))
        hinge.append(max(0.0, bounds[y] - cos))
    boundary = sum(hinge) / len(hinge)
    return lambda_a * align + lambda_b * boundary, align, boundary


def test_hand_worked_case() -> None:
    # centres e1, e2; classifier rows (2, 0) -> e1 (no error) and (1, 1) -> (S, S): squared errors
    # S^2 + (1 - S)^2 over 4 entries. Features: (0, 5) label 1 -> cos 1 >= 0.8, hinge 0;
    # (1, 1) label 0 -> cos S, boundary 0.9 -> hinge 0.9 - S.
    s = 1 / math.sqrt(2)
    inputs = CompatibleInputs(
        new_features=torch.tensor([[0.0, 5.0], [1.0, 1.0]], dtype=torch.float64),
        old_features=torch.zeros(2, 2),
        labels=torch.tensor([1, 0]),
        prototypes=torch.eye(2, dtype=torch.float64),
        extras={
            "new_classifier": torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64),
            "boundaries": torch.tensor([0.9, 0.8], dtype=torch.float64),
        },
    )
    out = LCELoss(align_weight=100.0, boundary_weight=2.0)(inputs)
    align = (s**2 + (1 - s) ** 2) / 4
    boundary = (0.0 + 0.9 - s) / 2
    assert out.parts["lce/align"].item() == pytest.approx(align, abs=1e-12)
    assert out.parts["lce/boundary"].item() == pytest.approx(boundary, abs=1e-12)
    assert out.loss.item() == pytest.approx(100 * align + 2 * boundary, abs=1e-12)


def test_matches_naive_loop_and_backpropagates() -> None:
    gen = torch.Generator().manual_seed(0)
    new = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    classifier = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    centres = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bounds = torch.tensor([0.2, 0.9, -0.1], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    inputs = CompatibleInputs(
        new_features=new,
        old_features=torch.zeros(6, 4),
        labels=labels,
        prototypes=centres,
        extras={"new_classifier": classifier, "boundaries": bounds},
    )
    out = LCELoss(align_weight=10.0, boundary_weight=0.5)(inputs)
    expected, align, boundary = naive_lce(
        new.tolist(), labels.tolist(), classifier.tolist(), centres.tolist(), bounds.tolist(), 10.0, 0.5
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.parts["lce/align"].item() == pytest.approx(align, abs=1e-12)
    assert out.parts["lce/boundary"].item() == pytest.approx(boundary, abs=1e-12)
    assert boundary > 0
    out.loss.backward()
    assert new.grad is not None and classifier.grad is not None


@pytest.mark.parametrize("missing", ["new_classifier", "boundaries"])
def test_missing_extras_raise_clear_errors(missing: str) -> None:
    extras = {"new_classifier": torch.eye(2), "boundaries": torch.zeros(2)}
    del extras[missing]
    inputs = CompatibleInputs(
        new_features=torch.ones(1, 2),
        old_features=torch.ones(1, 2),
        labels=torch.tensor([0]),
        prototypes=torch.eye(2),
        extras=extras,
    )
    with pytest.raises(ValueError, match=missing):
        LCELoss()(inputs)


def test_missing_prototypes_is_reported() -> None:
    inputs = CompatibleInputs(
        new_features=torch.ones(1, 2),
        old_features=torch.ones(1, 2),
        labels=torch.tensor([0]),
        extras={"new_classifier": torch.eye(2), "boundaries": torch.zeros(2)},
    )
    with pytest.raises(ValueError, match="prototypes"):
        LCELoss()(inputs)


def test_needs_lists_every_input_read() -> None:
    # the host prepares exactly what `needs` lists: LCE reads both extras as well as the prototypes
    assert LCELoss.needs == {"prototypes", "new_classifier", "boundaries"}
