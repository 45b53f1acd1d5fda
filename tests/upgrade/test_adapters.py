"""Dimension adapters, FCT/FastFill transformation, their losses and training loop (the backfill order is
reid_lab.metrics.backfill.order_by_sigma, tested in tests/metrics/test_backfill.py)."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.upgrade.adapters import (
    DimensionAdapter,
    FCTTransformation,
    fastfill_loss,
    fct_loss,
    train_transformation,
)


def test_truncate_and_pad_exact() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert torch.equal(DimensionAdapter(4, 2, "truncate")(x), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    assert torch.equal(
        DimensionAdapter(4, 6, "pad")(x),
        torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0, 0.0, 0.0]]),
    )


@pytest.mark.parametrize("kind", ["linear", "truncate", "pad"])
def test_identity_when_dims_match(kind: str) -> None:
    x = torch.randn(3, 5)
    adapter = DimensionAdapter(5, 5, kind)
    assert adapter(x) is x
    assert sum(p.numel() for p in adapter.parameters()) == 0


def test_linear_is_learnable_bias_free_and_starts_as_truncation() -> None:
    adapter = DimensionAdapter(4, 2, "linear")
    params = list(adapter.parameters())
    assert len(params) == 1 and params[0].shape == (2, 4)
    x = torch.randn(3, 4, requires_grad=True)
    y = adapter(x)
    assert torch.equal(y, x[:, :2])
    y.sum().backward()
    assert params[0].grad is not None


def test_wrong_direction_raises() -> None:
    with pytest.raises(ValueError, match="pad"):
        DimensionAdapter(2, 4, "truncate")
    with pytest.raises(ValueError, match="truncate"):
        DimensionAdapter(4, 2, "pad")


@pytest.mark.parametrize("side_dim", [0, 3])
@pytest.mark.parametrize("uncertainty", [False, True])
def test_fct_forward_shapes(side_dim: int, uncertainty: bool) -> None:
    torch.manual_seed(0)
    h = FCTTransformation(4, 6, side_info_dim=side_dim, hidden_dim=16, uncertainty=uncertainty)
    side = torch.randn(5, side_dim) if side_dim else None
    out = h(torch.randn(5, 4), side)
    if uncertainty:
        feats, log_var = out
        assert feats.shape == (5, 6) and log_var.shape == (5,)
        (feats.sum() + log_var.sum()).backward()
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (5, 6)
        out.sum().backward()
    assert all(p.grad is not None for p in h.parameters())


def test_fct_side_info_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="side_info"):
        FCTTransformation(4, 6, side_info_dim=3, hidden_dim=8)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="side_info"):
        FCTTransformation(4, 6, hidden_dim=8)(torch.randn(2, 4), torch.randn(2, 3))


def test_fct_loss_by_hand() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert fct_loss(pred, target).item() == pytest.approx((5.0 + 25.0) / 2)


def test_fastfill_loss_two_samples_by_hand() -> None:
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    log_var = torch.tensor([0.0, math.log(2.0)], dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64)  # logits = h
    labels = torch.tensor([0, 0])
    # sim_i = ||h_i - t_i||^2 / d: 1/2 and 4/2 = 2
    # CE with smoothing eps over K = 2 classes: target dist (1 - eps + eps/K, eps/K) on class 0
    eps = 0.1

    def ce_ls(logits: list[float], y: int) -> float:
        log_z = math.log(sum(math.exp(z) for z in logits))
        logp = [z - log_z for z in logits]
        return -sum(((1 - eps) * (k == y) + eps / 2) * logp[k] for k in range(2))

    ce = [ce_ls([1.0, 0.0], 0), ce_ls([0.0, 2.0], 0)]
    mu_sim, mu_disc, mu_u = 1.0, 2.0, 0.5
    per = [
        0.5 * 1.0 * (mu_sim * 0.5 + mu_disc * ce[0]) + mu_u * 0.0,
        0.5 * 0.5 * (mu_sim * 2.0 + mu_disc * ce[1]) + mu_u * math.log(2.0),
    ]
    loss, parts = fastfill_loss(pred, log_var, target, labels, w, mu_sim=mu_sim, mu_disc=mu_disc, mu_u=mu_u)
    assert loss.item() == pytest.approx(sum(per) / 2, abs=1e-12)
    assert parts["fastfill/sim"].item() == pytest.approx(1.25)
    assert parts["fastfill/disc"].item() == pytest.approx(sum(ce) / 2, abs=1e-12)
    # no labels / classifier: similarity term only
    loss, parts = fastfill_loss(pred, log_var, target)
    expected = (0.5 * 0.5 + 0.0 + 0.5 * 0.5 * 2.0 + 0.5 * math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12) and "fastfill/disc" not in parts


def synthetic(n: int = 256, d_old: int = 6, d_new: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    old = torch.randn(n, d_old, generator=gen)
    a = torch.randn(d_new, d_old, generator=gen) / math.sqrt(d_old)
    new = old @ a.t() + 0.01 * torch.randn(n, d_new, generator=gen)
    return old, new


def evaluate(model: FCTTransformation, old: torch.Tensor, new: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(old)
        pred = out[0] if isinstance(out, tuple) else out
        return fct_loss(pred, new).item()


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread avoids oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("uncertainty", [False, True])
def test_train_transformation_learns_linear_map_deterministically(uncertainty: bool) -> None:
    old, new = synthetic()
    initial = fct_loss(torch.zeros_like(new), new).item()  # error of predicting zero = E||phi_n||^2
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model = FCTTransformation(6, 4, hidden_dim=32, uncertainty=uncertainty)
        before = evaluate(model.eval(), old, new)
        model = train_transformation(model, old, new, epochs=40, lr=3e-3, batch_size=64, seed=0)
        assert not model.training
        finals.append(evaluate(model, old, new))
    assert finals[0] == finals[1]
    assert finals[0] < 0.1 * before and finals[0] < 0.1 * initial


@pytest.mark.usefixtures("one_thread")
def test_train_transformation_with_side_info_and_classifier_runs() -> None:
    old, new = synthetic(n=65)
    torch.manual_seed(0)
    model = FCTTransformation(6, 4, side_info_dim=2, hidden_dim=16, uncertainty=True)
    model = train_transformation(
        model,
        old,
        new,
        side_info=torch.randn(65, 2),
        labels=torch.randint(0, 3, (65,)),
        new_classifier=torch.randn(3, 4),
        epochs=2,
        batch_size=32,  # last batch of one sample is skipped
    )
    assert not model.training
