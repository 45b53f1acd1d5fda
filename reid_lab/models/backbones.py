"""Backbones: one contract for every architecture (fast-reid's backbone / head split, timm's shared API).

Every backbone returned by :func:`build_backbone` is a :class:`Backbone`:

* ``forward(images)`` with ``images`` of shape ``(B, 3, H, W)`` returns a feature map ``(B, C, h, w)`` when
  :attr:`Backbone.is_spatial` is True (CNNs; the model's pooling layer follows), or an already pooled
  vector ``(B, C)`` when it is False (token models such as ViT, pooled by timm's own ``forward_head``).
* :attr:`Backbone.num_features` is ``C``.

Names: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` (torchvision, random init), ``"resnet50_ibn_a"``
(IBN-Net-a, :mod:`reid_lab.models.ibn`), ``"mobilenet_v2"`` (torchvision's features, 1280-d) and
``"timm:<model_name>"`` for any timm model, ``"clip:<open_clip model name>"`` (or ``"clip"`` with an inline
``model_cfg`` in ``clip_kwargs``) for an open_clip ViT image tower (:class:`CLIPViTBackbone`). Weights are never downloaded: pass a local file as ``weights``,
or ``pretrained="imagenet"`` for the backbones whose weights ship in an installed package
(:mod:`reid_lab.models.pretrained`).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet18, resnet34, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from reid_lab.models.clip_backbone import load_clip_state_dict, read_clip_state_dict, visual_prefix
from reid_lab.models.ibn import resnet50_ibn_a
from reid_lab.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_state_dict_strict,
    pretrained_weights,
)

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
CLIP_PREFIX = "clip:"
CLIP_FEATURES = ("cls", "proj", "cls+proj")
# the normalisation CLIP's weights were trained with (OpenAI's; open_clip's OPENAI_DATASET_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESNETS: dict[str, Callable[[], ResNet]] = {
    "resnet18": lambda: resnet18(weights=None),
    "resnet34": lambda: resnet34(weights=None),
    "resnet50": lambda: resnet50(weights=None),
    "resnet50_ibn_a": resnet50_ibn_a,
}

BACKBONE_NAMES: tuple[str, ...] = (*_RESNETS, "mobilenet_v2", TIMM_PREFIX + "<model_name>",
                                   CLIP_PREFIX + "<open_clip model name>", "clip")


class Backbone(nn.Module):
    """Base class of all backbones.

    Attributes:
        num_features: channels ``C`` of the output.
        is_spatial: True if :meth:`forward` returns a map ``(B, C, h, w)`` that still needs pooling,
            False if it returns pooled features ``(B, C)``.
    """

    num_features: int
    is_spatial: bool
    #: what the weights started from (``"imagenet:<package>==<version>:<sha>"``), None for random init / a file
    pretrained_source: str | None = None
    #: RGB mean / std the loaded pretrained weights expect (ImageNet's unless a source says otherwise)
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights_target(self) -> nn.Module:
        """The module whose ``state_dict`` keys published checkpoints use (see :func:`load_weights`)."""
        return self

    def pretrained_ignore(self) -> tuple[str, ...]:
        """Key prefixes of converted pretrained weights that this backbone does not hold (an ImageNet head)."""
        return ()


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 ``features`` (Sandler et al. CVPR'18): ``(B, 3, H, W) -> (B, 1280, H/s, W/s)``.

    ``s`` is 32, or 16 with ``last_stride=1``: the last stride-2 block (``features.14``, the first 160-channel
    inverted residual; it has no shortcut) keeps the resolution, as BoT does for ResNet's ``layer4``. At
    256x128 that gives a 16x8 map instead of 8x4. Parameter names equal torchvision's (``features.0.0.weight``
    ...), so its ImageNet files load unchanged.

    Args:
        last_stride: 2 (torchvision) or 1.
        last_activation: False drops the ReLU6 after the last 1x1 convolution's BatchNorm (``features.18.2``):
            the map is then the pre-activation one (see :func:`build_backbone`).
    """

    def __init__(self, last_stride: int = 2, last_activation: bool = True) -> None:
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.features = mobilenet_v2(weights=None).features
        if last_stride == 1:
            depthwise = self.features[14].conv[1][0]
            assert depthwise.stride == (2, 2), "torchvision's MobileNetV2 layout changed"
            depthwise.stride = (1, 1)
        if not last_activation:
            assert isinstance(self.features[18][2], nn.ReLU6), "torchvision's MobileNetV2 layout changed"
            self.features[18][2] = nn.Identity()
        self.num_features = 1280
        self.is_spatial = True

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


