"""Embedding a whole split with an :class:`~reid_lab.embedding.embedder.Embedder`, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from reid_lab.data.image_dataset import ImageDataset
from reid_lab.data.records import ImageRecord

Embed = Callable[[Mapping[str, Any]], Mapping[str, Tensor]]


def embed_batches(
    embed: Embed,
    batches: Iterable[Mapping[str, Any]],
    *,
    modality: str = "image",
    keys: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Run ``embed`` over ``batches`` and concatenate on the CPU.

    Args:
        embed: an :class:`~reid_lab.embedding.embedder.Embedder` (or any ``batch -> {modality: (B, D)}``).
        batches: mappings holding ``modality`` (images ``(B, 3, H, W)``, token ids ...) and metadata.
        modality: which input to embed; its embedding is returned under ``"embedding"``.
        keys: extra entries to keep, taken from the embedder's output (e.g. ``"logits"``) or, failing
            that, from the batch (e.g. ``"pid"``, ``"camid"``, ``"index"``).
        device: where ``embed`` runs; tensors of the batch are moved there.

    Returns:
        ``{"embedding": (N, D) float32, key: (N, ...)}`` in the order of the batches.
    """
    parts: dict[str, list[Tensor]] = {k: [] for k in ("embedding", *keys)}
    for batch in batches:
        inputs = {modality: _to(batch[modality], device)}
        out = embed(inputs)
        if modality not in out:
            raise KeyError(f"the embedder returned no {modality!r} embedding (it returned {sorted(out)})")
        parts["embedding"].append(out[modality].detach().float().cpu())
        for k in keys:
            source = out if k in out else batch
            if k not in source:
                raise KeyError(f"neither the embedder output ({sorted(out)}) nor the batch ({sorted(batch)}) "
                               f"holds {k!r}")
            value = source[k]
            parts[k].append(value.detach().cpu() if torch.is_tensor(value) else torch.as_tensor(value))
    if not parts["embedding"]:
        raise ValueError("nothing to embed: the batches are empty")
    return {k: torch.cat(v) for k, v in parts.items()}


def extract(
    embed: Embed,
    records: Sequence[ImageRecord],
    transform: Callable,
    *,
    keys: Sequence[str] = (),
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """:func:`embed_batches` over image ``records`` read with ``transform`` (the evaluation transform)."""
    loader = DataLoader(ImageDataset(records, transform), batch_size=batch_size, num_workers=num_workers)
    return embed_batches(embed, loader, modality="image", keys=keys, device=device)


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if torch.is_tensor(value) else value
