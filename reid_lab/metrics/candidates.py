"""MMEB-style evaluation: Precision@1 over a fixed candidate list per query.

MMEB (Jiang et al., ICLR'25, the VLM2Vec benchmark) scores each query against its own list of candidates (one
positive, the rest negatives; 1,000 in MMEB) and reports Precision@1: the share of queries whose positive
scores highest. On a retrieval split (caption or image queries, an image gallery with identities),
:func:`candidate_lists` draws such lists reproducibly: for each query, one gallery item of its identity (the
positive, column 0) and ``K - 1`` items of other identities. Chance is ``1 / K``.

Ties count against the positive (it must be strictly closer than every negative), so a constant embedding
scores 0, not 1. MMEB's own code (VLM2Vec ``eval.py``: ``pred = np.argmax(scores)``, a hit when ``pred == 0``)
takes the first maximum, and the positive is first: it counts such a tie as a hit. :func:`list_hits` computes
either rule (``ties="strict"`` ours, ``ties="first"`` MMEB's).

:func:`mmeb_summary` averages per-subset Precision@1 as MMEB reports it: per meta-task (the mean over its
subsets) and overall (the plain mean over all subsets, not the mean of the meta-task means).
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


def list_hits(similarity: Tensor, valid: Tensor | None = None, ties: str = "strict") -> Tensor:
    """``(Q,)`` bool: whether each query's column-0 candidate (the positive) wins its list.

    Args:
        similarity: ``(Q, K)`` query–candidate similarities (larger is closer), the positive in column 0.
        valid: ``(Q, K)`` bool, False on padding (rows with fewer than ``K`` candidates); column 0 must be valid.
        ties: ``"strict"`` (reid_lab): the positive must beat every other candidate; ``"first"`` (MMEB's
            ``argmax``, which returns the first maximum): a tie with the positive is a hit.
    """
    if ties not in ("strict", "first"):
        raise ValueError(f"ties must be 'strict' or 'first', got {ties!r}")
    others = similarity[:, 1:].float()
    if valid is not None:
        others = others.masked_fill(~valid[:, 1:].bool(), float("-inf"))
    best = others.max(dim=1).values if others.shape[1] else torch.full_like(similarity[:, 0], float("-inf"))
    positive = similarity[:, 0].float()
    return positive > best if ties == "strict" else positive >= best


def mmeb_summary(per_subset: dict[str, float], meta_tasks: dict[str, str]) -> dict[str, float]:
    """``{meta_task: mean over its subsets, ..., "overall": mean over all subsets}`` of per-subset scores.

    MMEB (VLM2Vec paper Table 1; ``docs/mmebv2_reproduction``: "all (plain mean over datasets)") reports each
    meta-task as the mean of its subsets and the overall score as the plain mean over subsets.
    """
    if not per_subset:
        raise ValueError("mmeb_summary needs at least one subset score")
    groups: dict[str, list[float]] = {}
    for name, value in per_subset.items():
        groups.setdefault(meta_tasks[name], []).append(value)
    out = {task: sum(v) / len(v) for task, v in groups.items()}
    out["overall"] = sum(per_subset.values()) / len(per_subset)
    return out


def precision_at_1(distmat: Tensor, candidates: Tensor) -> float:
    """Share of queries whose column-0 candidate is strictly closer than all others.

    Args:
        distmat: ``(Q, G)`` distances (smaller is closer).
        candidates: ``(Q, K)`` gallery indices from :func:`candidate_lists` (the positive first).
    """
    d = torch.gather(distmat, 1, candidates.to(distmat.device))
    return float((d[:, 0] < d[:, 1:].min(dim=1).values).float().mean())
