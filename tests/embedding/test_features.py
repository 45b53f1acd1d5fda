"""Feature files: every field round-trips, captions and camera-less sets, version-1 files, bad input."""

from __future__ import annotations

import pytest
import torch

from reid_lab.embedding.features import FeatureSet


def _image_set() -> FeatureSet:
    return FeatureSet(torch.randn(5, 4), torch.tensor([1, 2, 1, 3, 2]), torch.tensor([0, 1, 1, 0, 2]),
                      torch.tensor([True, True, False, False, False]), [f"img{i}.jpg" for i in range(5)],
                      {"space_id": "s-4d-abc", "dim": 4})


def test_round_trip_keeps_every_field(tmp_path):
    fs = _image_set()
    back = FeatureSet.load(fs.save(tmp_path / "f.pt"))
    torch.testing.assert_close(back.features, fs.features)
    assert back.pids.tolist() == fs.pids.tolist() and back.camids.tolist() == fs.camids.tolist()
    assert back.is_query.tolist() == fs.is_query.tolist() and back.items == fs.items == back.paths
    assert back.space == fs.space and back.modality == "image"


def test_caption_sets_have_no_cameras_and_no_paths(tmp_path):
    captions = ["a man in a red coat", "a woman with a blue bag", "a man in a red jacket"]
    fs = FeatureSet(torch.randn(3, 4), torch.tensor([0, 1, 0]), None, torch.tensor([True, True, False]),
                    captions, {}, "text")
    back = FeatureSet.load(fs.save(tmp_path / "t.pt"))
    assert back.camids is None and back.modality == "text" and back.items == captions
    query, gallery = back.split()
    assert query.items == captions[:2] and gallery.items == captions[2:] and query.camids is None
    with pytest.raises(ValueError, match="text items, not image paths"):
        _ = back.paths


def test_version_one_files_still_load(tmp_path):
    payload = {"format": "reid_lab.features/1", "features": torch.randn(2, 3), "pids": torch.tensor([0, 1]),
               "camids": torch.tensor([0, 1]), "is_query": torch.tensor([True, False]), "paths": ["a.jpg", "b.jpg"],
               "space": {"space_id": "x"}}
    torch.save(payload, tmp_path / "v1.pt")
    fs = FeatureSet.load(tmp_path / "v1.pt")
    assert fs.items == ["a.jpg", "b.jpg"] and fs.modality == "image" and fs.camids.tolist() == [0, 1]


def test_bad_feature_sets_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pids has 2 rows, features has 3"):
        FeatureSet(torch.randn(3, 2), torch.tensor([0, 1]), None, torch.zeros(3, dtype=torch.bool), ["a"] * 3)
    with pytest.raises(ValueError, match="items has 2 entries"):
        FeatureSet(torch.randn(3, 2), torch.zeros(3), None, torch.zeros(3, dtype=torch.bool), ["a"] * 2)
    with pytest.raises(ValueError, match="modality"):
        FeatureSet(torch.randn(1, 2), torch.zeros(1), None, torch.zeros(1, dtype=torch.bool), ["a"], {}, "audio")
    torch.save({"format": "something/else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a reid_lab feature file"):
        FeatureSet.load(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureSet.load(tmp_path / "missing.pt")


def test_caption_queries_against_an_image_gallery_keep_both_modalities(tmp_path):
    """A text-to-person evaluation split: caption query rows, image gallery rows, in one file."""
    items = ["a man in a red coat", "a woman with a blue bag", "/g/0001_c1.jpg", "/g/0002_c2.jpg"]
    fs = FeatureSet(torch.randn(4, 8), torch.tensor([1, 2, 1, 2]), None,
                    torch.tensor([True, True, False, False]), items, {"space_id": "s"}, "image", "text")
    back = FeatureSet.load(fs.save(tmp_path / "t2i.pt"))
    assert back.modalities == ("text", "image") and torch.equal(back.features, fs.features)
    query, gallery = back.split()
    assert query.modalities == ("text", "text") and query.items == items[:2]
    assert gallery.modalities == ("image", "image") and gallery.paths == items[2:]
    with pytest.raises(ValueError, match="text->image feature set holds text items"):
        _ = back.paths
    with pytest.raises(ValueError, match="query_modality"):
        FeatureSet(torch.randn(1, 2), torch.tensor([0]), None, torch.tensor([True]), ["x"], {}, "image", "audio")
    # same query and gallery modality: stored as a plain image set
    assert FeatureSet(torch.randn(1, 2), torch.tensor([0]), None, torch.tensor([True]), ["x"], {}, "image",
                      "image").query_modality is None
