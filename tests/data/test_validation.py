"""The validation split carved from training identities: what it holds, and that training and test never see it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.text_datamodule import TextImageDataModule
from reid_lab.data.validation import carve_validation_ids, validation_query_gallery


@dataclass
class Rec:
    path: str
    pid: int
    camid: int | None


def test_carved_identities_are_seeded_and_sized():
    pids = list(range(40)) * 3
    a, b = carve_validation_ids(pids, 0.25, seed=1), carve_validation_ids(pids, 0.25, seed=1)
    assert a == b and len(a) == 10 and a <= set(range(40))
    assert carve_validation_ids(pids, 0.25, seed=2) != a
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        carve_validation_ids(pids, 0.0)


def test_query_gallery_follow_market_construction():
    recs = [Rec("b.jpg", 1, 0), Rec("a.jpg", 1, 0), Rec("c.jpg", 1, 2), Rec("d.jpg", 2, 0), Rec("e.jpg", 2, 0),
            Rec("f.jpg", 3, 1)]
    query, gallery = validation_query_gallery(recs)
    # pid 1: the first image by path of each camera; pid 2 / 3: one camera only, no query (no valid match)
    assert [r.path for r in query] == ["a.jpg", "c.jpg"]
    assert [r.path for r in gallery] == ["b.jpg", "d.jpg", "e.jpg", "f.jpg"]
    captions = [Rec("x", 1, None), Rec("w", 1, None), Rec("y", 2, None)]
    query, gallery = validation_query_gallery(captions)
    assert [r.path for r in query] == ["w"] and [r.path for r in gallery] == ["x", "y"]


def _val_file(tmp_path, records, pids):
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"paths": [r.path for r in records if r.pid in pids]}))
    return path


def test_reid_data_module_trains_without_and_validates_on_the_held_out_ids(tiny_synthetic, tmp_path):
    plain = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), check_images=False)
    train = plain.splits.train
    held = carve_validation_ids([r.pid for r in train], 0.34, seed=0)
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), check_images=False,
                        val_subset=str(_val_file(tmp_path, train, held)))
    val, is_query = dm.val_eval_records()
    test_paths = {r.path for r in dm.splits.query + dm.splits.gallery}
    assert {r.pid for r in val} == held and any(is_query) and not (test_paths & {r.path for r in val})
    assert not ({r.path for r in val} & {r.path for r in dm.all_train_records})
    assert dm.num_classes == plain.num_classes - len(held)
    assert dm.eval_records() == plain.eval_records()  # test is untouched
    assert plain.val_eval_records() == plain.eval_records()  # without validation: the test split, as before
    batch = next(iter(dm.val_dataloader()))
    assert bool(batch["is_query"][0]) and set(batch["pid"].tolist()) <= held
    # the same held-out ids through val_fraction (seeded by the data module's seed)
    by_fraction = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), check_images=False,
                                 val_fraction=0.34)
    assert {r.pid for r in by_fraction.val_records} == held


def test_validation_images_inside_the_training_subset_are_refused(tiny_synthetic, tmp_path):
    plain = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), check_images=False)
    train = plain.splits.train
    subset = tmp_path / "train.json"
    subset.write_text(json.dumps({"paths": [r.path for r in train]}))
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), check_images=False, train_subset=str(subset),
                        val_subset=str(_val_file(tmp_path, train, {train[0].pid})))
    with pytest.raises(ValueError, match="share .* image\\(s\\).*must not be trained on"):
        _ = dm.all_train_records


def test_caption_data_validates_on_held_out_images_captions(tiny_synthetic, tmp_path):
    plain = TextImageDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32))
    train = plain.splits.train
    held = {train[0].pid, train[-1].pid}
    dm = TextImageDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32),
                             val_subset=str(_val_file(tmp_path, train, held)))
    records, is_query = dm.eval_records("validate")
    images = [r for r, q in zip(records, is_query) if not q]
    assert {r.pid for r in images} == held and sum(is_query) == sum(len(r.captions) for r in images)
    assert dm.num_classes == plain.num_classes - 2
    assert not ({r.path for r in images} & {r.path for r in dm.train_records})
    assert dm.eval_records("test") == plain.eval_records("test")


def _camera_less_folder(root, identities=10, images=4):
    """A ``folder`` dataset without camera labels: ``root/<identity>/<n>.png`` (every image its own camid)."""
    from PIL import Image

    for i in range(identities):
        for k in range(images):
            path = root / f"person{i:02d}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 32), (20 * i, 10 * k, 100)).save(path)
    return root


def test_camera_less_folder_data_validates_with_one_query_per_identity(tmp_path):
    """The issue's crash: 3 held-out identities gave 30 queries and 0 gallery items, because each image of a
    camera-less folder dataset has its own camid. Now: the first image of each identity is its query."""
    root = _camera_less_folder(tmp_path / "photos")
    dm = ReIDDataModule(dataset="folder", root=str(root), image_size=(32, 16), check_images=False,
                        val_fraction=0.3, dataset_options={"train_fraction": 0.7})
    assert dm.splits.meta["cameras_known"] is False
    records, is_query = dm.val_eval_records()
    held = {r.pid for r in dm.val_records}
    query = [r for r, q in zip(records, is_query) if q]
    gallery = [r for r, q in zip(records, is_query) if not q]
    assert len(held) == 2  # round(0.3 * 7 training identities)
    assert sorted(r.pid for r in query) == sorted(held)  # one query per held-out identity ...
    assert len(gallery) == 3 * len(held)  # ... and its other 3 images as its gallery
    assert all(q.path.endswith("0.png") for q in query)  # the first by path
    dm.check_evaluation_splits()


def test_check_query_gallery_names_the_split_and_the_query_without_a_positive():
    from reid_lab.data.validation import check_query_gallery

    with pytest.raises(ValueError, match="the market validation split has 3 query and 0 gallery items"):
        check_query_gallery([Rec("q", 1, 0)] * 3, [], "market validation")
    query, gallery = [Rec("q1", 1, 0), Rec("q2", 2, 0)], [Rec("g1", 1, 1), Rec("g2", 2, 0)]
    with pytest.raises(ValueError, match=r"1 of 2 queries without a positive .*'q2', identity 2.*another camera"):
        check_query_gallery(query, gallery, "test")  # identity 2's only gallery image shares its camera
    check_query_gallery(query, gallery, "test", cameras_known=False)  # without cameras it is a positive
