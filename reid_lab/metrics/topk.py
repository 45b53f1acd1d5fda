"""Retrieval metrics of a truncated ranked list: R@k (hit rate), P@k and the truncated AP@k.

For search results that return only the top ``k`` of each query (a faiss index, ``reid_lab.retrieval``), where
the full ranking that :func:`reid_lab.metrics.rank.evaluate_rank` needs is not available. No junk removal: every
returned item with the query's identity is relevant.

* R@j (the field's Recall@j / CMC@j): fraction of queries with a relevant item within the top ``j``.
* P@k: mean fraction of relevant items in the top ``k``.
* AP@k = (1 / min(m, k)) * sum_{i <= k} P@i * rel_i, with ``m`` the query's relevant items in the whole gallery:
  the truncated AP of the Google Landmarks v2 benchmark (Weyand et al., CVPR 2020). It equals the full AP when
  every relevant item is within the top ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["topk_retrieval_metrics"]


def topk_retrieval_metrics(
    matches: Tensor, num_positives: Tensor | None = None, ranks: Sequence[int] = (1,)
) -> dict[str, float]:
    """R@j, P@k and mAP@k in percent from the relevance of each query's top-``k`` hits.

    Args:
        matches: ``(num_query, k)`` bool, ``matches[q, i]``: the ``(i + 1)``-th hit of query ``q`` is relevant.
        num_positives: ``(num_query,)`` relevant items of each query in the whole gallery. Queries with none are
            skipped (as in the ReID protocol). ``None``: unknown; every query counts and AP@k divides by the
            relevant hits found in the top ``k`` (at least 1), which overestimates AP when positives are missed.
        ranks: the cut-offs ``j`` of the reported R@j, each in ``1..k``.

    Returns:
        ``{"R<j>" for j in ranks, "P@<k>", "mAP@<k>", "num_valid_queries"}`` (percent, except the count);
        ``{"num_valid_queries": 0.0}`` when no query has a positive.

    Raises:
        ValueError: on shape mismatches, a negative ``num_positives`` or a cut-off outside ``1..k``.

    Example:
        >>> matches = torch.tensor([[True, False, True], [False, True, False]])
        >>> m = topk_retrieval_metrics(matches, torch.tensor([2, 4]), ranks=(1, 3))
        >>> {key: round(value, 2) for key, value in m.items()}
        {'R1': 50.0, 'R3': 100.0, 'P@3': 50.0, 'mAP@3': 50.0, 'num_valid_queries': 2.0}
    """
    if not isinstance(matches, Tensor) or matches.dim() != 2 or matches.dtype != torch.bool:
        got = f"{matches.dtype} {tuple(matches.shape)}" if isinstance(matches, Tensor) else type(matches).__name__
        raise ValueError(f"matches must be a 2-d bool tensor (num_query, k), got {got}")
    num_query, k = matches.shape
    if k == 0:
        raise ValueError("matches has no column: at least one hit per query is needed")
    for j in ranks:
        if isinstance(j, bool) or not isinstance(j, int) or not 1 <= j <= k:
            raise ValueError(f"ranks must be integers in 1..{k} (the hits per query), got {j!r}")
    if num_positives is not None:
        num_positives = torch.as_tensor(num_positives, device=matches.device)
        if num_positives.shape != (num_query,):
            raise ValueError(f"num_positives must have shape ({num_query},), got {tuple(num_positives.shape)}")
        if bool((num_positives < 0).any()):
            raise ValueError("num_positives must be >= 0")
        valid = num_positives > 0
    else:
        valid = torch.ones(num_query, dtype=torch.bool, device=matches.device)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return {"num_valid_queries": 0.0}
    rel = matches[valid].to(torch.float64)
    hits = rel.cumsum(dim=1)
    precision_at_i = hits / torch.arange(1, k + 1, dtype=torch.float64, device=rel.device)
    if num_positives is not None:
        denominator = num_positives[valid].clamp(max=k).to(torch.float64)
    else:
        denominator = hits[:, -1].clamp(min=1.0)
    ap = (precision_at_i * rel).sum(dim=1) / denominator
    out = {f"R{j}": 100.0 * float((hits[:, j - 1] > 0).to(torch.float64).mean()) for j in ranks}
    out[f"P@{k}"] = 100.0 * float(rel.mean())
    out[f"mAP@{k}"] = 100.0 * float(ap.mean())
    out["num_valid_queries"] = float(num_valid)
    return out
