"""UniBCT prototype classification against a naive loop; warm-up and refresh schedule."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.unibct import UniBCTLoss


def naive_unibct(new, labels, protos, scale) -> float:
    """Mean CE of scale * cos(n_i, p_c) (unit prototypes, explicit scale)."""
    total = 0.0
    for n, y in zip(new, labels):
        norm = math.sqrt(sum(x * x for x in n))
        logits = [
            scale * sum(a / norm * b / math.sqrt(sum(x * x for x in p)) for a, b in zip(n, p)) for p in protos
        ]
        log_z = math.log(sum(math.exp(z) for z in logits))
        total += log_z - logits[y]
    return total / len(new)


def make_inputs(epoch: int = 0) -> CompatibleInputs:
    gen = torch.Generator().manual_seed(0)
    return CompatibleInputs(
        new_features=torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True),
        old_features=torch.zeros(5, 3),
        labels=torch.tensor([0, 3, 1, 2, 3]),
        # not unit-norm on purpose: the scale must be the plugin's, not the prototypes' norm
        prototypes=2.0 * torch.randn(4, 3, generator=gen, dtype=torch.float64),
        epoch=epoch,
    )


def test_hand_worked_logits() -> None:
    # n = (3, 4) -> n_hat = (0.6, 0.8); p0 = (2, 0) -> (1, 0), p1 = (0, 1); s = 2 -> logits (1.2, 1.6), label 1.
    inputs = CompatibleInputs(
        new_features=torch.tensor([[3.0, 4.0]], dtype=torch.float64),
        old_features=torch.zeros(1, 2),
        labels=torch.tensor([1]),
        prototypes=torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
    )
    out = UniBCTLoss(scale=2.0)(inputs)
    assert out.loss.item() == pytest.approx(math.log(math.exp(1.2) + math.exp(1.6)) - 1.6, abs=1e-12)


def test_scale_is_the_plugins_not_the_prototypes_norm() -> None:
    # unrefined (class_centres) and refined prototypes share the unit-norm convention; a caller passing raw
    # means of any norm gets the same loss: only the prototypes' directions matter.
    unit_protos, scaled = make_inputs(), make_inputs()
    unit_protos.prototypes = unit_protos.prototypes / unit_protos.prototypes.norm(dim=1, keepdim=True)
    scaled.prototypes = 25.0 * unit_protos.prototypes
    assert UniBCTLoss(scale=4.0)(scaled).loss.item() == pytest.approx(
        UniBCTLoss(scale=4.0)(unit_protos).loss.item(), rel=1e-12
    )


def test_default_scale_and_refresh_flag() -> None:
    assert UniBCTLoss().scale == 30.0
    assert UniBCTLoss.refreshes_prototypes and UniBCTLoss.needs == {"prototypes"}


@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_matches_naive_loop(scale: float) -> None:
    inputs = make_inputs()
    out = UniBCTLoss(scale=scale)(inputs)
    expected = naive_unibct(
        inputs.new_features.tolist(), inputs.labels.tolist(), inputs.prototypes.tolist(), scale
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.parts["unibct/ce"].item() == pytest.approx(expected, abs=1e-12)
    out.loss.backward()
    assert inputs.new_features.grad is not None


def test_warmup_gives_zero_with_graph() -> None:
    loss_fn = UniBCTLoss(warmup_epochs=10)
    early = loss_fn(make_inputs(epoch=9)).loss
    assert early.item() == 0.0 and early.requires_grad
    late = loss_fn(make_inputs(epoch=10)).loss
    assert late.item() > 0


def test_warmup_needs_no_prototypes_but_later_epochs_do() -> None:
    inputs = make_inputs(epoch=3)
    inputs.prototypes = None
    loss_fn = UniBCTLoss(warmup_epochs=10)
    assert loss_fn(inputs).loss.item() == 0.0
    inputs.epoch = 10
    with pytest.raises(ValueError, match="prototypes"):
        loss_fn(inputs)


def test_refresh_schedule_mixbct() -> None:
    loss_fn = UniBCTLoss(warmup_epochs=10, refresh_epochs=[20, 10])
    asked = [epoch for epoch in range(35) if loss_fn.on_train_epoch_start(epoch)]
    assert asked == [10, 20]
    assert not any(UniBCTLoss().on_train_epoch_start(e) for e in range(5))
