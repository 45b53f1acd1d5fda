"""VLM2Vec's one-directional InfoNCE against the formula written as a loop."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.losses.image_text import CLIPLoss, InfoNCELoss, build_image_text_loss


def _naive(queries, targets, scale):
    q = [x / x.norm() for x in queries]
    t = [x / x.norm() for x in targets]
    total = 0.0
    for i in range(len(q)):
        logits = [scale * float(q[i] @ t[j]) for j in range(len(t))]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(q)


def test_text_to_image_infonce_is_the_formula():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    scale = torch.tensor(math.log(1 / 0.02), dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 2, 3])  # identity is ignored (VLM2Vec)
    got = InfoNCELoss()(image, text, pids, scale)
    assert float(got) == pytest.approx(_naive(text, image, 50.0), rel=1e-9)
    reverse = InfoNCELoss(direction="image2text")(image, text, pids, scale)
    assert float(reverse) == pytest.approx(_naive(image, text, 50.0), rel=1e-9)
    assert float(got) != pytest.approx(float(reverse), rel=1e-3)
    both = build_image_text_loss("infonce", direction="both")(image, text, pids, scale)
    assert float(both) == pytest.approx(float(CLIPLoss()(image, text, pids, scale)), rel=1e-9)


def test_a_bad_direction_is_refused():
    with pytest.raises(ValueError, match="direction must be one of"):
        InfoNCELoss(direction="query2target")
