"""Text-to-person parsers on fabricated files in each exact layout, the synthetic captions, and bad inputs."""

from __future__ import annotations

import json
import os

import pytest

from reid_lab.data.datasets import load_dataset
from reid_lab.data.records import DatasetFormatError
from reid_lab.data.text import (
    load_cuhkpedes,
    load_icfgpedes,
    load_rstpreid,
    load_synthetic_captions,
    load_text_dataset,
)
from tests.data.text_fixtures import make_cuhkpedes, make_icfgpedes, make_rstpreid


def _raw(root, name):
    return json.loads((root / name).read_text())


def test_cuhkpedes_layout(tmp_path):
    root = make_cuhkpedes(tmp_path)
    entries = _raw(root, "reid_raw.json")
    for where in (tmp_path, root):  # the parent (conventional folder name) or the dataset folder itself
        splits = load_cuhkpedes(where)
        assert [len(splits.train), len(splits.val), len(splits.test)] == [7, 2, 4]
    raw_train_ids = sorted({e["id"] for e in entries if e["split"] == "train"})  # 5, 9, 12
    for record, entry in zip(splits.train, [e for e in entries if e["split"] == "train"]):
        assert record.path == os.path.join(str(root.resolve()), "imgs", entry["file_path"])
        assert os.path.isabs(record.path) and os.path.isfile(record.path)
        assert record.pid == raw_train_ids.index(entry["id"])
        assert record.captions == tuple(entry["captions"]) and record.camid is None
    assert {r.pid for r in splits.val} == {20} and {r.pid for r in splits.test} == {30, 31}  # raw ids kept
    assert splits.num_train_pids == 3 and not splits.has_cameras
    assert load_text_dataset("CUHKPEDES", tmp_path).test == splits.test


def test_icfgpedes_layout_reads_msmt_cameras(tmp_path):
    root = make_icfgpedes(tmp_path)
    splits = load_icfgpedes(tmp_path)
    assert splits.val == [] and len(splits.train) == 4 and len(splits.test) == 2
    assert [r.camid for r in splits.train] == [0, 4, 1, 1] and [r.camid for r in splits.test] == [6, 14]
    assert [r.pid for r in splits.train] == [0, 0, 1, 1] and {r.pid for r in splits.test} == {3102}
    assert splits.test[0].path == str(root.resolve() / "imgs/test/3102/3102_000_07_0303morning_0000_0.jpg")
    assert splits.test[0].captions == ("icfg person 3102 shot 0.",)


def test_rstpreid_layout_img_path_and_cameras(tmp_path):
    root = make_rstpreid(tmp_path)
    splits = load_rstpreid(root)
    assert [r.camid for r in splits.train] == [13, 2, 0, 0]
    assert [r.pid for r in splits.train] == [0, 0, 1, 1]
    assert {r.pid for r in splits.val} == {3701} and {r.pid for r in splits.test} == {3901}
    assert splits.test[1].path == str(root.resolve() / "imgs/3901_c11_0001.jpg")
    assert all(len(r.captions) == 2 for r in splits.train + splits.val + splits.test)


def test_rstpreid_without_camera_in_a_name_leaves_every_camid_unknown(tmp_path):
    root = make_rstpreid(tmp_path)
    entries = _raw(root, "data_captions.json")
    (root / "imgs" / entries[0]["img_path"]).rename(root / "imgs" / "renamed.jpg")
    entries[0]["img_path"] = "renamed.jpg"
    (root / "data_captions.json").write_text(json.dumps(entries))
    splits = load_rstpreid(root)
    assert not splits.has_cameras and {r.camid for r in splits.train + splits.test} == {None}


def test_synthetic_captions_match_the_market_parser(tiny_synthetic):
    """The captions file covers exactly the person images the Market parser finds, with the same ids."""
    splits = load_synthetic_captions(tiny_synthetic)
    market = load_dataset("synthetic", tiny_synthetic)
    assert splits.val == []
    assert {(r.path, r.pid, r.camid) for r in splits.train} == {(r.path, r.pid, r.camid) for r in market.train}
    persons = [r for r in market.query + market.gallery if r.pid > 0]  # distractors have no captions
    assert {(r.path, r.pid, r.camid) for r in splits.test} == {(r.path, r.pid, r.camid) for r in persons}
    entries = _raw(tiny_synthetic, "reid_raw.json")
    assert sum(len(r.captions) for r in splits.train + splits.test) == sum(len(e["captions"]) for e in entries)
    assert all(len(r.captions) == 2 and all(c.strip() for c in r.captions) for r in splits.train)


# ----------------------------------------------------------------------------------------------- errors
def _corrupt(root, change):
    path = root / "reid_raw.json"
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e[1].pop("captions"), r"entry 1 \(file_path='CUHK01/0005001.png'\): missing key\(s\) 'captions'"),
        (lambda e: e[2].update(split="dev"), r"entry 2 .*unknown split 'dev'; cuhkpedes splits are train, val, test"),
        (lambda e: e[0]["captions"].__setitem__(1, "   "), r"entry 0 .*caption 1 is empty"),
        (lambda e: e[0].update(captions=[]), r"entry 0 .*'captions' must be a non-empty list"),
        (lambda e: e[0].update(captions="one string"), r"entry 0 .*'captions' must be a non-empty list"),
        (lambda e: e[3].update(id="seven"), r"entry 3 .*'id' must be an integer"),
        (lambda e: e[4].update(file_path="CUHK01/nope.png"), r"1 annotated image\(s\) do not exist.*entry 4: .*nope\.png"),
        (lambda e: e.__setitem__(0, ["not", "an", "object"]), r"entry 0 is a JSON list; expected an object"),
    ],
    ids=["missing-key", "unknown-split", "blank-caption", "no-captions", "captions-not-list", "bad-id",
         "missing-image", "entry-not-object"],
)
def test_malformed_entries_are_named(tmp_path, change, message):
    root = make_cuhkpedes(tmp_path)
    path = _corrupt(root, change)
    with pytest.raises(DatasetFormatError, match="(?s)" + message) as err:
        load_cuhkpedes(root)
    assert str(path) in str(err.value)


def test_bad_files_and_folders(tmp_path):
    root = make_cuhkpedes(tmp_path)
    (root / "reid_raw.json").write_text('{"split": "train"}')
    with pytest.raises(DatasetFormatError, match="holds a JSON dict; expected a list"):
        load_cuhkpedes(root)
    (root / "reid_raw.json").write_text("[{")
    with pytest.raises(DatasetFormatError, match="reid_raw.json is not valid JSON"):
        load_cuhkpedes(root)
    with pytest.raises(DatasetFormatError, match=r"(?s)rstpreid: dataset folder not found.*data_captions\.json"):
        load_rstpreid(tmp_path)
    with pytest.raises(ValueError, match="unknown text-to-person dataset 'flickr'"):
        load_text_dataset("flickr", tmp_path)
    # no training entries at all
    make_icfgpedes(tmp_path)
    path = tmp_path / "ICFG-PEDES" / "ICFG-PEDES.json"
    path.write_text(json.dumps([e for e in json.loads(path.read_text()) if e["split"] == "test"]))
    with pytest.raises(DatasetFormatError, match="the train split is empty"):
        load_icfgpedes(tmp_path)


def test_missing_images_can_be_left_unchecked(tmp_path):
    root = make_rstpreid(tmp_path)
    os.remove(root / "imgs" / "0000_c14_0000.jpg")
    with pytest.raises(DatasetFormatError, match="0000_c14_0000.jpg"):
        load_rstpreid(root)
    assert len(load_rstpreid(root, check_files=False).train) == 4
