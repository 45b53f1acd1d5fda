"""The one test-time embedding path: an encoder, flip TTA for images, and an optional projection.

Prediction (``reid-lab predict``), validation, the upgrade host (φ_old's features, UniBCT refreshes) and the
study runner all embed through an :class:`Embedder`, so a setting such as ``flip_test`` or a learned
dimension adapter reaches every feature a user sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from reid_lab.embedding.encoder import Encoder


class Embedder:
    """Callable ``batch -> {modality: (B, D) float32, "logits"?: (B, C)}`` without gradients.

    Args:
        encoder: the encoder (its train / eval mode is the caller's business: Lightning's evaluation loops
            and :class:`~reid_lab.upgrade.old_model.FrozenEncoder` put it in eval mode).
        flip_test: average each image's embedding with that of its horizontal flip (not the logits).
        projection: maps ``(B, D)`` embeddings into another space (e.g. the upgrade host's learned
            dimension adapter ``d_new -> d_old``, for new queries searching an old gallery).
        space: the embedding-space record of what this embedder returns.
    """

    def __init__(self, encoder: Encoder, *, flip_test: bool = False,
                 projection: Callable[[Tensor], Tensor] | None = None,
                 space: Mapping[str, Any] | None = None) -> None:
        self.encoder = encoder
        self.flip_test = bool(flip_test)
        self.projection = projection
        self.space = dict(space or {})

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        out = dict(self.encoder.encode(batch))
        if self.flip_test and "image" in out:
            flipped = self.encoder.encode({"image": torch.flip(batch["image"], dims=[3])})["image"]
            out["image"] = (out["image"] + flipped) / 2
        for modality in [k for k in out if k != "logits"]:
            out[modality] = out[modality].float()
            if self.projection is not None:
                out[modality] = self.projection(out[modality])
        return out
