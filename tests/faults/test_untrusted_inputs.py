"""Data files never run code and never reach outside their roots (issue 23).

Each case is a hostile file in a real layout: a weights file whose pickle would run a callable; annotation,
list, CSV and pairs files naming ``../`` or absolute paths to a real file outside the dataset. The outside
file exists, so only the confinement (not a missing-file check) can stop it.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch
from torch import nn

from reid_lab.data.datasets.folder import load_folder
from reid_lab.data.datasets.msmt17 import load_msmt17
from reid_lab.data.pairs import PairFormatError, load_pairs
from reid_lab.data.records import DatasetFormatError
from reid_lab.data.text.parsers import load_text_dataset
from reid_lab.models.backbones import load_weights
from tests.data.test_datasets import make_identity_tree, make_msmt_tree
from tests.data.text_fixtures import make_cuhkpedes, make_icfgpedes, make_rstpreid, write_image

REPO = pathlib.Path(__file__).resolve().parents[2]


class TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for ``os.system`` that leaves evidence."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class Extra:
    """A harmless pickled object, as trainers save next to the weights (an optimizer config, a namespace)."""

    def __init__(self, note: str) -> None:
        self.note = note


# ------------------------------------------------------------------------------------- weights files


def test_a_weights_file_that_pickles_a_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    net = nn.Linear(3, 2)
    torch.save({"state_dict": net.state_dict(), "payload": TouchOnUnpickle(marker)}, evil)
    with pytest.raises(ValueError) as error:
        load_weights(nn.Linear(3, 2), evil)
    assert not marker.exists()  # the callable never ran
    message = str(error.value)
    assert str(evil) in message and "weights_only=False" in message and "plain.pt" in message


def test_the_suggested_conversion_turns_a_trusted_file_into_one_that_loads(tmp_path):
    trusted = tmp_path / "trusted.ckpt"
    source = nn.Linear(3, 2)
    torch.save({"state_dict": source.state_dict(), "extra": Extra("lr 0.1")}, trusted)
    with pytest.raises(ValueError) as error:
        load_weights(nn.Linear(3, 2), trusted)
    command = re.search(r'python -c "(.+?)"', str(error.value)).group(1)
    # Run the advice as a user would, from the folder where plain.pt should appear (Extra must import).
    subprocess.run([sys.executable, "-c", command], cwd=tmp_path, check=True, env={"PYTHONPATH": str(REPO)})
    target = nn.Linear(3, 2)
    missing, unexpected = load_weights(target, tmp_path / "plain.pt")
    assert missing == [] and unexpected == []
    torch.testing.assert_close(target.weight, source.weight)
    assert shlex.split(f'python -c "{command}"')[2] == command  # one shell line, quoting intact


def test_a_truncated_weights_file_names_the_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_weights(nn.Linear(3, 2), path)


# ------------------------------------------------------------------------ annotation files: confinement


CAPTION_FORMATS = [  # (dataset, fixture, annotation file, image key)
    ("cuhkpedes", make_cuhkpedes, "reid_raw.json", "file_path"),
    ("icfgpedes", make_icfgpedes, "ICFG-PEDES.json", "file_path"),
    ("rstpreid", make_rstpreid, "data_captions.json", "img_path"),
]


@pytest.fixture
def outside(tmp_path) -> pathlib.Path:
    """A real file next to (not inside) every dataset root of a test."""
    path = tmp_path / "secret.jpg"
    write_image(path)
    return path


@pytest.mark.parametrize("check_files", [True, False])
@pytest.mark.parametrize("escape", ["climb", "absolute"])
@pytest.mark.parametrize(("name", "make", "annotations", "key"), CAPTION_FORMATS)
def test_caption_annotations_cannot_name_a_file_outside_the_image_folder(
    tmp_path, outside, name, make, annotations, key, escape, check_files
):
    root = make(tmp_path)
    entries = json.loads((root / annotations).read_text())
    bad = "../../secret.jpg" if escape == "climb" else str(outside)
    entries[1][key] = bad
    (root / annotations).write_text(json.dumps(entries))
    with pytest.raises(DatasetFormatError) as error:
        load_text_dataset(name, tmp_path, check_files=check_files)
    message = str(error.value)
    assert str(root / annotations) in message and "entry 1" in message and repr(bad) in message


def test_msmt17_lists_cannot_name_a_file_outside_the_image_folder(tmp_path):
    make_msmt_tree(tmp_path / "MSMT17_V1", "V1")
    outside = tmp_path / "secret" / "0000_000_01_0303morning_0015_0.jpg"  # exists, and parses as MSMT17
    write_image(outside)
    lines = ["0000/0000_000_03_0113morning_0001_0.jpg 0", "../../secret/0000_000_01_0303morning_0015_0.jpg 0"]
    (tmp_path / "MSMT17_V1" / "list_query.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError) as error:
        load_msmt17(tmp_path)
    message = str(error.value)
    assert "list_query.txt, line 2" in message and "../../secret/" in message
    assert "outside the root" in message


def test_a_cameras_csv_cannot_name_a_file_outside_the_root(tmp_path, outside):
    make_identity_tree(tmp_path / "data", {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg", "2.jpg"]})
    rows = ["path,camid", "a/1.jpg,1", "a/2.jpg,1", "b/1.jpg,2", "b/2.jpg,2", f"{outside},3"]
    (tmp_path / "cams.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetFormatError) as error:
        load_folder(tmp_path / "data", cameras_csv=str(tmp_path / "cams.csv"))
    message = str(error.value)
    assert "cams.csv, line 6" in message and str(outside) in message and "absolute" in message


@pytest.mark.parametrize("image", ["../secret.jpg", "SECRET_ABSOLUTE"])
def test_a_pairs_file_cannot_name_an_image_outside_its_root(tmp_path, outside, image):
    root = tmp_path / "pairs"
    write_image(root / "ok.jpg")
    image = str(outside) if image == "SECRET_ABSOLUTE" else image
    lines = [{"query": {"text": "a"}, "target": {"image": "ok.jpg"}},
             {"query": {"text": "b"}, "target": {"image": "ok.jpg"}, "negatives": [{"image": image}]}]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(PairFormatError) as error:
        load_pairs(path)
    message = str(error.value)
    assert f"{path}:2: negatives[0].image" in message and repr(image) in message


def test_paths_that_stay_inside_the_root_still_load(tmp_path):
    """``a/../b.jpg`` is inside the root: only escapes are refused, and the path is normalised."""
    root = make_cuhkpedes(tmp_path)
    entries = json.loads((root / "reid_raw.json").read_text())
    entries[0]["file_path"] = "CUHK01/../" + entries[0]["file_path"]
    (root / "reid_raw.json").write_text(json.dumps(entries))
    plain = root / "imgs" / entries[0]["file_path"].removeprefix("CUHK01/../")
    write_image(plain)
    splits = load_text_dataset("cuhkpedes", tmp_path)
    assert splits.train[0].path == str(plain.resolve())


# ------------------------------------------------------------------------ annotation files: duplicates


def _rewrite(root: pathlib.Path, change) -> None:
    entries = json.loads((root / "reid_raw.json").read_text())
    (root / "reid_raw.json").write_text(json.dumps(change(entries)))


def test_a_test_image_listed_under_train_is_an_error_naming_both_entries(tmp_path):
    root = make_cuhkpedes(tmp_path)
    entries = json.loads((root / "reid_raw.json").read_text())
    test_index = next(i for i, e in enumerate(entries) if e["split"] == "test")
    leaked = {**entries[test_index], "split": "train"}
    _rewrite(root, lambda e: [*e, leaked])
    with pytest.raises(DatasetFormatError) as error:
        load_text_dataset("cuhkpedes", tmp_path)
    message = str(error.value)
    assert f"entry {test_index} " in message and f"entry {len(entries)} " in message
    assert "'test'" in message and "'train'" in message and entries[test_index]["file_path"] in message


def test_one_image_under_two_identities_is_an_error_naming_both_entries(tmp_path):
    root = make_cuhkpedes(tmp_path)
    entries = json.loads((root / "reid_raw.json").read_text())
    relabelled = {**entries[0], "id": 9, "captions": ["another caption."]}  # entry 0 is id 5, train
    _rewrite(root, lambda e: [*e, relabelled])
    with pytest.raises(DatasetFormatError) as error:
        load_text_dataset("cuhkpedes", tmp_path)
    message = str(error.value)
    assert "entry 0 " in message and f"entry {len(entries)} " in message
    assert "id 5" in message and "id 9" in message


def test_repeated_entries_are_dropped_with_a_counted_warning(tmp_path, caplog):
    root = make_cuhkpedes(tmp_path)
    clean = load_text_dataset("cuhkpedes", tmp_path)
    entries = json.loads((root / "reid_raw.json").read_text())
    test_entry = next(e for e in entries if e["split"] == "test")
    more = {**entries[0], "captions": [*entries[0]["captions"], "a third caption."]}
    _rewrite(root, lambda e: [*e, dict(entries[0]), dict(test_entry), dict(test_entry), more])
    with caplog.at_level("WARNING"):
        splits = load_text_dataset("cuhkpedes", tmp_path)
    assert [len(splits.train), len(splits.test)] == [len(clean.train), len(clean.test)]
    assert splits.train[0].captions == (*entries[0]["captions"], "a third caption.")
    assert [r.path for r in splits.test] == [r.path for r in clean.test]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "removed 4 duplicate entries" in warning and "1 of them added new captions" in warning
