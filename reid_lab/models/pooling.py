"""Global pooling layers that turn a backbone feature map ``(B, C, h, w)`` into a vector ``(B, C)``.

The names follow fast-reid's ``POOL_LAYER`` choices: ``"avg"`` (BoT), ``"max"``, ``"gem"`` (AGW / SBS)
and ``"avgmax"``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check_map(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"pooling expects a feature map of shape (B, C, h, w), got shape {tuple(x.shape)}")


class GlobalAvgPool(nn.Module):
    """Global average pooling, ``(B, C, h, w) -> (B, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x)
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """Global max pooling, ``(B, C, h, w) -> (B, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x)
        return x.amax(dim=(2, 3))


class GlobalAvgMaxPool(nn.Module):
    """Sum of global average and global max pooling, ``(B, C, h, w) -> (B, C)``.

    Summed (as fast-reid's ``GlobalAvgMaxPool``), not concatenated, so the feature dimension stays ``C``.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x)
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))


class GeM(nn.Module):
    """Generalized-mean pooling (Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human
    Annotation", TPAMI 2018).

    ``f_c = ( 1/|X_c| * sum_{x in X_c} max(x, eps)^p )^(1/p)``, ``(B, C, h, w) -> (B, C)``.

    ``p = 1`` is average pooling and ``p -> inf`` approaches max pooling. Inputs are clamped at ``eps``
    because ``x^p`` with fractional ``p`` is undefined for negative ``x`` (backbone maps are post-ReLU anyway).

    Args:
        p: initial exponent (the paper and fast-reid use 3).
        eps: lower clamp of the activations.
        learn_p: if True ``p`` is a trainable parameter (the paper's learned GeM), otherwise a fixed buffer.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got p={p}")
        p_tensor = torch.tensor([float(p)])
        if learn_p:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x)
        p = self.p.to(x.dtype)
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}, learn_p={isinstance(self.p, nn.Parameter)}"


POOLINGS: dict[str, type[nn.Module]] = {
    "avg": GlobalAvgPool,
    "max": GlobalMaxPool,
    "gem": GeM,
    "avgmax": GlobalAvgMaxPool,
}


def build_pooling(name: str, **kwargs: object) -> nn.Module:
    """Build a global pooling layer by short name.

    Args:
        name: one of ``"avg"``, ``"max"``, ``"gem"``, ``"avgmax"``.
        **kwargs: passed to the layer (e.g. ``p=3.0, learn_p=False`` for ``"gem"``).

    Returns:
        An ``nn.Module`` mapping ``(B, C, h, w) -> (B, C)``.

    Example:
        >>> pool = build_pooling("gem")
        >>> pool(torch.rand(2, 8, 4, 2)).shape
        torch.Size([2, 8])
    """
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; expected one of {sorted(POOLINGS)}")
    return POOLINGS[name](**kwargs)
