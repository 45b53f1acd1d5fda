"""BNNeck head: outputs, the neck_feat choice, frozen BN bias, BoT init."""

from __future__ import annotations

import pytest
import torch

from reid_lab.models import BNNeckHead


def test_outputs_and_shapes_with_classifier() -> None:
    head = BNNeckHead(16, num_classes=5)
    out = head(torch.randn(4, 16))
    assert sorted(out) == ["bn_features", "embedding", "features", "logits"]
    assert out["features"].shape == out["bn_features"].shape == (4, 16)
    assert out["logits"].shape == (4, 5)
    torch.testing.assert_close(out["logits"], out["bn_features"] @ head.classifier.weight.t())
    assert head.classifier.bias is None


def test_without_classifier_and_with_reduction() -> None:
    head = BNNeckHead(16, embedding_dim=8)
    x = torch.randn(4, 16)
    out = head(x)
    assert "logits" not in out
    assert out["features"].shape == (4, 8)
    torch.testing.assert_close(out["features"], x @ head.embedding.weight.t())


@pytest.mark.parametrize(("neck_feat", "key"), [("before", "features"), ("after", "bn_features")])
def test_neck_feat_selects_the_test_embedding(neck_feat: str, key: str) -> None:
    out = BNNeckHead(8, neck_feat=neck_feat)(torch.randn(4, 8))
    assert torch.equal(out["embedding"], out[key])


def test_bn_is_batch_norm_with_frozen_zero_bias() -> None:
    head = BNNeckHead(6, num_classes=3)
    assert not head.bottleneck.bias.requires_grad
    x = torch.randn(8, 6) * 3 + 1
    out = head(x)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + head.bottleneck.eps)
    torch.testing.assert_close(out["bn_features"], expected)
    out["logits"].sum().backward()
    assert head.bottleneck.bias.grad is None and head.bottleneck.weight.grad is not None
    assert head.classifier.weight.grad is not None
    assert BNNeckHead(6, bias_free_bn=False).bottleneck.bias.requires_grad


def test_bot_init() -> None:
    torch.manual_seed(0)
    head = BNNeckHead(256, num_classes=500)
    assert head.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.equal(head.bottleneck.weight, torch.ones(256))
    assert torch.equal(head.bottleneck.bias, torch.zeros(256))


def test_errors() -> None:
    with pytest.raises(ValueError, match="neck_feat must be one of"):
        BNNeckHead(8, neck_feat="middle")
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        BNNeckHead(8, num_classes=-1)
    with pytest.raises(ValueError, match=r"shape \(B, 8\), got \(4, 7\)"):
        BNNeckHead(8)(torch.randn(4, 7))
