"""Rebuilding the encoder of any reid_lab checkpoint (the contract that lets any model be an old model).

A checkpoint written by an :class:`~reid_lab.modules.base.EmbeddingModule` holds::

    checkpoint["encoder"] = {"class_path": ..., "init_args": {...}, "state_prefix": "encoder."}
    checkpoint["embedding"] = {"flip_test": bool, "distance": "cosine", "adapter": {...} or None}
    checkpoint["embedding_space"] = {...}                       # see reid_lab.embedding.space

Checkpoints of ``ReIDModule`` written before the encoder contract (no ``"encoder"`` entry, weights under
``model.``) are rebuilt from their hyper-parameters as a :class:`~reid_lab.models.ReIDModel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reid_lab.embedding.encoder import Encoder, build_encoder

LEGACY_REID_MODEL = "reid_lab.models.reid_model.ReIDModel"
_LEGACY_REID_KEYS = ("backbone", "num_classes", "last_stride", "pooling", "embedding_dim", "neck_feat",
                     "timm_kwargs")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint on CPU with a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:  # tensors and plain containers only: a checkpoint never runs code when it is read
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated, foreign or code-carrying file: say which one
        raise ValueError(f"{path} cannot be read as a reid_lab checkpoint (tensors and plain containers, "
                         f"loaded with weights_only=True): {str(err).splitlines()[0]}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a reid_lab / Lightning checkpoint (no state_dict)")
    return checkpoint


def encoder_spec(checkpoint: dict[str, Any], where: str = "checkpoint") -> dict[str, Any]:
    """The encoder spec (``class_path``, ``init_args``, ``state_prefix``) of a checkpoint, legacy included."""
    if "encoder" in checkpoint:
        spec = dict(checkpoint["encoder"])
        spec.setdefault("state_prefix", "encoder.")
        return spec
    hparams = checkpoint.get("hyper_parameters") or {}
    if "backbone" in hparams and any(k.startswith("model.") for k in checkpoint["state_dict"]):
        return {"class_path": LEGACY_REID_MODEL, "state_prefix": "model.",
                "init_args": {k: hparams[k] for k in _LEGACY_REID_KEYS if k in hparams}}
    raise ValueError(
        f"{where} records no encoder: it was not written by a reid_lab EmbeddingModule (expected a "
        "'encoder' entry, or ReIDModule hyper-parameters with weights under 'model.')"
    )


def embedding_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """How the checkpoint's module embedded at test time: ``flip_test``, ``distance``, ``adapter``."""
    if "embedding" in checkpoint:
        return dict(checkpoint["embedding"])
    hparams = checkpoint.get("hyper_parameters") or {}
    return {"flip_test": bool(hparams.get("flip_test", False)), "distance": hparams.get("distance", "cosine"),
            "adapter": None}


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries of ``state_dict`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_encoder(source: str | Path | dict[str, Any]) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder of a checkpoint (a path or a loaded dict) with its weights; also return the dict.

    Only the encoder is rebuilt: no losses, metrics or upgrade host (so chains φ1 → φ2 → φ3 do not load
    every ancestor), and no pretrained-weights file is read (the checkpoint holds every weight).
    """
    where = "checkpoint" if isinstance(source, dict) else str(source)
    checkpoint = source if isinstance(source, dict) else read_checkpoint(source)
    spec = encoder_spec(checkpoint, where)
    encoder = build_encoder(spec)
    state = sub_state_dict(checkpoint["state_dict"], spec["state_prefix"])
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{where}: the weights under {spec['state_prefix']!r} do not fit {spec['class_path']}: "
                         f"{err}") from err
    if missing or unexpected:
        raise ValueError(f"{where}: the weights under {spec['state_prefix']!r} do not fit {spec['class_path']} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return encoder, checkpoint
