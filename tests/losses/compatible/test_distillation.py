"""PCT focal distillation (FD-KL, FD-LM) and LwF against per-sample loops of their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.distillation import FocalDistillationLoss, LwFLoss


def softmax(z: list[float], t: float) -> list[float]:
    m = max(z)
    e = [math.exp((x - m) / t) for x in z]
    return [x / sum(e) for x in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def naive_pct(z_n, z_o, labels, alpha, beta, mode, t, index=None) -> float:
    total = 0.0
    for zn, zo, y in zip(z_n, z_o, labels):
        if index is not None:
            zn = [zn[j] for j in index]
        old_pred = max(range(len(zo)), key=lambda k: zo[k])
        if index is not None:
            old_pred = index[old_pred]
        w = alpha + beta * (1.0 if old_pred == y else 0.0)
        if mode == "kl":
            d = kl(softmax(zo, t), softmax(zn, t))
        else:
            d = 0.5 * sum((a - b) ** 2 for a, b in zip(zn, zo)) / len(zo)
        total += w * d
    return total / len(z_n)


# old model right on samples 0 and 2 (argmax 0 == label 0, argmax 2 == label 2), wrong on 1 and 3
OLD = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.5, 0.1], [0.0, 1.0, 4.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
NEW = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2, 2, 0])


def make_inputs(new: torch.Tensor = NEW, extras: dict | None = None) -> CompatibleInputs:
    new = new.clone().requires_grad_(True)
    return CompatibleInputs(
        new_features=torch.zeros(4, 2),
        old_features=torch.zeros(4, 2),
        labels=LABELS,
        new_logits=new,
        old_logits=OLD,
        extras=extras or {},
    )


def test_fd_lm_hand_worked_focal_weight() -> None:
    # one sample, old right: weight 1 + 5 = 6; D = 1/2 * mean((1-3)^2, (2-1)^2, (0.5-0)^2) = 1/2 * 5.25 / 3
    inputs = CompatibleInputs(
        new_features=torch.zeros(1, 2),
        old_features=torch.zeros(1, 2),
        labels=torch.tensor([0]),
        new_logits=NEW[:1],
        old_logits=OLD[:1],
    )
    assert FocalDistillationLoss(mode="lm")(inputs).loss.item() == pytest.approx(
        6 * 0.5 * 5.25 / 3, abs=1e-12
    )
    wrong = CompatibleInputs(
        new_features=torch.zeros(1, 2),
        old_features=torch.zeros(1, 2),
        labels=torch.tensor([1]),
        new_logits=NEW[:1],
        old_logits=OLD[:1],
    )
    assert FocalDistillationLoss(mode="lm")(wrong).loss.item() == pytest.approx(0.5 * 5.25 / 3, abs=1e-12)


@pytest.mark.parametrize("mode,t", [("kl", 1.0), ("kl", 5.0), ("kl", 100.0), ("lm", 1.0)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 5.0), (0.5, 2.0)])
def test_pct_matches_naive_loop(mode: str, t: float, alpha: float, beta: float) -> None:
    inputs = make_inputs()
    out = FocalDistillationLoss(alpha=alpha, beta=beta, mode=mode, temperature=t)(inputs)
    expected = naive_pct(NEW.tolist(), OLD.tolist(), LABELS.tolist(), alpha, beta, mode, t)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-15)
    assert out.parts["pct/old_correct"].item() == pytest.approx(0.5)
    out.loss.backward()
    assert inputs.new_logits.grad is not None


def test_pct_old_class_index_selects_and_maps() -> None:
    # new model has 5 classes; old class j is new column index[j]; labels are in the new space.
    index = [4, 0, 2]
    new5 = torch.tensor(
        [
            [0.3, 1.0, 9.0, 7.0, 2.0],
            [1.0, 0.0, 0.5, 3.0, 4.0],
            [0.0, 2.0, 1.0, 1.0, 0.5],
            [2.0, 2.0, 0.0, 1.0, 1.0],
        ],
        dtype=torch.float64,
    )
    labels = [4, 2, 2, 1]  # old argmax (0, 0, 2, 1) -> new (4, 4, 2, 0): right on samples 0 and 2
    for mode in ("kl", "lm"):
        inputs = CompatibleInputs(
            new_features=torch.zeros(4, 2),
            old_features=torch.zeros(4, 2),
            labels=torch.tensor(labels),
            new_logits=new5,
            old_logits=OLD,
            extras={"old_class_index": torch.tensor(index)},
        )
        out = FocalDistillationLoss(mode=mode, temperature=2.0)(inputs)
        expected = naive_pct(new5.tolist(), OLD.tolist(), labels, 1.0, 5.0, mode, 2.0, index=index)
        assert out.loss.item() == pytest.approx(expected, rel=1e-10)
        assert out.parts["pct/old_correct"].item() == pytest.approx(0.5)


def test_shape_mismatch_without_index_raises() -> None:
    inputs = make_inputs(new=torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="old_class_index"):
        FocalDistillationLoss()(inputs)


def test_bad_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode"):
        FocalDistillationLoss(mode="l2")  # type: ignore[arg-type]


# LwF (BCT baseline; openBCT --lwf, OpenCompatible lwf): the frozen old classifier W_o scores the *new*
# features; the old model's logits W_o φ_o are the soft targets.
GEN = torch.Generator().manual_seed(3)
W_OLD = torch.randn(3, 5, generator=GEN, dtype=torch.float64)  # (C_old, d_old)
PHI_OLD = torch.randn(4, 5, generator=GEN, dtype=torch.float64)
PHI_NEW = torch.randn(4, 5, generator=GEN, dtype=torch.float64)


def lwf_inputs(grad_everywhere: bool = False) -> CompatibleInputs:
    return CompatibleInputs(
        new_features=PHI_NEW.clone().requires_grad_(True),
        old_features=PHI_OLD.clone().requires_grad_(grad_everywhere),
        labels=LABELS,
        new_logits=NEW.clone().requires_grad_(True),  # the new model's own head: LwF must ignore it
        old_logits=(PHI_OLD @ W_OLD.t()).requires_grad_(grad_everywhere),
        old_class_weight=W_OLD.clone().requires_grad_(grad_everywhere),
    )


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_lwf_scores_new_features_with_the_old_classifier(t: float) -> None:
    out = LwFLoss(temperature=t)(lwf_inputs())
    w_old = W_OLD.tolist()
    expected = 0.0
    for n, o in zip(PHI_NEW.tolist(), PHI_OLD.tolist()):
        z_new = [sum(a * b for a, b in zip(n, w)) for w in w_old]  # W_o φ_n
        z_old = [sum(a * b for a, b in zip(o, w)) for w in w_old]  # W_o φ_o
        expected += t * t * kl(softmax(z_old, t), softmax(z_new, t)) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert out.parts["lwf/kl"].item() == pytest.approx(expected, rel=1e-10)


def test_lwf_gradient_reaches_new_features_only_and_matches_autograd() -> None:
    inputs = lwf_inputs(grad_everywhere=True)
    LwFLoss(temperature=2.0)(inputs).loss.backward()
    # hand-built: 4 * mean_i sum_k p_ik (log p_ik - log q_ik), q = softmax(W_o n_i / 2), p = softmax(W_o o_i / 2)
    n = PHI_NEW.clone().requires_grad_(True)
    p = torch.softmax(PHI_OLD @ W_OLD.t() / 2, dim=1)
    q = torch.softmax(n @ W_OLD.t() / 2, dim=1)
    (4 * (p * (p.log() - q.log())).sum(dim=1).mean()).backward()
    torch.testing.assert_close(inputs.new_features.grad, n.grad, rtol=1e-10, atol=1e-12)
    assert inputs.new_features.grad.abs().sum() > 0
    assert inputs.new_logits.grad is None
    assert inputs.old_class_weight.grad is None and inputs.old_logits.grad is None
    assert inputs.old_features.grad is None


def test_lwf_is_zero_when_new_features_equal_old_ones() -> None:
    inputs = lwf_inputs()
    inputs.new_features = PHI_OLD.clone()
    assert LwFLoss()(inputs).loss.item() == pytest.approx(0.0, abs=1e-12)


def test_lwf_needs_and_shape_errors() -> None:
    assert LwFLoss.needs == {"old_class_weight", "old_logits"}
    missing = lwf_inputs()
    missing.old_class_weight = None
    with pytest.raises(ValueError, match="old_class_weight"):
        LwFLoss()(missing)
    wrong_dim = lwf_inputs()
    wrong_dim.old_class_weight = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_old"):
        LwFLoss()(wrong_dim)
    wrong_classes = lwf_inputs()
    wrong_classes.old_logits = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="C_old"):
        LwFLoss()(wrong_classes)
