"""LCE centres/boundaries on a hand case; UniBCT refinement against a per-class numpy closed form.

Both functions return unit-norm prototypes (one scale convention before and after refinement).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_lab.losses.compatible.prototypes import class_boundaries, class_centres, refine_prototypes

S = 1 / math.sqrt(2)


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # class 0: (2, 0) and (0, 3) -> normalised (1, 0), (0, 1); mean (.5, .5) -> centre (1/sqrt2, 1/sqrt2)
    # class 1: (1, 1) and (5, 0) -> normalised (S, S), (1, 0); mean ((S+1)/2, S/2)
    feats = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [5.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    return feats, labels


def test_class_centres_hand_case() -> None:
    feats, labels = hand_case()
    centres = class_centres(feats, labels, 2)
    c1 = np.array([(S + 1) / 2, S / 2])
    c1 /= np.linalg.norm(c1)
    expected = np.array([[S, S], c1])
    np.testing.assert_allclose(centres.numpy(), expected, atol=1e-12)


def test_class_boundaries_hand_case() -> None:
    feats, labels = hand_case()
    centres = class_centres(feats, labels, 2)
    bounds = class_boundaries(feats, labels, centres)
    # class 0: both samples are at 45 degrees from the centre -> cos = S.
    # class 1: the centre bisects the 45-degree angle between (S, S) and (1, 0) -> cos(22.5 deg).
    np.testing.assert_allclose(bounds.numpy(), [S, math.cos(math.pi / 8)], atol=1e-12)


def test_boundaries_are_the_loosest_sample() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    labels = torch.arange(30) % 4
    centres = class_centres(feats, labels, 4)
    bounds = class_boundaries(feats, labels, centres)
    for k in range(4):
        cosines = [float(f @ centres[k] / f.norm()) for f, y in zip(feats, labels.tolist()) if y == k]
        assert bounds[k].item() == pytest.approx(min(cosines), abs=1e-12)


def test_empty_class_names_the_ids() -> None:
    feats, labels = hand_case()
    with pytest.raises(ValueError, match=r"\[2, 3, 4\]"):
        class_centres(feats, labels, 5)
    with pytest.raises(ValueError, match=r"\[1\]"):
        refine_prototypes(feats, feats, torch.tensor([0, 0, 2, 2]), 3)


def numpy_refine(
    old: np.ndarray, new: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float, tau: float
):
    """Eq. 9-10 of UniBCT per class, straight from the formula (row-stochastic A, normalised F_n and F_o),
    the prototype L2-normalised."""
    protos = np.zeros((num_classes, old.shape[1]))
    for c in range(num_classes):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        f_o = old[rows] / np.linalg.norm(old[rows], axis=1, keepdims=True)
        f_n = new[rows] / np.linalg.norm(new[rows], axis=1, keepdims=True)
        n = len(rows)
        if n == 1:
            protos[c] = f_o[0]
            continue
        a = np.zeros((n, n))
        for i in range(n):
            weights = [math.exp(float(f_n[i] @ f_n[j]) / tau) if j != i else 0.0 for j in range(n)]
            total = sum(weights)
            a[i] = [w / total for w in weights]
        refined = (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * a) @ f_o
        protos[c] = refined.mean(axis=0)
    return protos / np.linalg.norm(protos, axis=1, keepdims=True)


@pytest.mark.parametrize("alpha,tau", [(0.9, 0.5), (0.5, 1.0), (0.0, 0.5)])
def test_refine_prototypes_matches_closed_form(alpha: float, tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    # class sizes 3, 4, 1, 3 (two classes of equal size exercise the batched solve)
    labels = torch.tensor([0, 1, 0, 1, 3, 2, 1, 0, 3, 1, 3])
    old = torch.randn(len(labels), 3, generator=gen, dtype=torch.float64)
    new = torch.randn(len(labels), 5, generator=gen, dtype=torch.float64)
    got = refine_prototypes(old, new, labels, 4, alpha=alpha, tau=tau)
    expected = numpy_refine(old.numpy(), new.numpy(), labels.numpy(), 4, alpha, tau)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


def test_refine_with_identity_graph_returns_the_class_centres_exactly() -> None:
    # alpha = 0: F~_o = F_o, so the refined prototypes are the unrefined ones (same scale convention).
    gen = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1, 0, 1, 3, 2, 1, 0, 3, 1, 3])
    old = 7.0 * torch.randn(len(labels), 3, generator=gen, dtype=torch.float64)  # far from unit norm
    new = torch.randn(len(labels), 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(refine_prototypes(old, new, labels, 4, alpha=0.0), class_centres(old, labels, 4))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_refined_and_unrefined_prototypes_are_unit_norm(alpha: float) -> None:
    gen = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1, 0, 1, 2, 1, 0, 2])
    old = 10.0 * torch.randn(8, 4, generator=gen, dtype=torch.float64)
    new = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    for protos in (class_centres(old, labels, 3), refine_prototypes(old, new, labels, 3, alpha=alpha)):
        torch.testing.assert_close(protos.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_refine_hand_case_means_and_singletons() -> None:
    # class 0: (2, 0), (0, 3) -> unit (1, 0), (0, 1) -> mean (.5, .5) -> (S, S); class 1: (1, 1) -> (S, S);
    # class 2: (5, 0) -> (1, 0). A singleton keeps its (normalised) feature whatever alpha.
    old, _ = hand_case()
    labels = torch.tensor([0, 1, 0, 2])
    got = refine_prototypes(old, torch.randn(4, 6, dtype=torch.float64), labels, 3, alpha=0.0)
    np.testing.assert_allclose(got.numpy(), [[S, S], [S, S], [1.0, 0.0]], atol=1e-12)
    got = refine_prototypes(old, torch.randn(4, 6, dtype=torch.float64), labels, 3, alpha=0.9)
    np.testing.assert_allclose(got[1:].numpy(), [[S, S], [1.0, 0.0]], atol=1e-12)


def test_refine_two_images_hand_case() -> None:
    # n_c = 2: A = [[0, 1], [1, 0]] whatever the features; (1-a)(I - aA)^-1 = [[1, a], [a, 1]] / (1 + a),
    # rows sum to one, so the mean of the two refined rows is the plain mean of the unit old features.
    old = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    got = refine_prototypes(old, torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 0]), 1, alpha=0.5)
    np.testing.assert_allclose(got.numpy(), [[S, S]], atol=1e-12)


def test_refine_downweights_the_outlier() -> None:
    # Three images agree in the new space, one is an outlier: its old feature (0, 1) gets a weight w < 1/4
    # against 1 - w for (1, 0), so the prototype's slope w / (1 - w) is below 1/3 (1/3 for the plain mean).
    new = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0]], dtype=torch.float64)
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    got = refine_prototypes(old, new, torch.zeros(4, dtype=torch.long), 1, alpha=0.9, tau=0.05)
    assert 0.0 < (got[0, 1] / got[0, 0]).item() < 1 / 3
