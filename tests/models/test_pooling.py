"""Pooling layers against hand-computed values and the GeM limits (p=1: average, p->inf: max)."""

from __future__ import annotations

import pytest
import torch

from reid_lab.models import POOLINGS, GeM, build_pooling


def test_hand_values_on_a_1x2_map() -> None:
    x = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    assert build_pooling("avg")(x).item() == pytest.approx(1.5)
    assert build_pooling("max")(x).item() == pytest.approx(2.0)
    assert build_pooling("avgmax")(x).item() == pytest.approx(3.5)
    # GeM p=3: ((1^3 + 2^3) / 2)^(1/3)
    assert build_pooling("gem")(x).item() == pytest.approx(4.5 ** (1 / 3), rel=1e-6)


@pytest.mark.parametrize("name", sorted(POOLINGS))
def test_shapes(name: str) -> None:
    assert build_pooling(name)(torch.rand(2, 5, 4, 2)).shape == (2, 5)


def test_gem_p1_is_average_pooling() -> None:
    x = torch.rand(2, 4, 3, 5) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))


def test_gem_large_p_approaches_max_pooling() -> None:
    x = torch.rand(2, 4, 3, 5, dtype=torch.float64) + 0.1
    gem = GeM(p=300.0, learn_p=False)
    # (mean x^p)^(1/p) lies in [max * n^(-1/p), max]: within 1% for n = 15, p = 300.
    torch.testing.assert_close(gem(x), x.amax(dim=(2, 3)), rtol=0.01, atol=0.0)


def test_gem_clamps_negative_inputs_and_learns_p() -> None:
    gem = GeM(eps=1e-6)
    x = torch.tensor([-1.0, 8.0]).view(1, 1, 1, 2)
    out = gem(x)
    assert out.item() == pytest.approx((8.0**3 / 2) ** (1 / 3), rel=1e-5)
    out.sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    assert "p" in dict(GeM(learn_p=False).named_buffers())


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'mean'"):
        build_pooling("mean")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        build_pooling("avg")(torch.rand(2, 3))
    with pytest.raises(ValueError, match="p must be > 0"):
        GeM(p=0.0)
