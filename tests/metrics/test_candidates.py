"""MMEB-style candidate lists and Precision@1 against a loop, and chance level on random embeddings."""

from __future__ import annotations

import pytest
import torch

from reid_lab.metrics.candidates import candidate_lists, list_hits, mmeb_summary, precision_at_1


def test_lists_hold_one_positive_first_and_distinct_negatives():
    q = torch.tensor([0, 1, 2, 0])
    g = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    lists = candidate_lists(q, g, num_candidates=4, seed=3)
    assert lists.shape == (4, 4)
    for i, row in enumerate(lists.tolist()):
        assert g[row[0]] == q[i] and all(g[j] != q[i] for j in row[1:]) and len(set(row)) == 4
    assert torch.equal(lists, candidate_lists(q, g, 4, seed=3))


def test_precision_at_1_against_a_loop_and_ties_count_against():
    torch.manual_seed(0)
    dist = torch.rand(30, 50)
    dist[3, :] = 0.5  # a constant row: every candidate ties
    lists = torch.stack([torch.randperm(50)[:6] for _ in range(30)])
    hits = sum(all(dist[i, lists[i, 0]] < dist[i, j] for j in lists[i, 1:]) for i in range(30))
    assert precision_at_1(dist, lists) == pytest.approx(hits / 30)
    assert precision_at_1(dist[3:4], lists[3:4]) == 0.0


def test_random_embeddings_score_chance():
    torch.manual_seed(1)
    qp, gp = torch.randint(0, 50, (4000,)), torch.arange(50).repeat(4)
    lists = candidate_lists(qp, gp, num_candidates=10)
    dist = torch.rand(4000, len(gp))
    assert precision_at_1(dist, lists) == pytest.approx(0.1, abs=0.015)


def test_a_query_without_a_positive_is_named():
    with pytest.raises(ValueError, match="query 1 \\(pid 9\\) has no gallery item"):
        candidate_lists(torch.tensor([0, 9]), torch.tensor([0, 1, 2]), 2)


@pytest.mark.parametrize("ties", ["strict", "first"])
def test_list_hits_against_a_loop_with_padding_and_both_tie_rules(ties):
    torch.manual_seed(2)
    sim = torch.randint(0, 4, (40, 7)).float()  # few values: many ties with the positive
    valid = torch.ones(40, 7, dtype=torch.bool)
    valid[::3, 4:] = False  # shorter rows; their padding may hold anything
    sim[::3, 4:] = 99.0
    expected = []
    for i in range(40):
        others = [float(sim[i, j]) for j in range(1, 7) if valid[i, j]]
        expected.append(all(sim[i, 0] > o for o in others) if ties == "strict" else
                        int(torch.tensor([float(sim[i, 0]), *others]).numpy().argmax()) == 0)  # MMEB: np.argmax
    assert list_hits(sim, valid, ties).tolist() == expected
    assert list_hits(torch.ones(3, 5), ties=ties).tolist() == [ties == "first"] * 3  # a constant embedding


def test_mmeb_summary_means_per_meta_task_and_plainly_over_subsets():
    scores = {"ImageNet-1K": 60.0, "N24News": 40.0, "OK-VQA": 30.0}
    tasks = {"ImageNet-1K": "classification", "N24News": "classification", "OK-VQA": "vqa"}
    # overall is the mean over 3 subsets (43.33), not the mean of the meta-task means ((50 + 30) / 2 = 40)
    assert mmeb_summary(scores, tasks) == pytest.approx({"classification": 50.0, "vqa": 30.0, "overall": 130 / 3})
