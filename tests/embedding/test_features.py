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


def test_items_are_stored_as_one_utf8_buffer_and_round_trip(tmp_path):
    # non-ASCII, commas, newlines, empty strings: byte offsets must not be mistaken for character offsets
    items = ["Ein Mann mit grüner Jacke, läuft", "", "一个穿红衣服的人\nsecond line", "plain.jpg", "ü"]
    fs = FeatureSet(torch.randn(5, 4), torch.arange(5), None, torch.tensor([True, False, False, False, False]),
                    items, {}, "text")
    path = fs.save(tmp_path / "u.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "reid_lab.features/3" and "items" not in payload
    assert payload["items_utf8"].dtype == torch.uint8 and payload["items_offsets"].tolist()[-1] == len(
        "".join(items).encode("utf-8"))
    assert FeatureSet.load(path).items == items
    # version-2 files (a pickled list of items) still load
    payload = {"format": "reid_lab.features/2", "features": torch.randn(2, 3), "pids": torch.tensor([0, 1]),
               "camids": None, "is_query": torch.tensor([True, False]), "modality": "text", "query_modality": None,
               "items": ["a caption", "another one"], "space": {}}
    torch.save(payload, tmp_path / "v2.pt")
    assert FeatureSet.load(tmp_path / "v2.pt").items == ["a caption", "another one"]


def test_corrupt_item_offsets_are_refused_with_the_file_named(tmp_path):
    path = _image_set().save(tmp_path / "f.pt")
    payload = torch.load(path, weights_only=True)
    payload["items_offsets"] = payload["items_offsets"].flip(0)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: items_offsets must rise from 0"):
        FeatureSet.load(tmp_path / "bad.pt")
