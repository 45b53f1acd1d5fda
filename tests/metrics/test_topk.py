"""topk_retrieval_metrics against a naive per-query loop of the definitions and a hand-computed case."""

from __future__ import annotations

import pytest
import torch

from reid_lab.metrics.topk import topk_retrieval_metrics


def naive_topk(matches, num_positives, ranks, junk=None):
    """Per query, straight from the definitions: drop the junk hits, then on the kept list of length k':
    R@j = a relevant hit within the first j kept; P@k = relevant / k'; AP@k = sum_{i <= k'} P@i * rel_i / min(m, k')
    (Google Landmarks v2), m unknown -> relevant hits found (at least 1)."""
    k = matches.shape[1]
    r_at = {j: [] for j in ranks}
    p_at_k, aps = [], []
    for q, row in enumerate(matches.tolist()):
        rel = [hit for i, hit in enumerate(row) if junk is None or not junk[q, i]]
        m = None if num_positives is None else int(num_positives[q])
        if m == 0:
            continue
        hits, total = 0, 0.0
        for i in range(1, len(rel) + 1):
            if rel[i - 1]:
                hits += 1
                total += hits / i
        denominator = max(min(m, len(rel)), 1) if m is not None else max(hits, 1)
        aps.append(total / denominator)
        p_at_k.append(hits / max(len(rel), 1))
        for j in ranks:
            r_at[j].append(any(rel[:j]))
    if not aps:
        return {"num_valid_queries": 0.0}
    mean = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    out = {f"R{j}": mean(r_at[j]) for j in ranks}
    out.update({f"P@{k}": mean(p_at_k), f"mAP@{k}": mean(aps), "num_valid_queries": float(len(aps))})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("known_positives", [True, False])
@pytest.mark.parametrize("with_junk", [False, True])
def test_matches_a_naive_loop(seed, known_positives, with_junk):
    generator = torch.Generator().manual_seed(seed)
    k = 7
    matches = torch.rand(25, k, generator=generator) < 0.3
    # junk (ReID protocol: same pid and camera) is a same-pid hit; one query's list is junk only
    junk = (matches & (torch.rand(25, k, generator=generator) < 0.4)) if with_junk else None
    if with_junk:
        matches[3], junk[3] = True, True
    kept_hits = matches if junk is None else matches & ~junk
    # gallery positives: at least the kept hits found, sometimes more (missed by the top k), sometimes none
    num_positives = kept_hits.sum(1) + torch.randint(0, 4, (25,), generator=generator)
    num_positives[3] = max(int(num_positives[3]), 1)
    num_positives[:3] = 0
    matches[:3] = False
    if junk is not None:
        junk[:3] = False
    positives = num_positives if known_positives else None
    ranks = (1, 3, k)
    out = topk_retrieval_metrics(matches, positives, ranks=ranks, junk=junk)
    expected = naive_topk(matches, positives, ranks, junk)
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12)


def test_hand_computed_case():
    # q0: hits [rel, -, rel], 2 positives in the gallery: AP@3 = (1/1 + 2/3) / 2; q1: hits [-, rel, -], 4
    # positives, min(4, 3) = 3: AP@3 = (1/2) / 3; q2: no positive in the gallery, skipped.
    matches = torch.tensor([[True, False, True], [False, True, False], [False, False, False]])
    out = topk_retrieval_metrics(matches, torch.tensor([2, 4, 0]), ranks=(1, 2))
    assert out == pytest.approx(
        {"R1": 50.0, "R2": 100.0, "P@3": 100 * (2 / 3 + 1 / 3) / 2,
         "mAP@3": 100 * ((1 + 2 / 3) / 2 + (1 / 2) / 3) / 2, "num_valid_queries": 2.0}
    )
    # every positive inside the top k: AP@k is the full AP
    full = topk_retrieval_metrics(torch.tensor([[False, True, True, False]]), torch.tensor([2]))
    assert full["mAP@4"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_junk_is_dropped_before_ranking_by_hand():
    # q0: hits [junk, -, rel], 1 positive left: kept [-, rel] -> R1 0, R2 1, P@3 1/2, AP = (1/2) / min(1, 2);
    # q1: hits [rel, junk, rel], 3 positives: kept [rel, rel] -> R1 1, P@3 1, AP = (1 + 1) / min(3, 2) = 1
    matches = torch.tensor([[True, False, True], [True, True, True]])
    junk = torch.tensor([[True, False, False], [False, True, False]])
    out = topk_retrieval_metrics(matches, torch.tensor([1, 3]), ranks=(1, 2), junk=junk)
    assert out == pytest.approx({"R1": 50.0, "R2": 100.0, "P@3": 75.0, "mAP@3": 75.0, "num_valid_queries": 2.0})
    with pytest.raises(ValueError, match=r"junk must be a bool tensor shaped like matches \(2, 3\)"):
        topk_retrieval_metrics(matches, junk=junk[:, :2])


def test_no_valid_query_and_bad_input():
    assert topk_retrieval_metrics(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([0, 0])) == {
        "num_valid_queries": 0.0
    }
    with pytest.raises(ValueError, match="2-d bool tensor"):
        topk_retrieval_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"num_positives must have shape \(2,\)"):
        topk_retrieval_metrics(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([1]))
    with pytest.raises(ValueError, match="ranks must be integers in 1..3"):
        topk_retrieval_metrics(torch.zeros(2, 3, dtype=torch.bool), ranks=(4,))
