"""topk_retrieval_metrics against a naive per-query loop of the definitions and a hand-computed case."""

from __future__ import annotations

import pytest
import torch

from reid_lab.metrics.topk import topk_retrieval_metrics


def naive_topk(matches, num_positives, ranks):
    """Per query, straight from the definitions: R@j = a relevant hit within the first j; P@k; AP@k =
    sum_{i <= k} P@i * rel_i / min(m, k) (Google Landmarks v2), m unknown -> relevant hits found (at least 1)."""
    rows = matches.tolist()
    k = len(rows[0])
    r_at = {j: [] for j in ranks}
    p_at_k, aps = [], []
    for q, rel in enumerate(rows):
        m = None if num_positives is None else int(num_positives[q])
        if m == 0:
            continue
        hits, total = 0, 0.0
        for i in range(1, k + 1):
            if rel[i - 1]:
                hits += 1
                total += hits / i
        denominator = min(m, k) if m is not None else max(hits, 1)
        aps.append(total / denominator)
        p_at_k.append(hits / k)
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
def test_matches_a_naive_loop(seed, known_positives):
    generator = torch.Generator().manual_seed(seed)
    k = 7
    matches = torch.rand(25, k, generator=generator) < 0.3
    # gallery positives: at least the hits found, sometimes more (missed by the top k), sometimes none
    num_positives = matches.sum(1) + torch.randint(0, 4, (25,), generator=generator)
    num_positives[:3] = 0
    matches[:3] = False
    positives = num_positives if known_positives else None
    ranks = (1, 3, k)
    out = topk_retrieval_metrics(matches, positives, ranks=ranks)
    expected = naive_topk(matches, positives, ranks)
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
