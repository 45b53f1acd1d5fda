"""Loading a trained reid_lab model as the frozen old model φ_old of an upgrade."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.models.reid_model import ReIDModel

MODEL_KEYS = ("backbone", "num_classes", "last_stride", "pooling", "embedding_dim", "neck_feat", "timm_kwargs")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint on CPU with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path} is not a reid_lab / Lightning checkpoint (no state_dict / hyper_parameters)")
    return checkpoint


def reid_model_from_checkpoint(path: str | Path) -> tuple[ReIDModel, dict[str, Any]]:
    """Rebuild the :class:`ReIDModel` of a ``ReIDModule`` checkpoint (weights included) and return its checkpoint.

    Only the encoder is rebuilt: no losses, metrics or nested upgrade host (so chains φ1 → φ2 → φ3 do not
    load every ancestor). Backbone ``weights`` files are not needed: the checkpoint holds all weights.
    """
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    missing = [k for k in ("backbone", "num_classes") if k not in hparams]
    if missing:
        raise ValueError(f"checkpoint {path} has no ReIDModule hyper-parameters {missing}")
    model = ReIDModel(**{k: hparams[k] for k in MODEL_KEYS if k in hparams})
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model, checkpoint


class FrozenEncoder:
    """φ_old for training a compatible φ_new: eval mode always, no gradients, outside the new module's tree.

    It is deliberately *not* an ``nn.Module`` attribute of the new LightningModule: its weights stay out of
    the new checkpoints, the optimiser and DDP wrapping, and ``LightningModule.train()`` cannot switch it
    back to training mode (so its BatchNorm statistics never drift). Call :meth:`to` to follow the device.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device | str) -> FrozenEncoder:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        if self.model.training:  # someone called .train() on it: undo, φ_old must stay frozen
            self.model.eval()
        if images.device != self.device:
            self.to(images.device)
        return {k: v.detach().float() for k, v in self.model(images).items()}