class ResNetBackbone(Backbone):
    """A torchvision ResNet without its pooling and classifier: ``(B, 3, H, W) -> (B, C, H/s, W/s)``.

    ``s`` is 32, or 16 with ``last_stride=1`` (BoT, Luo et al. CVPRW'19 §3.4: a larger final map helps ReID
    at no parameter cost). Parameter names equal torchvision's (``conv1.weight``, ``layer1.0.bn1.weight``,
    ...) so ImageNet state dicts load unchanged.

    Args:
        resnet: a torchvision ``ResNet`` (its ``avgpool`` and ``fc`` are dropped).
        last_stride: stride of ``layer4``: 2 (torchvision) or 1.
    """

    def __init__(self, resnet: ResNet, last_stride: int = 2) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )
        set_stage_stride(self.layer4, last_stride)
        self.num_features = resnet.fc.in_features
        self.is_spatial = True

    def forward(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TimmBackbone(Backbone):
    """Any timm model, created with ``pretrained=False, num_classes=0``.

    If ``forward_features`` returns an NCHW map (channels equal to the pooled dimension) that uses every
    parameter of the model, the backbone is spatial and returns that map (the ReID pooling replaces timm's).
    Otherwise (ViT tokens, Swin's channels-last maps, heads with their own layers such as ConvNeXt's norm or
    MobileNetV3's ``conv_head``) it returns ``forward_head(x, pre_logits=True)``, shape ``(B, C)``. This is decided once at construction by a probe forward pass on a small input.

    Args:
        model_name: timm model name (without the ``"timm:"`` prefix).
        last_stride: 1 sets the stride of the last stage to 1 where the model has a ResNet-style ``layer4``
            or EfficientNet / MobileNet-style ``blocks`` stages (the last stage whose first block has a
            stride-2 convolution); ignored (with a warning) for other spatial models, irrelevant for token
            models.
        timm_kwargs: extra keyword arguments of ``timm.create_model`` (e.g. ``img_size=(256, 128)``).
        last_activation: False drops the activation of the head's normalisation layer (``bn2.act`` of timm's
            EfficientNet / MobileNet family); other models raise (see :func:`build_backbone`).
    """

    def __init__(
        self, model_name: str, last_stride: int = 2, timm_kwargs: Mapping[str, Any] | None = None,
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        import timm

        kwargs = dict(timm_kwargs or {})
        for key in ("pretrained", "num_classes"):
            if key in kwargs:
                raise ValueError(
                    f"timm_kwargs may not set {key!r} (got {kwargs[key]!r}): backbones are built with "
                    "pretrained=False, num_classes=0; pass a local weights file as `weights` instead"
                )
        if not timm.is_model(model_name):
            raise ValueError(
                f"unknown timm model {model_name!r} (from backbone name {TIMM_PREFIX + model_name!r}); "
                "see timm.list_models()"
            )
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        stride_applied = False
        if last_stride == 1 and isinstance(getattr(self.model, "layer4", None), nn.Sequential):
            set_stage_stride(self.model.layer4, 1)
            stride_applied = True
        elif last_stride == 1:
            stage = _last_strided_stage(getattr(self.model, "blocks", None))
            if stage is not None:
                set_stage_stride(stage, 1)
                stride_applied = True
        if not last_activation:
            head_norm = getattr(self.model, "bn2", None)
            if not isinstance(getattr(head_norm, "act", None), nn.Module):
                raise ValueError(
                    f"last_activation=False is not supported for timm model {model_name!r}: it has no head "
                    "normalisation layer with an activation (`bn2.act`, timm's EfficientNet / MobileNet family)"
                )
            head_norm.act = nn.Identity()
        self.is_spatial, self.num_features = self._probe()
        if last_stride == 1 and self.is_spatial and not stride_applied:
            log.warning(
                "last_stride=1 is not supported for timm model %r (no ResNet-style layer4); stride unchanged",
                model_name,
            )

    def _probe_size(self) -> tuple[int, int]:
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            return int(img_size[0]), int(img_size[1])
        return 64, 64

    def _probe(self) -> tuple[bool, int]:
        was_training = self.model.training
        self.model.eval()
        try:
            x = torch.zeros(1, 3, *self._probe_size())
            params = [p for p in self.model.parameters() if p.requires_grad]
            with torch.enable_grad():
                fmap = self.model.forward_features(x)
                if fmap.dim() == 4 and params:
                    grads = torch.autograd.grad(fmap.sum(), params, allow_unused=True)
                    uses_all = all(g is not None for g in grads)
                else:
                    uses_all = fmap.dim() == 4
            with torch.no_grad():
                pooled = self.model.forward_head(fmap.detach(), pre_logits=True)
            # channels-last maps (Swin: B, H, W, C) are not spatial in our NCHW sense: timm pools them.
            if fmap.dim() == 4 and uses_all and fmap.shape[1] == pooled.shape[-1]:
                return True, int(fmap.shape[1])
            return False, int(pooled.shape[-1])
        finally:
            self.model.train(was_training)

    def forward(self, images: Tensor) -> Tensor:
        x = self.model.forward_features(images)
        if self.is_spatial:
            return x
        return self.model.forward_head(x, pre_logits=True)

    def weights_target(self) -> nn.Module:
        return self.model

    def pretrained_ignore(self) -> tuple[str, ...]:
        head = self.model.pretrained_cfg.get("classifier") if hasattr(self.model, "pretrained_cfg") else None
        return (f"{head}.",) if isinstance(head, str) else ()


def _clip_vision_cfg(model_name: str | None, model_cfg: Mapping[str, Any] | None) -> tuple[dict[str, Any], int, bool]:
    """``(vision_cfg, embed_dim, quick_gelu)`` of an open_clip built-in config or an inline one."""
    import open_clip

    if (model_name is None) == (model_cfg is None):
        raise ValueError("a CLIP backbone needs exactly one of an open_clip config name ('clip:ViT-B-16-quickgelu') "
                         "or clip_kwargs.model_cfg (an open_clip config with embed_dim and vision_cfg)")
    cfg = dict(open_clip.get_model_config(model_name) or {}) if model_name is not None else dict(model_cfg)
    if model_name is not None and not cfg:
        raise ValueError(f"unknown open_clip model {model_name!r} (from backbone name "
                         f"{CLIP_PREFIX + model_name!r}); see open_clip.list_models()")
    if "embed_dim" not in cfg or not isinstance(cfg.get("vision_cfg"), Mapping):
        raise ValueError(f"clip_kwargs.model_cfg must hold embed_dim and vision_cfg (open_clip's config layout), "
                         f"got keys {sorted(cfg)}")
    return dict(cfg["vision_cfg"]), int(cfg["embed_dim"]), bool(cfg.get("quick_gelu", False))


class CLIPViTBackbone(Backbone):
    """An open_clip ViT image tower as a ReID backbone: ``(B, 3, H, W) -> (B, num_features)`` (not spatial).

    The tower is held as ``visual``, so parameter names equal a CLIP checkpoint's (``visual.conv1.weight`` ...)
    and the image part of a whole CLIP file (open_clip's or OpenAI's layout, any key prefix before ``visual.``;
    :func:`~reid_lab.models.clip_backbone.read_clip_state_dict`) loads strictly. It is built at the ReID input
    size, with the file's positional embedding resized to that patch grid as CLIP-ReID does for ViT-B/16 at
    256x128 (14x14 -> 16x8; bicubic as open_clip's ``resize_pos_embed``). Patches do not overlap (stride = patch
    size; CLIP-ReID's overlapping-patch option is not provided).

    ``feature``: ``"cls"``, the class token after ``ln_post`` (``width``: 768 for ViT-B/16; the projection is
    removed so that every parameter is used); ``"proj"``, its projection into CLIP's space (``embed_dim``: 512);
    ``"cls+proj"``, both concatenated (1280), CLIP-ReID's test feature.

    Args:
        model_name / model_cfg: an open_clip built-in config (``ViT-B-16-quickgelu`` for OpenAI's weights, which
            were trained with QuickGELU) or an inline one (``embed_dim``, ``vision_cfg``, optional ``quick_gelu``).
        image_size: ``(H, W)`` input size (``None``: the config's).
        weights: a local CLIP weights file.
        feature: see above.
        quick_gelu: override the config's activation.
    """

    input_mean = CLIP_MEAN
    input_std = CLIP_STD

    def __init__(self, model_name: str | None = None, model_cfg: Mapping[str, Any] | None = None,
                 image_size: Any = None, weights: str | Path | None = None, feature: str = "cls+proj",
                 quick_gelu: bool | None = None) -> None:
        super().__init__()
        import open_clip

        if feature not in CLIP_FEATURES:
            raise ValueError(f"clip_kwargs.feature must be one of {CLIP_FEATURES}, got {feature!r}")
        vision_cfg, embed_dim, cfg_quick_gelu = _clip_vision_cfg(model_name, model_cfg)
        if not isinstance(vision_cfg.get("layers"), int) or vision_cfg.get("timm_model_name"):
            raise ValueError(f"a CLIP backbone takes a ViT image tower (vision_cfg.layers an integer), got "
                             f"layers={vision_cfg.get('layers')!r}; ResNets and timm models are backbones of "
                             "their own")
        if image_size is not None:
            if isinstance(image_size, int) or len(image_size) != 2:
                raise ValueError(f"clip_kwargs.image_size must be [height, width], got {image_size!r}")
            vision_cfg["image_size"] = [int(s) for s in image_size]
        self.visual = open_clip.model._build_vision_tower(
            embed_dim, vision_cfg, quick_gelu=cfg_quick_gelu if quick_gelu is None else bool(quick_gelu))
        for step in ("_embeds", "_pool"):  # open_clip's VisionTransformer steps: the class token before projection
            if not callable(getattr(self.visual, step, None)):
                raise RuntimeError(f"open_clip {open_clip.__version__}'s VisionTransformer has no {step}()")
        self.feature = feature
        self.is_spatial = False
        width = int(self.visual.ln_post.weight.shape[0])
        self.num_features = {"cls": width, "proj": embed_dim, "cls+proj": width + embed_dim}[feature]
        if weights is not None:
            self.load_clip_weights(weights)
        if feature == "cls":
            self.visual.proj = None

    def load_clip_weights(self, path: str | Path) -> None:
        """Load the ``visual.*`` tensors of a CLIP weights file strictly (positional embedding resized)."""
        state = read_clip_state_dict(path)
        prefix = visual_prefix(list(state))
        if prefix is None:
            raise ValueError(f"weights file {str(path)!r} holds no CLIP image tower (no visual.conv1.weight or "
                             f"visual.positional_embedding key); its keys look like {list(state)[:3]}")
        tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix + "visual.")}
        load_clip_state_dict(self, tower, path, visual=self.visual)

    def forward(self, images: Tensor) -> Tensor:
        pooled, _ = self.visual._pool(self.visual.transformer(self.visual._embeds(images)))
        if self.feature == "cls":
            return pooled
        projected = pooled @ self.visual.proj
        return projected if self.feature == "proj" else torch.cat([pooled, projected], dim=1)


