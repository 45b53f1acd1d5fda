"""ReIDModule pieces that do not need the Trainer: schedule, losses, flip test, embedding space."""

from __future__ import annotations

import math

import pytest
import torch

from reid_lab.modules.optim import lr_schedule
from reid_lab.modules.reid import ReIDModule


def test_lr_schedule_warmup_then_multistep_by_hand():
    f = lr_schedule("multistep", 120, [40, 70], 0.1, warmup_epochs=10, warmup_factor=0.01, steps_per_epoch=5)
    assert f(0) == pytest.approx(0.01)
    assert f(25) == pytest.approx(0.01 * 0.5 + 0.5)  # epoch 5 of a 10-epoch warm-up: half way
    assert f(50) == pytest.approx(1.0)
    assert f(40 * 5 - 1) == pytest.approx(1.0)
    assert f(40 * 5) == pytest.approx(0.1)
    assert f(70 * 5) == pytest.approx(0.01)


def test_lr_schedule_cosine_by_hand():
    f = lr_schedule("cosine", 10, [], 0.1, warmup_epochs=0, warmup_factor=0.01, steps_per_epoch=4)
    assert f(0) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(40) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        lr_schedule("linear", 10, [], 0.1, 0, 0.01)


def test_total_loss_is_the_weighted_sum_of_the_parts():
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2,
                        losses=[{"name": "ce", "epsilon": 0.1, "weight": 0.5}, {"name": "triplet", "weight": 2.0}])
    images = torch.randn(8, 3, 64, 32)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    total, parts = module.compute_losses(module(images), pids)
    assert set(parts) == {"ce", "triplet"}
    assert float(total) == pytest.approx(0.5 * float(parts["ce"]) + 2.0 * float(parts["triplet"]), rel=1e-6)


def test_flip_test_averages_the_image_and_its_mirror():
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2, flip_test=True).eval()
    images = torch.randn(2, 3, 64, 32)
    expected = (module.model(images)["embedding"] + module.model(images.flip(3))["embedding"]) / 2
    torch.testing.assert_close(module.embedder()({"image": images})["image"], expected)


def test_embedding_space_record_and_bad_arguments():
    module = ReIDModule(backbone="resnet18", num_classes=4, space_label="demo/old")
    space = module.embedding_space()
    assert space["label"] == "demo/old" and space["dim"] == 512 and space["distance"] == "cosine"
    assert space["space_id"].startswith("demo-old-512d-") and space["modalities"] == ["image"]
    with pytest.raises(ValueError, match="num_classes"):
        ReIDModule(backbone="resnet18", num_classes=0)
    with pytest.raises(ValueError, match="mapping with a 'name' key"):
        ReIDModule(backbone="resnet18", num_classes=4, losses=[{"weight": 1.0}])
