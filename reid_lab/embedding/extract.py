"""Embedding a list of images with a model, outside the training loop (inference mode, batched)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from reid_lab.data.image_dataset import ImageDataset
from reid_lab.data.records import ImageRecord


@torch.inference_mode()
def extract(
    encode: Callable[[Tensor], dict[str, Tensor] | Tensor],
    records: Sequence[ImageRecord],
    transform: Callable,
    *,
    keys: Sequence[str] = ("embedding",),
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Run ``encode`` over ``records`` and concatenate the requested outputs on the CPU.

    Args:
        encode: a model (or function) mapping images ``(B, 3, H, W)`` to a dict of ``(B, ...)`` outputs (or
            to a tensor, returned under ``"embedding"``).
        records: images to embed, in order.
        transform: PIL image -> tensor (the evaluation transform).
        keys: which outputs to keep (e.g. ``("embedding", "logits")``).
        batch_size / num_workers: data loading.
        device: where ``encode`` runs.

    Returns:
        ``{key: (N, ...) float32 tensor}`` in the order of ``records``.
    """
    loader = DataLoader(ImageDataset(records, transform), batch_size=batch_size, num_workers=num_workers)
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    for batch in loader:
        out = encode(batch["image"].to(device))
        if torch.is_tensor(out):
            out = {"embedding": out}
        for k in keys:
            if k not in out:
                raise KeyError(f"the encoder returned no {k!r} output (it returned {sorted(out)})")
            parts[k].append(out[k].detach().float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}
