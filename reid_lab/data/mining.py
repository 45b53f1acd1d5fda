"""Hard negatives mined from a model's embeddings, with a false-negative guard.

The recipe of the papers that train embedders on pairs (NV-Retriever, Moreira et al. 2024, arXiv 2407.15831,
§3 "positive-aware hard-negative mining"; E5 / VLM2Vec-style hard negatives): embed every query and a pool of
candidates with a teacher model, rank the pool by similarity to each query and keep the top-ranked items that
are *not* the query's match. Because the top of that list holds unlabeled positives (another photo of the same
person, a paraphrase of the caption), two guards drop candidates before taking the top ``num_negatives``:

* ``margin`` (NV-Retriever's *TopK-PercPos*, their best at 0.95): drop every candidate whose similarity
  exceeds ``margin × positive similarity``;
* ``skip`` (the "skip the top few" guard of earlier work, e.g. ranks 30–100 of ANCE / RocketQA style mining):
  drop the ``skip`` best-ranked candidates left after the identity and margin filters.

Candidates of the query's identity are never negatives. Ties keep the pool's order (a stable sort), so a
mined list is reproducible.

:func:`mine_hard_negatives` works on a similarity matrix; :func:`mine_pair_negatives` applies it to instruction
pairs (:mod:`reid_lab.data.pairs`): the pool of a pair is every *target* of the pairs with the same target kind
and instruction (the training corpus, as NV-Retriever mines from the corpus of positives), embedded by
:func:`feature_lookup` from feature files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def mine_hard_negatives(similarity: Tensor, query_ids: Tensor, candidate_ids: Tensor, num_negatives: int,
                        skip: int = 0, margin: float | None = None, positive_similarity: Tensor | None = None,
                        exclude: Tensor | None = None) -> Tensor:
    """``(Q, num_negatives)`` candidate indices: per query, the most similar candidates that are not a match.

    Args:
        similarity: ``(Q, C)`` query–candidate similarities (larger is closer, e.g. cosine).
        query_ids / candidate_ids: ``(Q,)`` / ``(C,)`` identities; a candidate with the query's identity is never
            a negative. A negative id means "unknown": it matches nothing (use ``exclude`` for such rows).
        num_negatives: negatives per query.
        skip: drop this many of the best-ranked candidates that pass the identity and margin filters.
        margin: drop candidates with similarity ``> margin * positive_similarity`` (NV-Retriever TopK-PercPos).
        positive_similarity: ``(Q,)`` similarity of each query to its positive; needed with ``margin``.
        exclude: ``(Q, C)`` bool, further candidates that may not be negatives (e.g. the pair's own target).

    Returns:
        ``(Q, num_negatives)`` int64 indices into the candidates, best-ranked first.

    Raises:
        ValueError: bad shapes or options, or a query left with fewer than ``num_negatives`` candidates (named,
            with how many each filter removed).
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (num_query, num_candidates), got shape {tuple(similarity.shape)}")
    q, c = similarity.shape
    if query_ids.shape != (q,) or candidate_ids.shape != (c,):
        raise ValueError(f"query_ids {tuple(query_ids.shape)} / candidate_ids {tuple(candidate_ids.shape)} must be "
                         f"({q},) / ({c},) for a similarity of shape {(q, c)}")
    if num_negatives < 1 or skip < 0:
        raise ValueError(f"num_negatives must be >= 1 and skip >= 0, got {num_negatives} and {skip}")
    if margin is not None and positive_similarity is None:
        raise ValueError("a margin needs positive_similarity (the similarity of each query to its positive)")
    sim = similarity.float()
    same = (query_ids[:, None] == candidate_ids[None, :]) & (query_ids[:, None] >= 0)
    if exclude is not None:
        same = same | exclude.bool()
    blocked = same.clone()
    if margin is not None:
        threshold = float(margin) * positive_similarity.float().reshape(q, 1)
        blocked |= sim > threshold
    masked = sim.masked_fill(blocked, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    chosen = order[:, skip:skip + num_negatives]
    available = (~blocked).sum(dim=1) - skip
    short = torch.nonzero(available < num_negatives).flatten()
    if len(short):
        i = int(short[0])
        by_margin = int((blocked[i] & ~same[i]).sum())
        raise ValueError(
            f"query {i} has {int((~blocked[i]).sum())} candidates left after removing {int(same[i].sum())} of its "
            f"identity and {by_margin} above the margin ({margin}); with skip {skip} that is fewer than "
            f"num_negatives = {num_negatives} ({len(short)} queries short): lower skip / num_negatives or raise margin"
        )
    return chosen


def item_key(item: Mapping[str, Any], root: str | Path) -> str:
    """The feature-file key of a pair item: its image's real path (under ``root``) or its text.

    Raises:
        ValueError: an item with both an image and a text (a feature file row holds one modality).
    """
    image, text = item.get("image"), item.get("text")
    if image is not None and text is not None:
        raise ValueError(f"item {dict(item)} holds an image and a text; a feature file embeds one modality per row, "
                         "so mined negatives need image-only or text-only items")
    return os.path.realpath(Path(root, image)) if image is not None else str(text)


def feature_lookup(feature_sets: Iterable[Any]) -> dict[str, Tensor]:
    """``{item key: (D,) L2-normalised embedding}`` from feature sets (:class:`~reid_lab.embedding.features.
    FeatureSet`: ``features``, ``items``, ``is_query``, ``modalities``, ``space``); image rows keyed by their real
    path, text rows by their text. The first row of a repeated item wins.

    Raises:
        ValueError: the sets come from different embedding spaces (their similarities would mean nothing).
    """
    lookup: dict[str, Tensor] = {}
    spaces: set[str] = set()
    for fs in feature_sets:
        spaces.add(str(fs.space.get("space_id", "")))
        features = torch.nn.functional.normalize(fs.features.float(), dim=1)
        query_modality, gallery_modality = fs.modalities
        for row, (item, is_query) in enumerate(zip(fs.items, fs.is_query.tolist())):
            image = (query_modality if is_query else gallery_modality) == "image"
            lookup.setdefault(os.path.realpath(item) if image else str(item), features[row])
    if len(spaces) > 1:
        raise ValueError(f"the feature files come from different embedding spaces {sorted(spaces)}; mine from "
                         "features of one model")
    return lookup


def mine_pair_negatives(pairs: list[dict], embedding_of: Callable[[Mapping[str, Any]], Tensor],
                        num_negatives: int, skip: int = 0, margin: float | None = 0.95) -> list[dict]:
    """``pairs`` (JSON-ready dicts of :mod:`reid_lab.data.pairs`) with ``negatives`` mined from the targets.

    The pool of a pair: the distinct targets of every pair with the same target kind (image / text) and
    instruction. Its own target and every target of a pair with the same ``pid`` (>= 0) are matches, never
    negatives; the guard is ``margin`` × the query's similarity to its own target, then ``skip``
    (:func:`mine_hard_negatives`).

    Args:
        embedding_of: ``item dict -> (D,)`` embedding (e.g. a :func:`feature_lookup` keyed by :func:`item_key`).
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(pairs):
        kind = "image" if "image" in p["target"] else "text"
        groups.setdefault((kind, p["target"].get("instruction", "")), []).append(i)
    out = [dict(p) for p in pairs]
    for members in groups.values():
        pool: dict[str, int] = {}  # target key -> pool index
        pool_items: list[dict] = []
        pool_pids: list[set[int]] = []
        for i in members:
            key = repr(sorted(pairs[i]["target"].items()))
            if key not in pool:
                pool[key] = len(pool_items)
                pool_items.append(pairs[i]["target"])
                pool_pids.append(set())
            pool_pids[pool[key]].add(int(pairs[i].get("pid", -1)))
        candidates = torch.stack([embedding_of(t) for t in pool_items])
        queries = torch.stack([embedding_of(pairs[i]["query"]) for i in members])
        similarity = queries @ candidates.T
        own = torch.tensor([pool[repr(sorted(pairs[i]["target"].items()))] for i in members])
        exclude = torch.zeros(len(members), len(pool_items), dtype=torch.bool)
        exclude[torch.arange(len(members)), own] = True
        query_ids = torch.tensor([int(pairs[i].get("pid", -1)) for i in members], dtype=torch.long)
        candidate_ids = torch.tensor([next(iter(p)) if len(p) == 1 else -1 for p in pool_pids], dtype=torch.long)
        for col, pids in enumerate(pool_pids):  # a target of pairs of several identities matches each of them
            if len(pids) > 1:
                exclude[:, col] |= torch.isin(query_ids, torch.tensor(sorted(p for p in pids if p >= 0)))
        chosen = mine_hard_negatives(similarity, query_ids, candidate_ids, num_negatives, skip=skip, margin=margin,
                                     positive_similarity=similarity[torch.arange(len(members)), own], exclude=exclude)
        for row, i in enumerate(members):
            out[i]["negatives"] = [dict(pool_items[j]) for j in chosen[row].tolist()]
    return out
