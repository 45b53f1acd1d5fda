"""Retrieval metrics of a truncated ranked list: R@j (hit rate), P@k and the truncated AP@k, with junk removal.

For search results that return only the top ``k`` of each query (a faiss index, ``reid_lab.retrieval``), where
the full ranking that :func:`reid_lab.metrics.rank.evaluate_rank` needs is not available. The protocol is the
same as ``evaluate_rank``'s: the caller marks the junk hits (ReID protocol: same pid AND same camera as the
query; cross-modal protocol: none) and they are dropped from each list before anything is counted; the kept
hits keep their order, so the ``i``-th kept hit has kept-rank ``i``.

* R@j (the field's Recall@j / CMC@j): fraction of valid queries with a relevant hit at kept-rank ``<= j``.
* P@k: mean over queries of the fraction of relevant hits among the kept hits.
* AP@k = (1 / min(m, k')) * sum_{i <= k'} P@i * rel_i over the ``k'`` kept hits, with ``m`` the query's relevant
  items in the whole gallery (junk excluded): the truncated AP of the Google Landmarks v2 benchmark (Weyand et
  al., CVPR 2020) on the kept list. It equals the full AP when every relevant item is within the list.

When the list is the whole gallery (``k`` = gallery size) the kept list is ``evaluate_rank``'s kept ranking, so
R@j and mAP@k equal its CMC@j and mAP. With ``k`` < gallery size, mAP@k is the truncated AP above (not the mAP
of the ReID tables), and R@j is exact for every query with at least ``j`` kept hits; a query whose list holds
fewer (junk filled it) counts a miss for the unseen kept-ranks, a lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["topk_retrieval_metrics"]


def topk_retrieval_metrics(
    matches: Tensor, num_positives: Tensor | None = None, ranks: Sequence[int] = (1,), junk: Tensor | None = None
) -> dict[str, float]:
    """R@j, P@k and mAP@k in percent from the relevance of each query's top-``k`` hits.

    Args:
        matches: ``(num_query, k)`` bool, ``matches[q, i]``: the ``(i + 1)``-th hit of query ``q`` shares its
            identity.
        num_positives: ``(num_query,)`` relevant items of each query in the whole gallery, junk excluded. Queries
            with none are skipped (as in the ReID protocol). ``None``: unknown; every query counts and AP@k
            divides by the relevant hits found in the list (at least 1), which overestimates AP when positives
            are missed.
        ranks: the cut-offs ``j`` of the reported R@j, each in ``1..k``.
        junk: ``(num_query, k)`` bool, hits to drop before ranking (ReID protocol: same pid and same camera as
            the query); ``None``: nothing is dropped (cross-modal protocol). A junk hit is never relevant.

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
        >>> junk = torch.tensor([[True, False, False], [False, False, False]])  # q0's first hit: same camera
        >>> topk_retrieval_metrics(matches, torch.tensor([1, 4]), junk=junk)["R1"]
        0.0
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
    if junk is not None and (not isinstance(junk, Tensor) or junk.dtype != torch.bool or junk.shape != matches.shape):
        got = f"{junk.dtype} {tuple(junk.shape)}" if isinstance(junk, Tensor) else type(junk).__name__
        raise ValueError(f"junk must be a bool tensor shaped like matches {tuple(matches.shape)}, got {got}")
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
    kept = torch.ones_like(matches[valid]) if junk is None else ~junk[valid]
    rel = (matches[valid] & kept).to(torch.float64)
    kept_rank = kept.to(torch.float64).cumsum(dim=1)  # 1-based kept-rank of each kept hit
    num_kept = kept_rank[:, -1]
    hits = rel.cumsum(dim=1)
    precision_at_i = hits / kept_rank.clamp(min=1.0)  # read only where rel, which implies kept
    if num_positives is not None:
        denominator = torch.minimum(num_positives[valid].to(torch.float64), num_kept).clamp(min=1.0)
    else:
        denominator = hits[:, -1].clamp(min=1.0)
    ap = (precision_at_i * rel).sum(dim=1) / denominator
    out = {}
    for j in ranks:
        hit_within_j = ((rel > 0) & (kept_rank <= j)).any(dim=1)
        out[f"R{j}"] = 100.0 * float(hit_within_j.to(torch.float64).mean())
    out[f"P@{k}"] = 100.0 * float((hits[:, -1] / num_kept.clamp(min=1.0)).mean())
    out[f"mAP@{k}"] = 100.0 * float(ap.mean())
    out["num_valid_queries"] = float(num_valid)
    return out
