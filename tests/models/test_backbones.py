"""Backbone contract (one test per registered name) plus last stride, IBN-a and local weights loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_lab.models import IBN, Backbone, build_backbone, load_weights

IMAGES = (2, 3, 64, 32)

# (name, timm_kwargs); small inputs: ViT is built for 64x32 images (4x2 patches of 16 px).
CONTRACT = [
    ("resnet18", None),
    ("resnet34", None),
    ("resnet50", None),
    ("resnet50_ibn_a", None),
    ("timm:resnet18", None),
    ("timm:vit_tiny_patch16_224", {"img_size": (64, 32)}),
    ("mobilenet_v2", None),
    ("timm:efficientnet_lite0", None),
    ("timm:tf_efficientnet_lite0", None),
]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny tensors: one intra-op thread avoids spin-waiting on a shared CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("name", "timm_kwargs"), CONTRACT, ids=[c[0] for c in CONTRACT])
def test_backbone_contract(name: str, timm_kwargs: dict | None) -> None:
    backbone = build_backbone(name, timm_kwargs=timm_kwargs)
    assert isinstance(backbone, Backbone)
    out = backbone(torch.randn(*IMAGES))

    if backbone.is_spatial:
        assert out.dim() == 4 and out.shape[:2] == (2, backbone.num_features)
    else:
        assert out.shape == (2, backbone.num_features)

    (out * torch.randn_like(out)).sum().backward()
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


def test_expected_spatial_flags_and_dims() -> None:
    assert build_backbone("resnet18").num_features == 512
    assert build_backbone("resnet50").num_features == 2048
    vit = build_backbone("timm:vit_tiny_patch16_224", timm_kwargs={"img_size": (64, 32)})
    assert not vit.is_spatial and vit.num_features == 192


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "timm:resnet18", "mobilenet_v2", "timm:efficientnet_lite0",
             "timm:tf_efficientnet_lite0"]
)
def test_last_stride_one_doubles_the_final_map(name: str) -> None:
    images = torch.randn(*IMAGES)
    s2 = build_backbone(name, last_stride=2).eval()
    s1 = build_backbone(name, last_stride=1).eval()
    with torch.no_grad():
        h2, w2 = s2(images).shape[2:]
        h1, w1 = s1(images).shape[2:]
    assert (h2, w2) == (64 // 32, 32 // 32)
    assert (h1, w1) == (2 * h2, 2 * w2)


def test_bad_last_stride() -> None:
    with pytest.raises(ValueError, match="last_stride must be 1 or 2, got 3"):
        build_backbone("resnet18", last_stride=3)


def test_ibn_a_layout() -> None:
    backbone = build_backbone("resnet50_ibn_a")
    assert isinstance(backbone.bn1, nn.BatchNorm2d)  # stem keeps BN
    for stage in ("layer1", "layer2", "layer3"):
        for block in getattr(backbone, stage):
            assert isinstance(block.bn1, IBN)
            assert block.bn1.IN.num_features == block.bn1.BN.num_features == block.conv1.out_channels // 2
            assert block.bn1.IN.affine
            assert isinstance(block.bn2, nn.BatchNorm2d) and isinstance(block.bn3, nn.BatchNorm2d)
    for block in backbone.layer4:
        assert isinstance(block.bn1, nn.BatchNorm2d)
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in backbone.modules()) == 3 + 4 + 6
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in build_backbone("resnet50").modules())


def test_ibn_matches_functional_instance_and_batch_norm() -> None:
    ibn = IBN(6)
    x = torch.randn(4, 6, 5, 3)
    expected_in = F.instance_norm(x[:, :3], eps=1e-5)  # affine weight 1, bias 0 at init
    expected_bn = F.batch_norm(x[:, 3:], None, None, training=True, eps=1e-5)
    torch.testing.assert_close(ibn(x), torch.cat([expected_in, expected_bn], dim=1))


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9'.*resnet50_ibn_a"):
        build_backbone("resnet9")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_backbone("timm:no_such_net")
    with pytest.raises(ValueError, match="timm_kwargs may not set 'pretrained'"):
        build_backbone("timm:resnet18", timm_kwargs={"pretrained": True})
    with pytest.raises(ValueError, match="only for 'timm:<model_name>'"):
        build_backbone("resnet18", timm_kwargs={"img_size": 32})


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images), b.eval()(images))


def test_weights_round_trip_plain_state_dict(tmp_path) -> None:
    source = build_backbone("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_backbone("resnet18", weights=str(path))
    _same_outputs(source, loaded)


def test_weights_round_trip_prefixed_checkpoint_and_extra_keys(tmp_path, caplog) -> None:
    source = build_backbone("resnet18")
    state = {f"model.backbone.{k}": v for k, v in source.state_dict().items()}
    state["model.head.classifier.weight"] = torch.zeros(5, 512)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    target = build_backbone("resnet18")
    with caplog.at_level("INFO", logger="reid_lab.models.backbones"):
        missing, unexpected = load_weights(target, path)
    assert missing == [] and unexpected == ["model.head.classifier.weight"]
    assert "prefix 'model.backbone.'" in caplog.text and "0 missing, 1 unexpected" in caplog.text
    _same_outputs(source, target)


def test_weights_partial_match_reports_missing_and_shape_mismatch(tmp_path, caplog) -> None:
    state = build_backbone("resnet18").state_dict()
    del state["layer4.1.conv2.weight"]
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)  # wrong shape: skipped, not an error
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with caplog.at_level("INFO", logger="reid_lab.models.backbones"):
        missing, unexpected = load_weights(build_backbone("resnet18"), path)
    assert set(missing) == {"layer4.1.conv2.weight", "conv1.weight"}
    assert unexpected == ["conv1.weight"]
    assert "2 missing, 1 unexpected (1 with a shape mismatch)" in caplog.text
    assert caplog.records[-1].levelname == "WARNING"


def test_weights_timm_state_dict_loads_into_wrapper(tmp_path) -> None:
    import timm

    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "timm_r18.pth"
    torch.save({"model": plain.state_dict()}, path)
    loaded = build_backbone("timm:resnet18", weights=path)
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), plain.eval().forward_features(images))


def test_weights_file_without_matching_keys(tmp_path) -> None:
    path = tmp_path / "unrelated.pth"
    torch.save({"foo.bar": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"no key of weights file .*unrelated\.pth"):
        build_backbone("resnet18", weights=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet50_ibn_a"])
def test_random_init_starts_every_residual_block_as_identity(name):
    # Zero-gamma init (Goyal et al. 2017): with the last BN scale at 0, each block outputs relu(shortcut).
    from torchvision.models.resnet import BasicBlock, Bottleneck

    backbone = build_backbone(name).eval()
    blocks = [m for m in backbone.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    for block in blocks:
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.count_nonzero(last_bn.weight) == 0
    block = next(b for b in blocks if b.downsample is None)
    x = torch.randn(1, block.conv1.in_channels, 8, 4).abs()
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(x))


@pytest.mark.parametrize("name", ["mobilenet_v2", "timm:efficientnet_lite0", "timm:tf_efficientnet_lite0"])
def test_without_the_last_activation_the_map_is_the_pre_relu6_one(name: str) -> None:
    # Same weights (the state dicts have the same keys), eval mode: the ReLU6 of the full backbone applied to
    # the map without it must give the full backbone's map back, and the map must hold negative values (the
    # activation is really gone, not moved).
    full = build_backbone(name, last_stride=1).eval()
    pre = build_backbone(name, last_stride=1, last_activation=False).eval()
    for bn in [m for m in full.modules() if isinstance(m, nn.BatchNorm2d)]:
        bn.running_mean.normal_(0, 0.5)  # non-trivial statistics, so the last BatchNorm shifts both signs
    pre.load_state_dict(full.state_dict(), strict=True)
    images = torch.randn(*IMAGES)
    with torch.no_grad():
        pre_map, full_map = pre(images), full(images)
    assert pre_map.shape == full_map.shape
    assert (pre_map < 0).float().mean() > 0.1
    torch.testing.assert_close(F.relu6(pre_map), full_map)


@pytest.mark.parametrize(
    ("name", "timm_kwargs", "match"),
    [
        ("resnet18", None, "not supported for 'resnet18': a ResNet's last ReLU"),
        ("timm:resnet18", None, "not supported for timm model 'resnet18'.*bn2.act"),
        ("timm:vit_tiny_patch16_224", {"img_size": (64, 32)}, "not supported for timm model 'vit_tiny"),
    ],
)
def test_last_activation_off_is_refused_where_there_is_no_final_activation_to_drop(name, timm_kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(name, last_activation=False, timm_kwargs=timm_kwargs)


# ------------------------------------------------------------------------------- CLIP image tower backbone
CLIP_TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1}}


@pytest.mark.parametrize(("feature", "dim"), [("cls", 64), ("proj", 32), ("cls+proj", 96)])
def test_clip_backbone_contract_dims_and_gradients(feature: str, dim: int) -> None:
    backbone = build_backbone("clip", clip_kwargs={"model_cfg": CLIP_TINY, "image_size": [64, 32],
                                                   "feature": feature})
    assert isinstance(backbone, Backbone) and not backbone.is_spatial and backbone.num_features == dim
    assert backbone.visual.positional_embedding.shape == (1 + 4 * 2, 64)  # a 4x2 grid of 16-px patches
    out = backbone(torch.randn(*IMAGES))
    assert out.shape == (2, dim)
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_clip_pos_embed_interpolation_equals_open_clips_resize() -> None:
    import open_clip

    from reid_lab.models.clip_backbone import interpolate_pos_embed

    pos = torch.randn(1 + 14 * 14, 48)
    target = open_clip.model.CLIP(**{**CLIP_TINY, "vision_cfg": {**CLIP_TINY["vision_cfg"], "image_size": [256, 128]}})
    state = {"visual.positional_embedding": pos.clone()}
    open_clip.model.resize_pos_embed(state, target)  # open_clip's resize to the model's 16x8 grid
    ours = interpolate_pos_embed(pos, (16, 8))
    assert ours.shape == (1 + 16 * 8, 48)
    torch.testing.assert_close(ours, state["visual.positional_embedding"])
    torch.testing.assert_close(ours[0], pos[0])  # the class token's embedding is kept


def test_clip_backbone_from_a_clip_file_equals_open_clips_image_tower(tmp_path) -> None:
    """A whole CLIP checkpoint (text tower included, DDP prefix) at a ReID size: the backbone's projected
    feature equals open_clip's own loader's encode_image at the same size, and the class-token part is its
    pre-projection input."""
    import json

    import open_clip

    torch.manual_seed(3)
    source = open_clip.model.CLIP(**CLIP_TINY)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    folder = tmp_path / "layout"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_TINY}))
    torch.save(source.state_dict(), folder / "open_clip_pytorch_model.bin")
    theirs = open_clip.create_model(f"local-dir:{folder}", force_image_size=(96, 48)).eval()
    backbone = build_backbone("clip", weights=path,
                              clip_kwargs={"model_cfg": CLIP_TINY, "image_size": [96, 48]}).eval()
    images = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        out = backbone(images)
        torch.testing.assert_close(out[:, 64:], theirs.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 64:], out[:, :64] @ backbone.visual.proj, atol=1e-6, rtol=1e-6)


def test_clip_backbone_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'No-Such-ViT'"):
        build_backbone("clip:No-Such-ViT")
    with pytest.raises(ValueError, match="clip_kwargs are only for"):
        build_backbone("resnet18", clip_kwargs={"image_size": [64, 32]})
    with pytest.raises(ValueError, match="unknown clip_kwargs"):
        build_backbone("clip", clip_kwargs={"model_cfg": CLIP_TINY, "img_size": [64, 32]})
    path = tmp_path / "resnet.pt"
    torch.save(build_backbone("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet\.pt.*holds no CLIP image tower"):
        build_backbone("clip", weights=path, clip_kwargs={"model_cfg": CLIP_TINY})


def test_reid_model_builds_a_clip_tower_from_clip_kwargs_and_takes_its_pixel_statistics(tmp_path):
    """The CLIP-ReID recipe's model: a CLIP image tower at the ReID size inside ReIDModel, OpenAI's mean / std."""
    import open_clip

    from reid_lab.models.reid_model import ReIDModel

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    source = open_clip.CLIP(**cfg)
    weights = tmp_path / "clip.pt"
    torch.save(source.state_dict(), weights)
    model = ReIDModel("clip", num_classes=5, weights=weights,
                      clip_kwargs={"model_cfg": cfg, "image_size": [48, 24], "feature": "proj"})
    out = model.eval().encode({"image": torch.zeros(2, 3, 48, 24)})
    assert out["image"].shape == (2, 16)
    assert model.spec()["init_args"]["clip_kwargs"]["feature"] == "proj"
    assert model.renormalize  # images arrive ImageNet-normalised; the tower expects OpenAI's statistics
    assert tuple(model.spec()["init_args"]["input_norm"]["mean"]) == tuple(open_clip.OPENAI_DATASET_MEAN)
