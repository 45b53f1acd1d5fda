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
    with pytest.raises(ValueError, match="old_class_index"):
        LwFLoss()(inputs)


def test_bad_mode_raises() -> None:
    with pytest.raises(ValueError, match="mode"):
        FocalDistillationLoss(mode="l2")  # type: ignore[arg-type]


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_lwf_matches_naive_loop(t: float) -> None:
    inputs = make_inputs()
    out = LwFLoss(temperature=t)(inputs)
    expected = (
        t * t * sum(kl(softmax(zo, t), softmax(zn, t)) for zn, zo in zip(NEW.tolist(), OLD.tolist())) / 4
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert out.parts["lwf/kl"].item() == pytest.approx(expected, rel=1e-10)


def test_lwf_is_zero_for_identical_logits_and_uses_index() -> None:
    new5 = torch.cat([OLD[:, 1:2], torch.randn(4, 1, dtype=torch.float64), OLD[:, 0:1], OLD[:, 2:3]], dim=1)
    inputs = make_inputs(new=new5, extras={"old_class_index": torch.tensor([2, 0, 3])})
    assert LwFLoss()(inputs).loss.item() == pytest.approx(0.0, abs=1e-12)
