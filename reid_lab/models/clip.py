"""``CLIPEncoder``: an open_clip dual encoder (image tower + text tower, one shared space) as an Encoder.

The model comes from an open_clip built-in config name (random init: nothing is downloaded), an inline
config (``model_cfg``: ``embed_dim``, ``vision_cfg``, ``text_cfg`` as in open_clip's JSON configs, e.g. a tiny
ViT at a ReID input size such as ``[128, 64]``), and optionally the packaged MiniLM sentence encoder as a
Hugging Face text tower (``text_tower: minilm_l6``; its weights load from the installed package). A locked
text tower (``lock_text``: the pretrained tower is frozen as LiT, Zhai et al. CVPR'22, freezes its pretrained
image tower) has no gradients and stays in eval mode, so its dropout is off (open_clip's ``lock_text_tower``
alone leaves it on); its projection into the shared space stays trainable.

Inputs: ``batch["image"]`` ``(B, 3, H, W)`` and / or ``batch["text"]`` ``(B, L)`` token ids of the model's
tokenizer (:meth:`CLIPEncoder.tokenizer`). Outputs: ``{"image": (B, D), "text": (B, D)}``, not normalised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
from torch import Tensor, nn

from reid_lab.embedding.encoder import Encoder
from reid_lab.models.backbones import build_backbone
from reid_lab.models.clip_backbone import load_clip_state_dict, read_clip_state_dict
from reid_lab.models.pooling import build_pooling
from reid_lab.models.text import open_clip_text_cfg

LOCAL_DIR = "local-dir:"
LOCAL_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _config_file(path: Path) -> dict[str, Any]:
    """An open_clip model config from a JSON file: the config itself or ``{"model_cfg": {...}, ...}``."""
    if not path.is_file():
        raise ValueError(f"model_cfg file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model_cfg file {path} is not valid JSON: {err}") from err
    cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or "embed_dim" not in cfg:
        raise ValueError(f"{path}: expected an open_clip model config (with embed_dim, vision_cfg, text_cfg)")
    return dict(cfg)


def _local_dir(folder: str) -> tuple[dict[str, Any], Path | None]:
    """open_clip's ``local-dir:`` layout: ``open_clip_config.json`` and optional weights beside it."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"local-dir {root} does not exist")
    cfg = _config_file(root / "open_clip_config.json")
    weights = next((root / name for name in LOCAL_WEIGHTS if (root / name).is_file()), None)
    return cfg, weights


class BackboneImageTower(nn.Module):
    """A reid_lab backbone (ResNet, MobileNetV2, any timm model; ImageNet weights from a package) + global
    pooling + a linear projection into the shared space: ``(B, 3, H, W) -> (B, embed_dim)``."""

    def __init__(self, backbone: str, embed_dim: int, pretrained: str | None = None, last_stride: int = 2,
                 pooling: str = "avg") -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, last_stride=last_stride, pretrained=pretrained)
        self.pool = build_pooling(pooling) if self.backbone.is_spatial else nn.Identity()
        self.proj = nn.Linear(self.backbone.num_features, embed_dim, bias=False)
        self.output_dim = embed_dim

    def forward(self, images: Tensor) -> Tensor:
        features = self.pool(self.backbone(images))
        return self.proj(features.flatten(1))