def _last_strided_stage(blocks: Any) -> nn.Sequential | None:
    """The last stage of timm's ``blocks`` (a Sequential of Sequential stages) whose first block downsamples."""
    if not isinstance(blocks, nn.Sequential):
        return None
    for stage in reversed(list(blocks)):
        if isinstance(stage, nn.Sequential) and len(stage) and any(
            isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in stage[0].modules()
        ):
            return stage
    return None


def set_stage_stride(stage: nn.Sequential, stride: int) -> None:
    """Set the stride of a ResNet stage (its first block) to ``stride`` (1 or 2), in place.

    Every stride-2 convolution in the first block becomes stride-1 (main path and shortcut); an average
    pool used as the shortcut's downsampling (ResNet-D) becomes an identity.
    """
    if stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {stride}")
    if stride == 2:
        return
    first = stage[0]
    for name, module in list(first.named_modules()):
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
            parent = first.get_submodule(name.rsplit(".", 1)[0]) if "." in name else first
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            return tensors
    raise ValueError(
        f"weights file {str(path)!r} holds no state dict: expected a mapping of parameter names to tensors, "
        "or a checkpoint dict with a 'state_dict' or 'model' entry"
    )


def _best_prefix(source_keys: list[str], target_keys: set[str]) -> str | None:
    """The key prefix (``""``, ``"module."``, ``"backbone."``, ...) under which most source keys match."""
    votes: Counter[str] = Counter()
    for key in source_keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in target_keys:
                votes[".".join(parts[:i]) + "." if i else ""] += 1
                break
    return votes.most_common(1)[0][0] if votes else None


