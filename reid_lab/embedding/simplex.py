"""The fixed d-Simplex classifier of stationary compatible representations.

Biondi, Pernici, Bruni, Del Bimbo, "CoReS: Compatible Representations via Stationarity", TPAMI 2023
(arXiv 2111.07632), official code NiccoBiondi/cores-compatibility (``src/cores/model.py`` ``dsimplex``). Every
model version is trained against the same ``K`` vertices of a regular simplex, one per identity, so the
versions' features gather around the same points. Used by the ``simplex`` compatible loss
(:mod:`reid_lab.losses.compatible.simplex`) and by a ReID model's ``classifier: simplex`` head
(:class:`reid_lab.models.heads.BNNeckHead`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dsimplex_vertices"]


def dsimplex_vertices(num_classes: int, dim: int | None = None) -> Tensor:
    """``(K, dim)`` float32 vertices of a regular simplex centred at the origin (CoReS ``dsimplex``).

    Rows are unit-norm with pairwise cosine ``-1/(K-1)``; they span ``R^{K-1}``, zero-padded to ``dim``.

    Args:
        num_classes: ``K >= 2``.
        dim: output dimension, ``>= K - 1`` (default ``K - 1``).

    Example:
        >>> v = dsimplex_vertices(3)
        >>> [round(x, 4) for x in (v @ v.T)[0].tolist()]
        [1.0, -0.5, -0.5]
    """
    if num_classes < 2:
        raise ValueError(f"a d-Simplex needs at least 2 classes, got {num_classes}")
    n = num_classes - 1
    dim = n if dim is None else int(dim)
    if dim < n:
        raise ValueError(f"a {num_classes}-class d-Simplex needs an embedding of at least {n} dimensions, got {dim}")
    t = torch.zeros(num_classes, n, dtype=torch.float64)
    t[:n] = torch.eye(n, dtype=torch.float64)
    t[n] = (1.0 - math.sqrt(1.0 + n)) / n
    t = t - t.mean(dim=0)
    t = t / t.norm(dim=1, keepdim=True)
    return F.pad(t, (0, dim - n)).float()