class CLIPEncoder(Encoder):
    """An open_clip model behind the encoder contract.

    Args:
        model_name: an open_clip built-in config (``open_clip.list_models()``), built with random weights; or
            ``local-dir:<folder>`` in open_clip's layout (``open_clip_config.json`` + optional
            ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``, loaded).
        model_cfg: an inline open_clip config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) or a JSON file
            holding one; exclusive with ``model_name``. A file or folder is recorded as the config it held, so
            checkpoints rebuild without it.
        image_size: ``[H, W]`` input size (overrides the config's; ReID uses e.g. ``[256, 128]``).
        text_tower: ``"minilm_l6"``: the packaged all-MiniLM-L6-v2 as the text tower (mean pooling + a linear
            projection to ``embed_dim``), loaded from its installed package.
        context_length: tokens per caption (with ``text_tower``; else the config's).
        lock_text: freeze the text tower (LiT) and keep it in eval mode.
        weights: a local weights file to start from, in open_clip's layout (a state dict, plain or
            ``{"state_dict": ...}``, ``.pt`` / ``.bin`` / ``.safetensors``) or OpenAI's (the published
            ``ViT-B-16.pt`` TorchScript archive, read as data; build it with ``model_name: ViT-B-16-quickgelu``:
            OpenAI's models use QuickGELU). Loaded strictly; the image positional embedding is resized to
            ``image_size``'s patch grid (e.g. 14x14 -> 16x8 for ViT-B/16 at 256x128) and the text one to the
            context length, as open_clip's ``load_checkpoint`` does.
        image_backbone: replace the config's image tower by a reid_lab backbone + pooling + projection
            (e.g. ``mobilenet_v2``), started from ``image_pretrained`` (``imagenet``: weights from a package).
    """

    modalities = ("image", "text")
    init_only_args = ("weights", "image_pretrained")

    def __init__(
        self,
        model_name: str | None = None,
        model_cfg: dict[str, Any] | str | None = None,
        image_size: list[int] | tuple[int, int] | None = None,
        text_tower: str | None = None,
        context_length: int = 32,
        lock_text: bool = False,
        weights: str | None = None,
        image_backbone: str | None = None,
        image_pretrained: str | None = None,
    ) -> None:
        super().__init__()
        self.record_init_args(model_name=model_name, model_cfg=model_cfg, image_size=image_size,
                              text_tower=text_tower, context_length=context_length, lock_text=lock_text,
                              weights=weights, image_backbone=image_backbone, image_pretrained=image_pretrained)
        if image_pretrained is not None and image_backbone is None:
            raise ValueError("image_pretrained needs image_backbone (a reid_lab backbone name)")
        if (model_name is None) == (model_cfg is None):
            raise ValueError("give exactly one of model_name (an open_clip config name) or model_cfg (a config)")
        local_weights = None
        if model_name is not None and str(model_name).startswith(LOCAL_DIR):
            cfg, local_weights = _local_dir(str(model_name)[len(LOCAL_DIR):])
        elif isinstance(model_cfg, (str, Path)):
            cfg = _config_file(Path(model_cfg))
        else:
            cfg = dict(open_clip.get_model_config(model_name) or {}) if model_name else dict(model_cfg)
        if model_name and not cfg:
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        if local_weights is not None or isinstance(model_cfg, (str, Path)):
            # the checkpoint rebuilds from the config itself, not from a folder that may be gone
            self._init_args.update(model_name=None, model_cfg=json.loads(json.dumps(cfg)))
        cfg["vision_cfg"] = dict(cfg.get("vision_cfg") or {})
        cfg["text_cfg"] = dict(cfg.get("text_cfg") or {})
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = list(image_size)
        if text_tower is not None:
            cfg["text_cfg"] = open_clip_text_cfg(text_tower, context_length=context_length)
        for key in ("timm_model_pretrained",):  # never download image-tower weights
            if cfg["vision_cfg"].get(key):
                raise ValueError(f"vision_cfg.{key} would download weights; start from a local file instead")
        self.config = cfg
        if "hf_model_name" in cfg["text_cfg"]:
            self.model = open_clip.model.CustomTextCLIP(**cfg)  # reads the HF tower's weights from its folder
        else:
            self.model = open_clip.model.CLIP(**cfg)
        if image_backbone is not None:
            self.model.visual = BackboneImageTower(image_backbone, int(cfg["embed_dim"]), pretrained=image_pretrained)
        # strict, positional embeddings resized to image_size / context_length (reid_lab.models.clip_backbone)
        for path in (local_weights, weights):
            if path is not None:
                load_clip_state_dict(self.model, read_clip_state_dict(path), path)
        self.lock_text = bool(lock_text)
        if self.lock_text:
            for p in self._text_parameters():
                p.requires_grad_(False)

    def _text_modules(self) -> list[nn.Module]:
        """The text tower without its projection into the shared space."""
        if hasattr(self.model, "text"):
            return [self.model.text.transformer]
        return [self.model.transformer, self.model.token_embedding, self.model.ln_final]

    def _text_parameters(self):
        for module in self._text_modules():
            yield from module.parameters()
        if not hasattr(self.model, "text"):
            yield self.model.positional_embedding

    def train(self, mode: bool = True) -> CLIPEncoder:
        super().train(mode)
        if self.lock_text:  # a frozen tower keeps dropout off and norm statistics fixed
            for module in self._text_modules():
                module.eval()
        return self

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def logit_scale(self) -> Tensor:
        """open_clip's learnable log inverse temperature (init log(1 / 0.07))."""
        return self.model.logit_scale

    @property
    def context_length(self) -> int:
        return int(self.config["text_cfg"].get("context_length", 77))

    def tokenizer(self):
        """The tokenizer matching the text tower: ``list[str] -> (B, context_length)`` token ids."""
        text_cfg = self.config["text_cfg"]
        if "hf_tokenizer_name" in text_cfg:
            return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=self.context_length)
        return open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)``."""
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(B, L) -> (B, D)``."""
        return self.model.encode_text(tokens)

    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        out = {}
        for modality in self.check_batch(batch):
            out[modality] = self.encode_image(batch["image"]) if modality == "image" else self.encode_text(batch["text"])
        return out
