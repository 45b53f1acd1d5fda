"""TPR at FPR against a hand-computed case and a brute-force threshold sweep."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.metrics.verification import tpr_at_fpr, verification_pairs


def test_hand_case():
    impostor = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3])  # 10 pairs
    genuine = torch.tensor([0.95, 0.6, 0.45, 0.35])
    # FPR 0.1 allows one impostor above the threshold: threshold 0.5, genuine above: 0.95, 0.6
    # FPR 0.2 allows two: threshold 0.4, genuine above: 0.95, 0.6, 0.45
    got = tpr_at_fpr(genuine, impostor, (0.1, 0.2, 0.05))
    assert got[0.1] == pytest.approx(0.5) and got[0.2] == pytest.approx(0.75)
    assert math.isnan(got[0.05])  # below 1 / 10: not resolvable


def test_against_a_threshold_sweep():
    torch.manual_seed(0)
    genuine, impostor = torch.randn(300) + 1.5, torch.randn(5000)
    for fpr in (1e-3, 1e-2, 0.1):
        best = 0.0
        for t in torch.cat([impostor, genuine]).tolist():  # the highest TPR whose FPR stays within the target
            if float((impostor > t).double().mean()) <= fpr:
                best = max(best, float((genuine > t).double().mean()))
        assert tpr_at_fpr(genuine, impostor, (fpr,))[fpr] == pytest.approx(best)


def test_pairs_drop_same_camera_genuines():
    sim = torch.arange(6.0).view(2, 3)
    gen, imp = verification_pairs(sim, torch.tensor([1, 2]), torch.tensor([1, 1, 2]), torch.tensor([0, 0]),
                                  torch.tensor([0, 1, 1]))
    assert sorted(gen.tolist()) == [1.0, 5.0] and sorted(imp.tolist()) == [2.0, 3.0, 4.0]  # (0, 0) dropped
