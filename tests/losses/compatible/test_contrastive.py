"""New-to-old InfoNCE (RACT paper's ``contra`` ablation) against a per-anchor loop and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.contrastive import ContrastiveN2O


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def naive_contrastive(new, old, labels, tau: float, topk: int | None = None) -> float:
    """L_i = -log e^{<n_i,o_i>/τ} / (e^{<n_i,o_i>/τ} + Σ_{j: y_j != y_i} e^{<n_i,o_j>/τ}), mean over i."""
    news, olds, ys = [unit(v) for v in new.tolist()], [unit(v) for v in old.tolist()], labels.tolist()
    total = 0.0
    for i in range(len(ys)):
        pos = dot(news[i], olds[i])
        negs = sorted((dot(news[i], olds[j]) for j in range(len(ys)) if ys[j] != ys[i]), reverse=True)
        if topk is not None:
            negs = negs[:topk]
        denominator = math.exp(pos / tau) + sum(math.exp(s / tau) for s in negs)
        total += -math.log(math.exp(pos / tau) / denominator)
    return total / len(ys)


def naive_openbct_contra(new, old, labels, tau: float, topk: int | None = None) -> float:
    """openBCT main.py --contra, loop for loop: for anchor i and every old feature o_p with y_p == y_i
    (o_i included), CE of [<n_i,o_p>, <n_i,o_j> for y_j != y_i] / τ with target 0; mean over p, then over i."""
    news, olds, ys = [unit(v) for v in new.tolist()], [unit(v) for v in old.tolist()], labels.tolist()
    contra = 0.0
    for i in range(len(ys)):
        pos_scores = [dot(news[i], olds[p]) for p in range(len(ys)) if ys[p] == ys[i]]
        neg_scores = sorted((dot(news[i], olds[j]) for j in range(len(ys)) if ys[j] != ys[i]), reverse=True)
        if topk is not None:
            neg_scores = neg_scores[:topk]
        inside = 0.0
        for pos in pos_scores:
            scores = [pos / tau] + [s / tau for s in neg_scores]
            inside += math.log(sum(math.exp(z) for z in scores)) - scores[0]
        contra += inside / len(pos_scores)
    return contra / len(ys)


def make_inputs(seed: int) -> CompatibleInputs:
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    old = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    return CompatibleInputs(new, old, torch.tensor([0, 1, 1, 2, 0, 3, 2, 1]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("topk", [None, 1, 3, 100])
def test_matches_loop(seed: int, tau: float, topk: int | None) -> None:
    inputs = make_inputs(seed)
    out = ContrastiveN2O(temperature=tau, topk=topk)(inputs)
    expected = naive_contrastive(inputs.new_features, inputs.old_features, inputs.labels, tau, topk)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.parts["contrastive/loss"].item() == pytest.approx(expected, rel=1e-9)


def test_hand_worked() -> None:
    # n_1 = o_1 = (1, 0), n_2 = o_2 = (0, 1), different labels, τ = 1: each L_i = log(1 + e^{-1}).
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = ContrastiveN2O(temperature=1.0)(CompatibleInputs(features, features, torch.tensor([0, 1])))
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out.parts["contrastive/pos_sim"].item() == pytest.approx(1.0)
    assert out.parts["contrastive/hardest_n2o_sim"].item() == pytest.approx(0.0)
    assert out.parts["contrastive/n2o_violation_rate"].item() == 0.0


def test_same_label_is_neither_positive_nor_negative() -> None:
    # o_2 has label 0 like anchor 1 and is very similar to n_1: it must not change L_1; all same label -> 0.
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    old = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = ContrastiveN2O(temperature=0.1)(CompatibleInputs(new, old, torch.tensor([0, 0])))
    assert out.loss.item() == 0.0


def test_gradients_reach_new_features_only() -> None:
    inputs = make_inputs(3)
    ContrastiveN2O(topk=2)(inputs).loss.backward()
    assert inputs.new_features.grad is not None and inputs.new_features.grad.abs().sum() > 0
    assert inputs.old_features.grad is None
    assert torch.isfinite(inputs.new_features.grad).all()


def test_name() -> None:
    assert ContrastiveN2O.name == "contrastive" and ContrastiveN2O().temperature == 0.05


# ------------------------------------------------------------------- openBCT --contra: same-label positives


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("topk", [None, 2])
def test_same_label_positives_match_openbct_loop(seed: int, tau: float, topk: int | None) -> None:
    inputs = make_inputs(seed)
    out = ContrastiveN2O(temperature=tau, topk=topk, positives="same_label")(inputs)
    expected = naive_openbct_contra(inputs.new_features, inputs.old_features, inputs.labels, tau, topk)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    # labels 0, 1, 2 have several samples: the option changes the loss
    paired = naive_contrastive(inputs.new_features, inputs.old_features, inputs.labels, tau, topk)
    assert abs(expected - paired) > 1e-6


def test_same_label_positives_gradient_matches_autograd() -> None:
    inputs = make_inputs(4)
    ContrastiveN2O(temperature=0.2, positives="same_label")(inputs).loss.backward()
    new = inputs.new_features.detach().clone().requires_grad_(True)
    n = torch.nn.functional.normalize(new, dim=1)
    o = torch.nn.functional.normalize(inputs.old_features.detach(), dim=1)
    ys = inputs.labels.tolist()
    total = 0.0
    for i in range(8):
        negs = torch.stack([n[i] @ o[j] for j in range(8) if ys[j] != ys[i]]) / 0.2
        positives = [p for p in range(8) if ys[p] == ys[i]]
        for p in positives:
            logits = torch.cat([(n[i] @ o[p]).view(1) / 0.2, negs])
            total = total + (torch.logsumexp(logits, 0) - logits[0]) / len(positives)
    (total / 8).backward()
    torch.testing.assert_close(inputs.new_features.grad, new.grad)
    assert inputs.old_features.grad is None


def test_same_label_positives_without_negatives_is_zero_and_finite() -> None:
    new = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = CompatibleInputs(new, torch.randn(3, 4, dtype=torch.float64), torch.tensor([5, 5, 5]))
    out = ContrastiveN2O(positives="same_label")(inputs)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(new.grad).all()


def test_positives_option_is_checked() -> None:
    assert ContrastiveN2O().positives == "paired"
    with pytest.raises(ValueError, match="positives"):
        ContrastiveN2O(positives="all")  # type: ignore[arg-type]
