"""A trained model as a plain callable: ``reid_lab.load_embedder(checkpoint)(["a.jpg", "b.jpg"]) -> (2, D)``.

:func:`load_embedder` rebuilds the encoder of any reid_lab checkpoint (ReID CNN / ViT, CLIP, VLM) with the
checkpoint's own preprocessing: the evaluation transform at the data module's ``image_size`` (resize, ImageNet
normalisation) for images, and the encoder's own tokenizer (or the data module's recorded one) for captions.
Inputs are embedded in batches on the device asked for, with the checkpoint's ``flip_test``, and returned as
``(N, D)`` float32 rows, L2-normalised when the space is (cosine distance). The result carries the checkpoint's
embedding-space record (``.space``), so features made here can be mixed only with features of the same or a
verified-compatible space.

Accepted inputs: image paths, PIL images, ``(3, H, W)`` float tensors in ``[0, 1]`` (resized here) or a
``(B, 3, H, W)`` batch of them, and, for encoders that embed text, captions (``embed_texts``, or strings that
are not existing files in ``__call__``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from reid_lab.data.transforms import build_test_transform
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.embedder import string_modality
from reid_lab.upgrade.old_model import load_embedder as load_checkpoint_embedder

ImageInput = str | Path | Image.Image | Tensor


class CheckpointEmbedder:
    """Callable embedder of a checkpoint (see the module docstring).

    Attributes:
        space: the embedding-space record of the vectors it returns.
        image_size: ``(H, W)`` images are resized to.
        modalities: what the encoder embeds (``image``, and ``text`` for dual encoders / VLMs).
    """

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.checkpoint = str(checkpoint)
        raw = read_checkpoint(checkpoint)
        self.embedder = load_checkpoint_embedder(checkpoint)
        self.device = torch.device(device)
        self.embedder.encoder.to(self.device).eval()
        self.space = dict(self.embedder.space)
        self.modalities = tuple(self.embedder.encoder.modalities)
        data = raw.get("datamodule_hyper_parameters") or {}
        size = data.get("image_size")
        if size is None:
            raise ValueError(f"{checkpoint} records no data image_size (not written by `reid-lab fit`?): the "
                             "input size of the model is unknown")
        self.image_size = (int(size[0]), int(size[1]))
        self.batch_size = int(batch_size)
        self.normalize = bool(self.space.get("normalized", (raw.get("embedding") or {}).get("distance") == "cosine"))
        self._transform = build_test_transform(self.image_size)  # what `reid-lab test / predict` apply
        self._tokenize = self._tokenizer(data)

    def _tokenizer(self, data: dict[str, Any]):
        if "text" not in self.modalities:
            return None
        own = getattr(self.embedder.encoder, "tokenizer", None)
        if callable(own):
            return own()
        spec = data.get("tokenizer")
        if spec:
            import importlib

            module, _, name = spec["class_path"].rpartition(".")
            return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))
        return None

    # ------------------------------------------------------------------------------------------ inputs
    def _image(self, item: ImageInput) -> Tensor:
        if isinstance(item, (str, Path)):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            with Image.open(path) as img:
                return self._transform(img.convert("RGB"))
        if isinstance(item, Image.Image):
            return self._transform(item.convert("RGB"))
        if isinstance(item, Tensor) and item.ndim == 3 and item.shape[0] == 3:
            return self._transform(item.float().clamp(0, 1))
        raise TypeError(f"expected an image path, a PIL image or a (3, H, W) tensor in [0, 1], got {type(item).__name__}"
                        + (f" of shape {tuple(item.shape)}" if isinstance(item, Tensor) else ""))

    def _finish(self, rows: list[Tensor]) -> Tensor:
        out = torch.cat(rows) if rows else torch.empty(0, int(self.space.get("dim", 0)))
        return torch.nn.functional.normalize(out, dim=1) if self.normalize else out

    def embed_images(self, images: Sequence[ImageInput] | Tensor) -> Tensor:
        """``(N, D)`` embeddings of images (paths, PIL images, ``(3, H, W)`` tensors or one ``(B, 3, H, W)``)."""
        items = list(images.unbind(0)) if isinstance(images, Tensor) and images.ndim == 4 else list(images)
        rows = []
        for start in range(0, len(items), self.batch_size):
            batch = torch.stack([self._image(i) for i in items[start:start + self.batch_size]]).to(self.device)
            rows.append(self.embedder({"image": batch})["image"].cpu())
        return self._finish(rows)

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """``(N, D)`` embeddings of captions (encoders that embed text only)."""
        if self._tokenize is None:
            raise ValueError(f"{self.checkpoint} embeds {list(self.modalities)}, not text")
        rows = []
        for start in range(0, len(texts), self.batch_size):
            ids = self._tokenize(list(texts[start:start + self.batch_size])).long().to(self.device)
            rows.append(self.embedder({"text": ids})["text"].cpu())
        return self._finish(rows)

    def __call__(self, inputs: Sequence[ImageInput] | Tensor, modality: str | None = None) -> Tensor:
        """Images, or captions for a text-embedding model.

        Strings are images when every one names an existing file, captions when none does and none reads as an
        image path (``a/typo.jpg`` that does not exist is an error, never a caption); ``modality="image"`` or
        ``"text"`` says it explicitly (:func:`~reid_lab.embedding.embedder.string_modality`).
        """
        if isinstance(inputs, (str, Path, Image.Image)):
            inputs = [inputs]
        items = list(inputs) if not isinstance(inputs, Tensor) else inputs
        if isinstance(items, list) and items and all(isinstance(i, str) for i in items):
            if string_modality(items, self.modalities, modality) == "text":
                return self.embed_texts(items)
        elif modality == "text":
            raise ValueError("modality='text' needs a list of caption strings")
        return self.embed_images(items)


def load_embedder(checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> CheckpointEmbedder:
    """The checkpoint's model as a callable ``inputs -> (N, D)`` (see :class:`CheckpointEmbedder`)."""
    return CheckpointEmbedder(checkpoint, device=device, batch_size=batch_size)