def _load_weights_only(path: Path) -> Any:
    """``torch.load`` a weights file as plain data: tensors and containers, never pickled code.

    A weights file is data: ``weights_only=False`` would run whatever callable its pickle names
    (``os.system`` included), so a file that needs it is refused with the one-line conversion for a trusted file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only load failed" not in text.lower():  # not a torch.save file at all (truncated, foreign)
            first = text.splitlines()[0] if text else type(err).__name__
            raise ValueError(f"weights file {str(path)!r} is not a readable torch.save file: {first}") from err
        # Name the refused global only: torch's own advice (allow-listing it) is not ours to repeat.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f"it names {found.group(1)}" if found else "refused by weights_only=True"
        raise ValueError(
            f"weights file {str(path)!r} is not plain tensors: loading it would unpickle arbitrary objects "
            f"({what}), and reid_lab never runs "
            "code from a data file. If you trust the file, convert it once to a plain state dict: "
            f"python -c \"import torch; torch.save(torch.load({str(path)!r}, weights_only=False)['state_dict'], "
            "'plain.pt')\" (index the entry that holds the tensors, or none if the file is one) and pass plain.pt"
        ) from err
    except (RuntimeError, OSError, EOFError) as err:  # truncated zip, not a torch file
        raise ValueError(f"weights file {str(path)!r} is not a readable torch.save file: {err}") from err


def load_weights(module: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``module`` non-strictly.

    Accepts a plain state dict or a checkpoint dict with a ``"state_dict"`` (Lightning) or ``"model"``
    (fast-reid, detectron2) entry. A common key prefix (``module.``, ``backbone.``, ``model.backbone.``, ...)
    is detected and stripped; tensors whose shape differs from the target are skipped.

    Args:
        module: the module to load into.
        path: the file (``torch.save`` output).

    Returns:
        ``(missing_keys, unexpected_keys)``; their counts are logged.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not plain tensors (it would need ``weights_only=False``, i.e. running pickled
            code: refused), or no key of the file matches a parameter of ``module``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    obj = _load_weights_only(path)
    source = _extract_state_dict(obj, path)
    target = module.state_dict()
    prefix = _best_prefix(list(source), set(target))
    if prefix is None:
        raise ValueError(
            f"no key of weights file {str(path)!r} matches {type(module).__name__}: file keys look like "
            f"{list(source)[:3]}, expected keys like {list(target)[:3]}"
        )
    renamed = {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
    mismatched = [k for k, v in renamed.items() if k in target and target[k].shape != v.shape]
    for k in mismatched:
        del renamed[k]
    result = module.load_state_dict(renamed, strict=False)
    unexpected = list(result.unexpected_keys) + [k for k in source if not k.startswith(prefix)] + mismatched
    # Missing keys leave part of the backbone randomly initialised: worth a warning, unexpected ones are not.
    log.log(
        logging.WARNING if result.missing_keys else logging.INFO,
        "loaded %s into %s (prefix %r): %d tensors loaded, %d missing, %d unexpected (%d with a shape mismatch)",
        path,
        type(module).__name__,
        prefix,
        len(renamed) - len(result.unexpected_keys),
        len(result.missing_keys),
        len(unexpected),
        len(mismatched),
    )
    return list(result.missing_keys), unexpected


def zero_init_residual(resnet: ResNet) -> None:
    """Zero the scale of the last BatchNorm of every residual branch, so each block starts as the identity.

    "Zero-γ" initialisation (Goyal et al. 2017, "Accurate, Large Minibatch SGD", §5.1; torchvision's
    ``zero_init_residual``): deep ResNets trained from random init (our offline default) converge much faster,
    which matters for short CPU schedules. Pretrained weights loaded afterwards overwrite it.
    """
    for module in resnet.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def build_backbone(
    name: str,
    *,
    last_stride: int = 2,
    weights: str | Path | None = None,
    pretrained: str | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
    last_activation: bool = True,
    clip_kwargs: Mapping[str, Any] | None = None,
) -> Backbone:
    """Build a backbone by name (random init unless ``weights`` / ``pretrained``; never downloads).

    Args:
        name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet50_ibn_a"``, ``"mobilenet_v2"`` or
            ``"timm:<model_name>"``.
        last_stride: stride of the last stage, 2 (ImageNet default) or 1 (BoT).
        weights: optional local weights file, loaded with :func:`load_weights`.
        pretrained: ``"imagenet"`` for weights shipped in an installed package (``mobilenet_v2``,
            ``timm:efficientnet_lite0``, ``timm:tf_efficientnet_lite0``; see :mod:`reid_lab.models.pretrained`),
            converted, strictly checked and loaded; sets :attr:`Backbone.pretrained_source`. Excludes ``weights``.
        timm_kwargs: extra ``timm.create_model`` arguments, only for ``"timm:"`` names.
        last_activation: False removes the activation (ReLU6) after the last BatchNorm, so the map (and the
            pooled ReID feature) is the pre-activation one, for ``mobilenet_v2`` and timm's EfficientNet /
            MobileNet family. The ImageNet head of EfficientNet-Lite0 leaves ~90 % of its ReLU6 outputs at zero
            on ReID crops, and those channels get no gradient; without the activation it fine-tunes about three
            times faster (docs/trials.md). No weight changes, so pretrained files load as they
            are. ResNets (whose last ReLU sits inside the residual block) raise ``ValueError``.
        clip_kwargs: for ``"clip:<name>"`` / ``"clip"`` backbones, :class:`CLIPViTBackbone`'s ``image_size``
            (the ReID input, e.g. ``[256, 128]``), ``feature``, ``quick_gelu`` and (``"clip"`` only) ``model_cfg``.
            ``weights`` is read as a CLIP file (open_clip's or OpenAI's layout) and loaded strictly.

    Returns:
        A :class:`Backbone`.

    Example:
        >>> bb = build_backbone("resnet18", last_stride=1)
        >>> bb(torch.zeros(2, 3, 64, 32)).shape
        torch.Size([2, 512, 4, 2])
    """
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    if weights is not None and pretrained is not None:
        raise ValueError(f"pass either weights ({str(weights)!r}) or pretrained ({pretrained!r}), not both")
    if clip_kwargs and not (name == "clip" or name.startswith(CLIP_PREFIX)):
        raise ValueError(f"clip_kwargs are only for 'clip:<open_clip model>' backbones, got {dict(clip_kwargs)} "
                         f"for {name!r}")
    if name == "clip" or name.startswith(CLIP_PREFIX):
        # last_stride does not apply to a token model (as for timm ViTs); the rest would be silently ignored
        if timm_kwargs or pretrained is not None or not last_activation:
            raise ValueError(f"backbone {name!r} takes clip_kwargs and a local weights file only (no timm_kwargs, "
                             "pretrained or last_activation)")
        kwargs = dict(clip_kwargs or {})
        unknown = sorted(set(kwargs) - {"image_size", "feature", "quick_gelu", "model_cfg"})
        if unknown:
            raise ValueError(f"unknown clip_kwargs {unknown}; expected image_size, feature, quick_gelu, model_cfg")
        if name.startswith(CLIP_PREFIX) and "model_cfg" in kwargs:
            raise ValueError(f"backbone {name!r} names its open_clip config; clip_kwargs.model_cfg is for 'clip'")
        model_name = name[len(CLIP_PREFIX):] if name.startswith(CLIP_PREFIX) else None
        return CLIPViTBackbone(model_name=model_name, weights=weights, **kwargs)
    if name.startswith(TIMM_PREFIX):
        backbone: Backbone = TimmBackbone(
            name[len(TIMM_PREFIX) :], last_stride=last_stride, timm_kwargs=timm_kwargs,
            last_activation=last_activation,
        )
    elif name in _RESNETS:
        if timm_kwargs:
            raise ValueError(
                f"timm_kwargs are only for 'timm:<model_name>' backbones, got {dict(timm_kwargs)} for {name!r}"
            )
        if not last_activation:
            raise ValueError(
                f"last_activation=False is not supported for {name!r}: a ResNet's last ReLU is inside its last "
                "residual block; it is available for mobilenet_v2 and timm's EfficientNet / MobileNet family"
            )
        resnet = _RESNETS[name]()
        if weights is None:
            zero_init_residual(resnet)
        backbone = ResNetBackbone(resnet, last_stride=last_stride)
    elif name == "mobilenet_v2":
        if timm_kwargs:
            raise ValueError(
                f"timm_kwargs are only for 'timm:<model_name>' backbones, got {dict(timm_kwargs)} for {name!r}"
            )
        backbone = MobileNetV2Backbone(last_stride=last_stride, last_activation=last_activation)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of {list(BACKBONE_NAMES)}")
    if weights is not None:
        load_weights(backbone.weights_target(), weights)
    if pretrained is not None:
        loaded = pretrained_weights(name, pretrained)
        load_state_dict_strict(
            backbone.weights_target(), loaded.state_dict, ignore_prefixes=backbone.pretrained_ignore(),
            what=f"pretrained={pretrained!r} weights ({loaded.record})",
        )
        backbone.pretrained_source = loaded.record
        backbone.input_mean, backbone.input_std = loaded.source.input_mean, loaded.source.input_std
    return backbone
