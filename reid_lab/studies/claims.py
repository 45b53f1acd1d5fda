"""When a study may write a compatibility claim: the criterion by a margin, and clearly above chance."""

from __future__ import annotations

from typing import Any

import torch

from reid_lab.metrics.rank import evaluate_rank

DEFAULT_CLAIM_MARGIN = 1.0  # mAP points by which M(new, old) must exceed M(old, old)
CHANCE_DRAWS = 5
EVALUATION_SPLIT = "test query / gallery (identities disjoint from every training set)"


def chance_level(q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, metric: str = "mAP",
                 draws: int = CHANCE_DRAWS, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of ``metric`` (percent) over ``draws`` random rankings of the gallery.

    Each draw ranks the gallery by i.i.d. uniform distances under the same protocol (same-camera junk
    removed), so the value is what a model with no signal scores on these queries and gallery.
    """
    q_pids, g_pids = torch.as_tensor(q_pids), torch.as_tensor(g_pids)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        distmat = torch.rand(len(q_pids), len(g_pids), generator=generator)
        values.append(evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids).summary()[metric])
    values_t = torch.tensor(values, dtype=torch.float64)
    return float(values_t.mean()), float(values_t.std()) if draws > 1 else 0.0
