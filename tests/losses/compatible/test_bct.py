"""BCT influence loss (Shen et al., CVPR 2020) and its prototype form against loops of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.bct import BCTInfluenceLoss, BCTPrototypeLoss


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def naive_ce(
    new: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 1.0,
    cosine: bool = False,
    smoothing: float = 0.0,
    rows: list[int] | None = None,
) -> float | None:
    """Mean over samples with a usable row of -log softmax; ``rows`` = usable rows (all by default)."""
    weights = classifier.tolist()
    rows = list(range(len(weights))) if rows is None else rows
    losses = []
    for n, y in zip(new.tolist(), labels.tolist()):
        if y not in rows:
            continue
        if cosine:
            n = unit(n)
        logits = {}
        for k in rows:
            w = unit(weights[k]) if cosine else weights[k]
            logits[k] = scale * sum(a * b for a, b in zip(n, w))
        log_z = math.log(sum(math.exp(z) for z in logits.values()))
        nll = {k: log_z - z for k, z in logits.items()}
        losses.append((1 - smoothing) * nll[y] + smoothing / len(rows) * sum(nll.values()))
    return sum(losses) / len(losses) if losses else None


def make_inputs(seed: int = 0, num_classes: int = 5, **kwargs) -> CompatibleInputs:
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    old = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    classifier = torch.randn(num_classes, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 2, 4, 3, 2, 0])
    return CompatibleInputs(new, old, labels, **{kwargs.pop("field", "old_classifier"): classifier}, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "kwargs, scale, cosine",
    [
        ({}, 1.0, False),
        ({"scale": 2.5}, 2.5, False),
        ({"normalize": True}, 30.0, True),
        ({"normalize": True, "scale": 16.0}, 16.0, True),
    ],
)
def test_influence_matches_loop(seed: int, kwargs: dict, scale: float, cosine: bool) -> None:
    inputs = make_inputs(seed)
    out = BCTInfluenceLoss(**kwargs)(inputs)
    expected = naive_ce(inputs.new_features, inputs.old_classifier, inputs.labels, scale, cosine)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct/loss"].item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct/valid_fraction"].item() == 1.0


def test_influence_label_smoothing_matches_loop() -> None:
    inputs = make_inputs(4)
    out = BCTInfluenceLoss(label_smoothing=0.1)(inputs)
    expected = naive_ce(inputs.new_features, inputs.old_classifier, inputs.labels, smoothing=0.1)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)


def test_influence_hand_worked() -> None:
    # n = (1, 0), W = I: logits (1, 0); label 0 -> log(1 + e^-1); label 1 -> log(1 + e).
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    classifier = torch.eye(2)
    out = BCTInfluenceLoss()(
        CompatibleInputs(new, new.clone(), torch.tensor([0, 1]), old_classifier=classifier)
    )
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.parts["bct/accuracy"].item() == pytest.approx(0.5)


def test_influence_drops_labels_without_row() -> None:
    inputs = make_inputs(0, num_classes=3)  # labels 3 and 4 have no row
    out = BCTInfluenceLoss()(inputs)
    expected = naive_ce(inputs.new_features, inputs.old_classifier, inputs.labels)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct/valid_fraction"].item() == pytest.approx(6 / 8)


def test_influence_no_valid_sample_gives_zero_with_graph() -> None:
    inputs = make_inputs(0, num_classes=3)
    inputs.labels = torch.tensor([3, 4, 5, 3, 4, 5, 3, 4])
    out = BCTInfluenceLoss()(inputs)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert out.parts["bct/valid_fraction"].item() == 0.0


def test_influence_gradients_reach_new_features_only() -> None:
    inputs = make_inputs(1)
    inputs.old_features.requires_grad_(True)
    BCTInfluenceLoss()(inputs).loss.backward()
    assert inputs.new_features.grad is not None and inputs.new_features.grad.abs().sum() > 0
    assert inputs.old_classifier.grad is None and inputs.old_features.grad is None


def test_influence_needs_old_classifier() -> None:
    inputs = make_inputs(0, field="prototypes")
    with pytest.raises(ValueError, match="old_classifier"):
        BCTInfluenceLoss()(inputs)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("scale", [30.0, 10.0])
def test_prototype_matches_loop(seed: int, scale: float) -> None:
    inputs = make_inputs(seed, field="prototypes")
    out = BCTPrototypeLoss(scale=scale)(inputs)
    expected = naive_ce(inputs.new_features, inputs.prototypes, inputs.labels, scale, cosine=True)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct_proto/valid_fraction"].item() == 1.0


def test_prototype_hand_worked() -> None:
    # cosines of n = (1, 0) with prototypes (2, 0) and (0, 0.5) are 1 and 0: loss log(1 + e^{-s}).
    new = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    out = BCTPrototypeLoss(scale=3.0)(CompatibleInputs(new, new, torch.tensor([0]), prototypes=prototypes))
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)


def test_prototype_labels_without_row_and_zero_rows() -> None:
    inputs = make_inputs(3, num_classes=4, field="prototypes")  # label 4 has no row
    with torch.no_grad():
        inputs.prototypes[2] = 0.0  # class 2: no sample when the means were computed -> absent
    out = BCTPrototypeLoss(scale=5.0)(inputs)
    expected = naive_ce(
        inputs.new_features, inputs.prototypes, inputs.labels, 5.0, cosine=True, rows=[0, 1, 3]
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["bct_proto/valid_fraction"].item() == pytest.approx(5 / 8)  # drops labels 2, 2, 4


def test_prototype_label_smoothing_over_present_rows() -> None:
    inputs = make_inputs(5, field="prototypes")
    with torch.no_grad():
        inputs.prototypes[1] = 0.0
    out = BCTPrototypeLoss(scale=4.0, label_smoothing=0.2)(inputs)
    expected = naive_ce(
        inputs.new_features,
        inputs.prototypes,
        inputs.labels,
        4.0,
        cosine=True,
        smoothing=0.2,
        rows=[0, 2, 3, 4],
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)


def test_prototype_no_valid_sample_zero_loss_and_grads() -> None:
    inputs = make_inputs(0, num_classes=2, field="prototypes")
    inputs.labels = torch.full((8,), 7)
    out = BCTPrototypeLoss()(inputs)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert out.parts["bct_proto/valid_fraction"].item() == 0.0
    inputs = make_inputs(1, field="prototypes")
    BCTPrototypeLoss()(inputs).loss.backward()
    assert inputs.new_features.grad.abs().sum() > 0 and inputs.prototypes.grad is None


def test_prototype_needs_prototypes() -> None:
    with pytest.raises(ValueError, match="prototypes"):
        BCTPrototypeLoss()(make_inputs(0))


def test_names_and_needs() -> None:
    assert BCTInfluenceLoss.name == "bct" and BCTInfluenceLoss.needs == {"old_classifier"}
    assert BCTPrototypeLoss.name == "bct_proto" and BCTPrototypeLoss.needs == {"prototypes"}
