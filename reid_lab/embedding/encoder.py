"""The encoder contract every reid_lab model implements (ReID CNN / ViT, CLIP towers, VLM embedders).

An :class:`Encoder` is an ``nn.Module`` that

* maps a batch (a mapping with one input per modality: ``"image"`` ``(B, 3, H, W)``, ``"text"`` token ids
  ``(B, L)`` ...) to test-time embeddings per modality with :meth:`Encoder.encode`:
  ``{"image": (B, D), "text": (B, D)}`` (only the modalities present in the batch), plus ``"logits"``
  ``(B, C)`` of the image classifier when it has one;
* declares ``embedding_dim`` ``D`` (the same for every modality: they share one space) and the
  ``modalities`` it can embed;
* optionally exposes a classifier (``num_classes`` and the ``(C, D)`` matrix ``classifier_weight``);
* describes itself with :meth:`Encoder.spec` (``class_path`` + ``init_args``), so that any checkpoint can
  rebuild its encoder with :func:`build_encoder` and load the weights, without a copied list of keys.

Subclasses call :meth:`Encoder.record_init_args` in ``__init__`` with their constructor arguments; arguments
named in ``init_only_args`` (e.g. a local file of ImageNet weights) only matter before a checkpoint's state
dict is loaded and are reset to their defaults in the spec.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

MODALITIES: tuple[str, ...] = ("image", "text")


class Encoder(nn.Module):
    """Base class of every encoder (see the module docstring for the contract)."""

    modalities: tuple[str, ...] = ("image",)
    init_only_args: tuple[str, ...] = ()

    def record_init_args(self, **init_args: Any) -> None:
        """Remember the constructor arguments for :meth:`spec` (call it from ``__init__``)."""
        self._init_args = dict(init_args)

    def spec(self) -> dict[str, Any]:
        """``{"class_path": "package.module.Class", "init_args": {...}}``: enough to rebuild this encoder."""
        init_args = dict(getattr(self, "_init_args", {}))
        if not hasattr(self, "_init_args"):
            raise RuntimeError(f"{type(self).__name__}.__init__ must call record_init_args(...)")
        defaults = inspect.signature(type(self).__init__).parameters
        for name in self.init_only_args:
            if name in init_args:
                init_args[name] = defaults[name].default if name in defaults else None
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    @property
    def embedding_dim(self) -> int:  # pragma: no cover - abstract
        """Dimension ``D`` of every modality's embedding."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Classifier outputs (0: no classifier)."""
        return 0

    @property
    def classifier_weight(self) -> Tensor | None:
        """The ``(num_classes, D)`` classifier matrix (with gradients), or None."""
        return None

    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Test-time embeddings ``{modality: (B, D)}`` of the modalities present in ``batch``."""
        raise NotImplementedError

    def check_batch(self, batch: Mapping[str, Any]) -> list[str]:
        """The modalities of ``batch`` this encoder embeds; an error names what it can embed instead."""
        present = [m for m in MODALITIES if m in batch]
        unsupported = [m for m in present if m not in self.modalities]
        if unsupported or not present:
            raise ValueError(
                f"{type(self).__name__} embeds {list(self.modalities)}; the batch holds "
                f"{present or sorted(batch)}"
            )
        return present


def build_encoder(spec: Mapping[str, Any]) -> Encoder:
    """Rebuild an encoder from :meth:`Encoder.spec` (random weights; load a state dict afterwards).

    Raises:
        ValueError: ``spec`` is malformed, its class cannot be imported, or it is not an :class:`Encoder`.
    """
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ValueError(f"an encoder spec needs 'class_path' and 'init_args', got {spec!r}")
    module_name, _, class_name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"encoder class {spec['class_path']!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise ValueError(f"{spec['class_path']!r} is not a reid_lab Encoder")
    return cls(**dict(spec.get("init_args") or {}))
