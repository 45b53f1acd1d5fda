"""Class means and synthesised old-classifier rows (BCT §3.2) against loops and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.bct import BCTInfluenceLoss
from reid_lab.losses.compatible.classifier_synthesis import class_means, synthesize_old_classifier


def naive_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int, normalize: bool) -> list:
    rows = []
    for k in range(num_classes):
        members = [f for f, y in zip(features.tolist(), labels.tolist()) if y == k]
        if normalize:
            members = [[x / math.sqrt(sum(v * v for v in f)) for x in f] for f in members]
        rows.append([sum(col) / len(members) for col in zip(*members)])
    return rows


@pytest.mark.parametrize("normalize", [True, False])
def test_class_means_match_loop(normalize: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 3, 2, 2, 0])
    means = class_means(features, labels, 4, normalize=normalize)
    assert means.shape == (4, 4)
    assert torch.allclose(
        means, torch.tensor(naive_means(features, labels, 4, normalize), dtype=torch.float64)
    )


def test_class_means_hand_worked() -> None:
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    means = class_means(features, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(means, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert not means.requires_grad
    raw = class_means(features, torch.tensor([0, 0, 1]), 2, normalize=False)
    assert torch.allclose(raw, torch.tensor([[1.0, 1.5], [1.0, 0.0]]))


def test_class_means_missing_class() -> None:
    features = torch.ones(3, 2)
    labels = torch.tensor([0, 0, 2])
    with pytest.raises(ValueError, match="no sample: 1, 3"):
        class_means(features, labels, 4)
    means = class_means(features, labels, 4, allow_missing=True)
    assert torch.isfinite(means).all()
    assert means[1].abs().sum() == 0 and means[3].abs().sum() == 0
    with pytest.raises(ValueError, match="labels must lie"):
        class_means(features, torch.tensor([0, 0, 5]), 4)


def test_synthesis_copies_old_rows_and_fills_new_with_rescaled_means() -> None:
    generator = torch.Generator().manual_seed(1)
    old_classifier = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    means = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    old_label_of_new = torch.tensor([2, -1, 0, -1, 1])
    result = synthesize_old_classifier(old_classifier, old_label_of_new, means)
    mean_norm = sum(math.sqrt(sum(x * x for x in row)) for row in old_classifier.tolist()) / 3
    for k, old_label in enumerate(old_label_of_new.tolist()):
        if old_label >= 0:
            assert torch.equal(result[k], old_classifier[old_label].detach())
        else:
            direction = means[k] / means[k].norm()
            assert torch.allclose(result[k], direction * mean_norm)
    assert not result.requires_grad


def test_synthesis_hand_worked_and_without_rescaling() -> None:
    w_old = torch.tensor([[2.0, 0.0], [0.0, 4.0]])  # mean row norm 3
    means = torch.tensor([[9.0, 9.0], [0.0, 0.5], [0.6, 0.0]])
    old_label_of_new = torch.tensor([1, -1, 0])
    expected = torch.tensor([[0.0, 4.0], [0.0, 3.0], [2.0, 0.0]])
    assert torch.allclose(synthesize_old_classifier(w_old, old_label_of_new, means), expected)
    raw = synthesize_old_classifier(w_old, old_label_of_new, means, scale_to_old_norm=False)
    assert torch.allclose(raw, torch.tensor([[0.0, 4.0], [0.0, 0.5], [2.0, 0.0]]))


def test_synthesis_zero_mean_stays_zero_and_no_old_classifier() -> None:
    w_old = torch.tensor([[2.0, 0.0]])
    means = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    result = synthesize_old_classifier(w_old, torch.tensor([0, -1]), means)
    assert torch.equal(result[1], torch.zeros(2)) and torch.isfinite(result).all()
    only_means = synthesize_old_classifier(None, torch.tensor([-1, -1]), means)
    assert torch.equal(only_means, means)


def test_synthesis_errors() -> None:
    means = torch.ones(2, 2)
    with pytest.raises(ValueError, match="old_classifier is None"):
        synthesize_old_classifier(None, torch.tensor([0, -1]), means)
    with pytest.raises(ValueError, match="only 1 rows"):
        synthesize_old_classifier(torch.ones(1, 2), torch.tensor([1, -1]), means)
    with pytest.raises(ValueError, match="C_old, 2"):
        synthesize_old_classifier(torch.ones(1, 3), torch.tensor([0, -1]), means)


def test_synthesised_classifier_feeds_the_influence_loss() -> None:
    generator = torch.Generator().manual_seed(2)
    old_features = torch.randn(8, 4, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    w_old = torch.randn(2, 4, generator=generator)
    classifier = synthesize_old_classifier(
        w_old, torch.tensor([1, -1, 0, -1]), class_means(old_features, labels, 4)
    )
    new = torch.randn(8, 4, generator=generator, requires_grad=True)
    out = BCTInfluenceLoss()(CompatibleInputs(new, old_features, labels, old_classifier=classifier))
    assert out.parts["bct/valid_fraction"].item() == 1.0 and torch.isfinite(out.loss)
