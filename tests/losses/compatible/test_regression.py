"""L2 and cosine regression against a per-sample loop of their formulas and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.regression import CosineRegression, L2Regression


def naive_l2(new: torch.Tensor, old: torch.Tensor, normalize: bool) -> float:
    total = 0.0
    for n, o in zip(new.tolist(), old.tolist()):
        if normalize:
            n_norm, o_norm = math.sqrt(sum(x * x for x in n)), math.sqrt(sum(x * x for x in o))
            n, o = [x / n_norm for x in n], [x / o_norm for x in o]
        total += sum((a - b) ** 2 for a, b in zip(n, o))
    return total / len(new)


def naive_cosine(new: torch.Tensor, old: torch.Tensor) -> float:
    total = 0.0
    for n, o in zip(new.tolist(), old.tolist()):
        dot = sum(a * b for a, b in zip(n, o))
        total += 1.0 - dot / (math.sqrt(sum(a * a for a in n)) * math.sqrt(sum(b * b for b in o)))
    return total / len(new)


def make_inputs(seed: int = 0, batch: int = 7, dim: int = 4) -> CompatibleInputs:
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    old = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 2])[:batch]
    return CompatibleInputs(new_features=new, old_features=old, labels=labels)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_l2_matches_loop(normalize: bool, seed: int) -> None:
    inputs = make_inputs(seed)
    out = L2Regression(normalize=normalize)(inputs)
    expected = naive_l2(inputs.new_features, inputs.old_features, normalize)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert out.parts["l2/loss"].item() == pytest.approx(expected, rel=1e-10)
    assert "l2/cos_sim" in out.parts


def test_l2_hand_worked() -> None:
    # orthogonal unit vectors: ||(1,0) - (0,1)||^2 = 2; same direction, different norm: 0 after normalising.
    new = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    old = torch.tensor([[0.0, 1.0], [6.0, 8.0]])
    labels = torch.tensor([0, 1])
    assert L2Regression()(CompatibleInputs(new, old, labels)).loss.item() == pytest.approx(1.0)
    # raw: (1 + 1 + 9 + 16) / 2
    assert L2Regression(normalize=False)(CompatibleInputs(new, old, labels)).loss.item() == pytest.approx(
        13.5
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_cosine_matches_loop(seed: int) -> None:
    inputs = make_inputs(seed)
    out = CosineRegression()(inputs)
    assert out.loss.item() == pytest.approx(naive_cosine(inputs.new_features, inputs.old_features), rel=1e-10)
    assert out.parts["cosine/loss"].item() == pytest.approx(out.loss.item())


def test_cosine_hand_worked_and_half_of_l2() -> None:
    new = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[1.0, 1.0]])
    inputs = CompatibleInputs(new, old, torch.tensor([0]))
    assert CosineRegression()(inputs).loss.item() == pytest.approx(1.0 - 1.0 / math.sqrt(2.0))
    # on normalised features ||n - o||^2 = 2 (1 - cos)
    assert L2Regression()(inputs).loss.item() == pytest.approx(2.0 * (1.0 - 1.0 / math.sqrt(2.0)))


@pytest.mark.parametrize("plugin", [L2Regression(), L2Regression(normalize=False), CosineRegression()])
def test_gradient_reaches_new_features_only(plugin) -> None:
    inputs = make_inputs(2)
    plugin(inputs).loss.backward()
    assert inputs.new_features.grad is not None and inputs.new_features.grad.abs().sum() > 0
    assert inputs.old_features.grad is None


def test_names() -> None:
    assert L2Regression.name == "l2" and CosineRegression.name == "cosine"
