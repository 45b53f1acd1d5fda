"""MMEB-style evaluation: Precision@1 over a fixed candidate list per query.

MMEB (Jiang et al., ICLR'25, the VLM2Vec benchmark) scores each query against its own list of candidates (one
positive, the rest negatives; 1,000 in MMEB) and reports Precision@1: the share of queries whose positive
scores highest. On a retrieval split (caption or image queries, an image gallery with identities),
:func:`candidate_lists` draws such lists reproducibly: for each query, one gallery item of its identity (the
positive, column 0) and ``K - 1`` items of other identities. Chance is ``1 / K``.

Ties count against the positive (it must be strictly closer than every negative), so a constant embedding
scores 0, not 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def candidate_lists(query_pids: Tensor, gallery_pids: Tensor, num_candidates: int, seed: int = 0) -> Tensor:
    """``(Q, K)`` gallery indices: column 0 a gallery item of the query's identity, then ``K - 1`` items of other
    identities (distinct, drawn with ``seed``).

    Raises:
        ValueError: a query's identity has no gallery item, or fewer than ``K - 1`` negatives exist.
    """
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2 (a positive and a negative), got {num_candidates}")
    rng = np.random.default_rng(seed)
    q, g = query_pids.cpu().numpy(), gallery_pids.cpu().numpy()
    rows = np.empty((len(q), num_candidates), dtype=np.int64)
    for i, pid in enumerate(q):
        positives = np.flatnonzero(g == pid)
        negatives = np.flatnonzero(g != pid)
        if len(positives) == 0:
            raise ValueError(f"query {i} (pid {pid}) has no gallery item of its identity")
        if len(negatives) < num_candidates - 1:
            raise ValueError(f"query {i} has {len(negatives)} negatives, fewer than num_candidates - 1 = "
                             f"{num_candidates - 1}")
        rows[i, 0] = rng.choice(positives)
        rows[i, 1:] = rng.choice(negatives, size=num_candidates - 1, replace=False)
    return torch.from_numpy(rows)


def precision_at_1(distmat: Tensor, candidates: Tensor) -> float:
    """Share of queries whose column-0 candidate is strictly closer than all others.

    Args:
        distmat: ``(Q, G)`` distances (smaller is closer).
        candidates: ``(Q, K)`` gallery indices from :func:`candidate_lists` (the positive first).
    """
    d = torch.gather(distmat, 1, candidates.to(distmat.device))
    return float((d[:, 0] < d[:, 1:].min(dim=1).values).float().mean())
