"""Verification metrics next to ranking ones: TPR at fixed FPR over genuine and impostor pairs.

Face and vehicle ReID report, besides CMC / mAP, how well one similarity threshold separates *pairs*: every
(query, gallery) pair of the same identity is genuine, every other pair an impostor. For a target false
positive rate ``f``, the threshold is the smallest similarity that at most ``f`` of the impostor pairs exceed
(strictly), and TPR is the share of genuine pairs above it. Same-identity same-camera pairs can be left out as
under the ReID protocol (``q_camids`` / ``g_camids``).

With ``N_imp`` impostor pairs, an FPR below ``1 / N_imp`` cannot be resolved: it is reported as NaN, not as a
number that only reflects the single highest impostor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)


def tpr_at_fpr(genuine: Tensor, impostor: Tensor, fprs: Sequence[float] = DEFAULT_FPRS) -> dict[float, float]:
    """``{fpr: tpr}`` from the similarity scores of genuine and impostor pairs (higher = more similar)."""
    imp = torch.sort(impostor.flatten().double(), descending=True).values
    gen = genuine.flatten().double()
    out = {}
    for fpr in fprs:
        allowed = math.floor(fpr * len(imp))  # impostors allowed strictly above the threshold
        if allowed < 1 or len(gen) == 0:
            out[fpr] = float("nan")
            continue
        threshold = imp[allowed]  # exactly `allowed` impostors lie strictly above it when there are no ties
        above = int((imp > threshold).sum())
        if above > allowed:  # ties at the threshold: move it up until the rate holds
            threshold = imp[allowed - 1]
        out[fpr] = float((gen > threshold).double().mean())
    return out


def verification_pairs(similarity: Tensor, q_pids: Tensor, g_pids: Tensor, q_camids: Tensor | None = None,
                       g_camids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Genuine and impostor scores of a ``(Q, G)`` similarity matrix (same-id same-camera pairs dropped when
    camera ids are given)."""
    same = q_pids.view(-1, 1) == g_pids.view(1, -1)
    keep = torch.ones_like(same)
    if q_camids is not None and g_camids is not None:
        keep = ~(same & (q_camids.view(-1, 1) == g_camids.view(1, -1)))
    return similarity[same & keep], similarity[~same & keep]
