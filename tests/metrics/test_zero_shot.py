"""Zero-shot identity classification against a naive loop on constructed embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.metrics.zero_shot import ZeroShotIdentityMetric, identity_classifier, zero_shot_accuracy


def naive_zero_shot(captions, caption_pids, images, image_pids, ks=(1, 5)):
    """Class = normalised mean of the identity's normalised captions; rank the true class by cosine, one image
    at a time, with plain Python loops."""
    classes = sorted(set(caption_pids))
    weights = []
    for pid in classes:
        rows = [[x / math.sqrt(sum(v * v for v in c)) for x in c] for c, p in zip(captions, caption_pids) if p == pid]
        mean = [sum(col) / len(rows) for col in zip(*rows)]
        norm = math.sqrt(sum(v * v for v in mean))
        weights.append([v / norm for v in mean])
    hits = {k: 0 for k in ks}
    for image, pid in zip(images, image_pids):
        norm = math.sqrt(sum(v * v for v in image))
        scores = [sum(a * b / norm for a, b in zip(image, w)) for w in weights]
        order = sorted(range(len(classes)), key=lambda c: -scores[c])
        position = order.index(classes.index(pid))
        for k in ks:
            hits[k] += position < k
    return {f"top{k}": 100.0 * hits[k] / len(images) for k in ks}


def constructed(seed: int, num_ids: int = 9, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    caption_pids = torch.arange(num_ids).repeat_interleave(3)[torch.randperm(3 * num_ids, generator=g)] * 10 + 5
    captions = centres[(caption_pids - 5) // 10] + 0.8 * torch.randn(len(caption_pids), dim, generator=g)
    captions = captions * torch.rand(len(caption_pids), 1, generator=g).add(0.2) * 4  # unequal norms matter
    image_pids = torch.arange(num_ids).repeat(2) * 10 + 5
    images = centres[(image_pids - 5) // 10] + 1.5 * torch.randn(len(image_pids), dim, generator=g)
    return captions, caption_pids, images, image_pids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_equals_the_naive_loop(seed):
    captions, caption_pids, images, image_pids = constructed(seed)
    class_pids, weights = identity_classifier(captions, caption_pids)
    ours = zero_shot_accuracy(images, image_pids, weights, class_pids, topk=(1, 3, 5))
    expected = naive_zero_shot(captions.tolist(), caption_pids.tolist(), images.tolist(), image_pids.tolist(),
                               ks=(1, 3, 5))
    assert ours == pytest.approx(expected)
    assert 0 < ours["top1"] < 100  # the constructed case is neither trivial nor hopeless


def test_the_class_is_the_mean_of_normalised_captions_not_of_raw_ones():
    # identity 1: a long caption vector along x and a short one along y -> the class points at 45 degrees
    captions = torch.tensor([[10.0, 0.0], [0.0, 0.1], [1.0, -1.0]])
    pids, weights = identity_classifier(captions, torch.tensor([1, 1, 2]))
    torch.testing.assert_close(weights[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    # an image at 40 degrees is closer to class 1 (45 deg) than to class 2 (-45 deg); a raw mean would say x-axis
    image = torch.tensor([[math.cos(math.radians(40)), math.sin(math.radians(40))]])
    assert zero_shot_accuracy(image, torch.tensor([1]), weights, pids, topk=(1,)) == {"top1": 100.0}


def test_metric_over_batches_reports_chance_and_refuses_images_without_a_class():
    captions, caption_pids, images, image_pids = constructed(0)
    metric = ZeroShotIdentityMetric()
    for start in range(0, len(captions), 7):
        metric.update(captions[start:start + 7], caption_pids[start:start + 7], True)
    metric.update(images[:5], image_pids[:5], torch.zeros(5, dtype=torch.bool))
    metric.update(images[5:], image_pids[5:], False)
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == pytest.approx(naive_zero_shot(captions.tolist(), caption_pids.tolist(), images.tolist(),
                                                image_pids.tolist()))
    assert metric.chance() == pytest.approx({"top1": 100 / 9, "top5": 500 / 9})
    assert "among 9 identities" in metric.describe() and "chance top1 11.11, top5 55.56" in metric.describe()
    bad = ZeroShotIdentityMetric()
    bad.update(captions, caption_pids, True)
    bad.update(images[:1], torch.tensor([999]), False)
    with pytest.raises(ValueError, match="without prompts, e.g. pid 999"):
        bad.compute()
