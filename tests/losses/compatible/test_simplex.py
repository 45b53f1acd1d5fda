"""The stationary d-Simplex classifier (CoReS, Biondi et al. TPAMI 2023): geometry of the vertices, the
official construction, a naive cross-entropy, and the same vertex for an identity in two training subsets."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.data.records import ImageRecord
from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.losses.compatible.simplex import SimplexLoss, dsimplex_vertices
from reid_lab.upgrade.class_state import identity_of_new


def official_dsimplex(num_classes: int) -> torch.Tensor:
    """``src/cores/model.py`` ``dsimplex`` of NiccoBiondi/cores-compatibility, on the CPU."""
    n = num_classes - 1
    t = torch.zeros((n + 1, n))
    torch.eye(n, out=t[:-1, :])
    val = (1.0 - torch.sqrt(1.0 + torch.tensor([n]))) / n
    t[-1, :].add_(val)
    t.add_(-torch.mean(t, dim=0))
    t.div_(torch.norm(t, p=2, dim=1, keepdim=True) + 1e-8)
    return t


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_vertices_are_unit_norm_with_pairwise_cosine_minus_one_over_k_minus_one(k):
    v = dsimplex_vertices(k).double()
    assert v.shape == (k, k - 1)
    gram = v @ v.T
    expected = torch.full((k, k), -1.0 / (k - 1), dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.sum(0), torch.zeros(k - 1, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(v.float(), official_dsimplex(k), rtol=0, atol=1e-6)


def test_a_wider_embedding_gets_the_vertices_zero_padded():
    v = dsimplex_vertices(5, dim=8)
    assert v.shape == (5, 8)
    torch.testing.assert_close(v[:, :4], dsimplex_vertices(5))
    assert v[:, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="at least 4 dimensions"):
        dsimplex_vertices(5, dim=3)


def naive_ce(feats, targets, weights):
    total = 0.0
    for f, t in zip(feats.tolist(), targets.tolist()):
        logits = [sum(a * b for a, b in zip(f, w)) for w in weights.tolist()]
        top = max(logits)
        total += -(logits[t] - top - math.log(sum(math.exp(z - top) for z in logits)))
    return total / len(targets)


@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 16.0)])
def test_loss_equals_a_naive_cross_entropy_against_the_identity_vertices(normalize, scale):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 9, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    identity = torch.tensor([7, 2, 5])  # new class c is identity identity[c] of the whole training split
    out = SimplexLoss(num_classes=10, normalize=normalize, scale=scale)(CompatibleInputs(
        new_features=torch.zeros(6, 3), old_features=torch.zeros(6, 3), labels=labels, new_all_features=feats,
        extras={"class_identity": identity}))
    used = torch.nn.functional.normalize(feats, dim=1) if normalize else feats
    expected = naive_ce((scale * used).double(), identity[labels], dsimplex_vertices(10, 9).double())
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_default_k_is_the_embedding_dim_plus_one_and_identities_beyond_k_are_refused():
    plugin = SimplexLoss()
    assert plugin.vertices(4, torch.device("cpu"), torch.float32).shape == (5, 4)
    inputs = CompatibleInputs(new_features=torch.randn(2, 4), old_features=torch.zeros(2, 4),
                              labels=torch.tensor([0, 1]), extras={"class_identity": torch.tensor([1, 5])})
    with pytest.raises(ValueError, match=r"\[0, K=5\).*num_classes"):
        plugin(inputs)


def test_an_identity_keeps_its_vertex_in_an_old_and_a_new_training_subset():
    # the whole training split: identities 0..5 (the parsers number them), three images each
    raw = [ImageRecord(f"p{pid}_{i}.jpg", pid, 0) for pid in range(6) for i in range(3)]

    def subset(pids):  # the data module relabels each training subset 0..n-1 by sorted pid
        order = {pid: label for label, pid in enumerate(sorted(pids))}
        return [ImageRecord(r.path, order[r.pid], r.camid) for r in raw if r.pid in order]

    old_records, new_records = subset([1, 3, 4]), subset([0, 1, 2, 3, 4, 5])
    old_identity = identity_of_new(old_records, raw)
    new_identity = identity_of_new(new_records, raw)
    assert old_identity.tolist() == [1, 3, 4] and new_identity.tolist() == [0, 1, 2, 3, 4, 5]
    vertices = dsimplex_vertices(8)
    for pid in (1, 3, 4):  # old label != new label, same vertex
        old_label = old_records[[r.path for r in old_records].index(f"p{pid}_0.jpg")].pid
        new_label = new_records[[r.path for r in new_records].index(f"p{pid}_0.jpg")].pid
        assert old_label != new_label
        torch.testing.assert_close(vertices[old_identity[old_label]], vertices[new_identity[new_label]])
    # without a correspondence the labels serve (a warning says so)
    assert identity_of_new(old_records, []).tolist() == [0, 1, 2]
