"""The one test-time embedding path: an encoder, flip TTA for images, and an optional projection.

Prediction (``reid-lab predict``), validation, the upgrade host (φ_old's features, UniBCT refreshes) and the
study runner all embed through an :class:`Embedder`, so a setting such as ``flip_test`` or a learned
dimension adapter reaches every feature a user sees.

:func:`string_modality` decides whether a list of strings given to an embedder names images or is captions: a
typo in an image path must be an error, not a caption silently embedded in its place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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


# Extensions of the image files people pass (PIL opens more, but no caption ends with these either).
IMAGE_PATH_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif")


def looks_like_image_path(text: str) -> bool:
    """Whether ``text`` reads as an image file name: it ends with an image extension (``a/typo.JPG``)."""
    return text.strip().lower().endswith(IMAGE_PATH_SUFFIXES)


def string_modality(items: Sequence[str], modalities: Sequence[str], modality: str | None = None) -> str:
    """What a list of strings is for an encoder embedding ``modalities``: ``"image"`` (paths) or ``"text"``.

    Args:
        items: the strings, all of one kind.
        modalities: what the encoder embeds (``("image",)``, ``("image", "text")``).
        modality: ``"image"`` or ``"text"`` to say it explicitly; None: every string an existing file is
            images, no string an existing file nor reading as an image path (:func:`looks_like_image_path`) is
            captions.

    Returns:
        ``"image"`` or ``"text"``.

    Raises:
        FileNotFoundError: images (given or inferred) of which one does not exist; the message names it, and says
            how to embed the strings as captions when the encoder embeds text.
        ValueError: ``modality`` unknown or not one the encoder embeds.

    >>> string_modality(["a man in a red coat"], ("image", "text"))
    'text'
    """
    if modality is not None and modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    if modality is not None and modality not in modalities:
        raise ValueError(f"the encoder embeds {list(modalities)}, not {modality!r}")
    if modality == "text":
        return "text"
    exists = [os.path.isfile(item) for item in items]
    if all(exists):
        return "image"
    missing = [item for item, found in zip(items, exists) if not found]
    if modality is None and "text" in modalities and not any(exists):
        pathlike = [item for item in missing if looks_like_image_path(item)]
        if not pathlike:
            return "text"
        raise FileNotFoundError(
            f"image {pathlike[0]} does not exist ({len(pathlike)} of {len(items)} strings read as image paths "
            "and none is a file); to embed the strings as captions, pass modality='text'"
        )
    hint = " (to embed captions, pass modality='text')" if "text" in modalities else ""
    raise FileNotFoundError(f"image {missing[0]} does not exist ({len(missing)} of {len(items)} missing){hint}")
