"""ReIDDataModule on a real (tiny) synthetic tree: PK batches, the evaluation loader, subsets, transforms."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.datasets import load_dataset
from reid_lab.data.transforms import build_test_transform, build_train_transform


def _dm(root, **kw):
    args = {"dataset": "synthetic", "root": str(root), "image_size": (64, 32), "batch_size": 8,
            "num_instances": 2, "eval_batch_size": 16, "num_workers": 0}
    args.update(kw)
    return ReIDDataModule(**args)


def test_train_batches_are_pk_and_labels_are_relabelled(tiny_synthetic):
    dm = _dm(tiny_synthetic)
    assert dm.num_classes == load_dataset("synthetic", tiny_synthetic).num_train_pids
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 64, 32)
    counts = Counter(batch["pid"].tolist())
    assert len(counts) == 4 and set(counts.values()) == {2}
    assert set(counts) <= set(range(dm.num_classes))


def test_eval_loader_yields_query_then_gallery_with_ids(tiny_synthetic):
    dm = _dm(tiny_synthetic)
    splits = load_dataset("synthetic", tiny_synthetic)
    batches = list(dm.val_dataloader())
    is_query = torch.cat([b["is_query"] for b in batches])
    pids = torch.cat([b["pid"] for b in batches])
    camids = torch.cat([b["camid"] for b in batches])
    expected = splits.query + splits.gallery
    assert is_query.tolist() == [True] * len(splits.query) + [False] * len(splits.gallery)
    assert pids.tolist() == [r.pid for r in expected]
    assert camids.tolist() == [r.camid for r in expected]


def test_train_subset_selects_and_relabels(tiny_synthetic, tmp_path):
    train = load_dataset("synthetic", tiny_synthetic).train
    keep = [r for r in train if r.pid in (1, 3)]
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"paths": [r.path for r in keep]}))
    dm = _dm(tiny_synthetic, train_subset=str(subset))
    assert dm.num_classes == 2
    assert sorted(r.path for r in dm.train_records) == sorted(r.path for r in keep)
    assert {r.pid for r in dm.train_records} == {0, 1}
    subset.write_text(json.dumps({"paths": ["not/a/training/image.jpg"]}))
    with pytest.raises(ValueError, match="not in the training split"):
        _ = _dm(tiny_synthetic, train_subset=str(subset)).train_records


def test_transforms_shapes_and_test_transform_is_deterministic(tiny_synthetic):
    from PIL import Image

    image = Image.open(load_dataset("synthetic", tiny_synthetic).train[0].path)
    test = build_test_transform((64, 32))
    torch.testing.assert_close(test(image), test(image))
    train = build_train_transform((64, 32), random_erasing_prob=1.0, autoaugment_prob=1.0, color_jitter=0.2)
    assert train(image).shape == (3, 64, 32)
    with pytest.raises(ValueError, match="image_size"):
        build_test_transform((64,))
