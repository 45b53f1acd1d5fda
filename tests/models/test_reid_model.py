"""ReIDModel: output keys and shapes, embedding reduction, classifier matrix, token backbones."""

from __future__ import annotations

import pytest
import torch

from reid_lab.models import ReIDModel


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 32)


def test_outputs_with_classifier() -> None:
    model = ReIDModel("resnet18", num_classes=7)
    out = model(images())
    assert sorted(out) == ["bn_features", "embedding", "features", "logits"]
    assert model.embedding_dim == 512 and model.num_classes == 7
    for key in ("features", "bn_features", "embedding"):
        assert out[key].shape == (2, 512)
    assert out["logits"].shape == (2, 7)
    assert model.classifier_weight is not None and model.classifier_weight.shape == (7, 512)
    torch.testing.assert_close(out["logits"], out["bn_features"] @ model.classifier_weight.t())
    # "after" is the default test feature, and it is not L2-normalised.
    assert torch.equal(out["embedding"], out["bn_features"])
    assert not torch.allclose(out["embedding"].norm(dim=1), torch.ones(2))


def test_features_are_the_pooled_backbone_map() -> None:
    model = ReIDModel("resnet18", last_stride=1, pooling="max").eval()
    x = images()
    with torch.no_grad():
        fmap = model.backbone(x)
        out = model(x)
    assert fmap.shape[2:] == (4, 2)  # last stride 1: 64x32 / 16
    torch.testing.assert_close(out["features"], fmap.amax(dim=(2, 3)))


def test_without_classifier_and_reduced_embedding() -> None:
    model = ReIDModel("resnet18", embedding_dim=64, neck_feat="before")
    out = model(images())
    assert "logits" not in out
    assert model.classifier_weight is None and model.num_classes == 0
    assert model.embedding_dim == 64
    assert out["features"].shape == out["embedding"].shape == (2, 64)
    assert torch.equal(out["embedding"], out["features"])


def test_token_backbone_skips_pooling() -> None:
    model = ReIDModel(
        "timm:vit_tiny_patch16_224", num_classes=3, pooling="gem", timm_kwargs={"img_size": (64, 32)}
    )
    assert isinstance(model.pooling, torch.nn.Identity)
    out = model(images())
    assert out["embedding"].shape == (2, 192) and out["logits"].shape == (2, 3)


def test_every_trainable_parameter_gets_a_gradient() -> None:
    model = ReIDModel("resnet18", num_classes=4, pooling="gem", embedding_dim=32)
    out = model(images())
    (out["logits"].sum() + out["features"].pow(2).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown pooling 'mean'"):
        ReIDModel("resnet18", pooling="mean")
    with pytest.raises(ValueError, match="neck_feat must be one of"):
        ReIDModel("resnet18", neck_feat="both")


def test_bad_images() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(2, 1, 64, 32\)"):
        ReIDModel("resnet18")(torch.randn(2, 1, 64, 32))


# The mobile backbones with the BoT head at ReID input sizes; random init here (tests/models/test_pretrained.py
# covers the ImageNet weights).
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "timm:efficientnet_lite0"])
@pytest.mark.parametrize("size", [(128, 64), (256, 128)])
@pytest.mark.parametrize("last_stride", [1, 2])
def test_mobile_backbones_at_reid_sizes(backbone: str, size: tuple[int, int], last_stride: int) -> None:
    model = ReIDModel(backbone, num_classes=5, last_stride=last_stride)
    x = torch.randn(2, 3, *size)
    fmap = model.backbone(x)
    stride = 32 // (2 if last_stride == 1 else 1)
    assert fmap.shape == (2, 1280, size[0] // stride, size[1] // stride)
    out = model(x)
    assert model.embedding_dim == 1280
    for key in ("features", "bn_features", "embedding"):
        assert out[key].shape == (2, model.embedding_dim)
    assert out["logits"].shape == (2, 5)
    (out["logits"].logsumexp(1).sum() + out["features"].pow(2).sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]
    model.eval()
    with torch.no_grad():
        assert model.encode({"image": x})["image"].shape == (2, 1280)


def test_last_activation_off_survives_a_rebuild_from_the_spec() -> None:
    # Checkpoints rebuild encoders from their spec: if `last_activation` were not recorded, the rebuilt model
    # would clip the embedding's pre-activation features with ReLU6 and give different embeddings.
    from reid_lab.embedding.encoder import build_encoder

    model = ReIDModel("mobilenet_v2", num_classes=3, last_activation=False).eval()
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.running_mean.normal_(0, 0.5)
    spec = model.spec()
    assert spec["init_args"]["last_activation"] is False
    rebuilt = build_encoder(spec).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        expected = model(x)["features"]
        torch.testing.assert_close(rebuilt(x)["features"], expected)
        clipped = ReIDModel("mobilenet_v2", num_classes=3).eval()
        clipped.load_state_dict(model.state_dict(), strict=True)
        assert not torch.allclose(clipped(x)["features"], expected)
