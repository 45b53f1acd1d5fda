"""The frozen old model φ_old of an upgrade, and embedders rebuilt from any reid_lab checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reid_lab.embedding.checkpoint import embedding_settings, load_encoder, sub_state_dict
from reid_lab.embedding.embedder import Embedder
from reid_lab.embedding.encoder import Encoder
from reid_lab.upgrade.adapters import DimensionAdapter


class FrozenEncoder:
    """φ_old for training a compatible φ_new: eval mode always, no gradients, outside the new module's tree.

    It is deliberately *not* an ``nn.Module`` attribute of the new LightningModule: its weights stay out of
    the new checkpoints, the optimiser and DDP wrapping, and ``LightningModule.train()`` cannot switch it
    back to training mode (so its BatchNorm statistics never drift). It follows the batch's device.

    Attributes:
        encoder: the old encoder.
        space: its embedding-space record.
        checkpoint: path of the checkpoint it came from.
        train_subset: the old model's ``train_subset`` file, if its checkpoint recorded one.
    """

    def __init__(self, encoder: Encoder, space: Mapping[str, Any] | None = None, checkpoint: str = "",
                 train_subset: str | None = None) -> None:
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.space = dict(space or {})
        self.checkpoint = checkpoint
        self.train_subset = train_subset

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.encoder.modalities)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def to(self, device: torch.device | str) -> FrozenEncoder:
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{modality: (B, d_old) float32, "logits"?: (B, C_old)}`` for the modalities it embeds."""
        if self.encoder.training:  # someone called .train() on it: undo, φ_old must stay frozen
            self.encoder.eval()
        inputs = {k: v for k, v in batch.items() if k in self.modalities}
        device = next(v.device for v in inputs.values() if torch.is_tensor(v)) if inputs else self.device
        if device != self.device:
            self.to(device)
        return {k: v.detach().float() for k, v in self.encoder.encode(inputs).items()}

    __call__ = encode

    def embedder(self) -> Embedder:
        """The old model's test-time embedder (no flip: the old gallery is as it was stored)."""
        return Embedder(self.encoder, space=self.space)


def load_frozen_encoder(path: str | Path) -> FrozenEncoder:
    """Rebuild the encoder of any reid_lab checkpoint as a frozen φ_old."""
    encoder, checkpoint = load_encoder(path)
    data_hp = checkpoint.get("datamodule_hyper_parameters") or {}
    return FrozenEncoder(encoder, checkpoint.get("embedding_space") or {}, str(path), data_hp.get("train_subset"))


def load_embedder(path: str | Path, *, into_old_space: bool = False) -> Embedder:
    """The test-time embedder of a checkpoint: its encoder, its ``flip_test``, and with ``into_old_space``
    the learned dimension adapter of its upgrade host (so new queries can search the old gallery).

    Raises:
        ValueError: ``into_old_space`` for a checkpoint trained without an upgrade host.
    """
    encoder, checkpoint = load_encoder(path)
    encoder.eval()
    settings = embedding_settings(checkpoint)
    projection = None
    space = checkpoint.get("embedding_space") or {}
    if into_old_space:
        adapter = settings.get("adapter")
        if not adapter:
            raise ValueError(f"{path} was not trained against an old model: it has no adapter into an old space")
        projection = DimensionAdapter(adapter["in_dim"], adapter["out_dim"], adapter["kind"])
        projection.load_state_dict(sub_state_dict(checkpoint["state_dict"], adapter["state_prefix"]))
        projection.eval()
        space = {**space, "projected_into": adapter.get("old_space_id")}
    return Embedder(encoder, flip_test=bool(settings.get("flip_test")), projection=projection, space=space)
