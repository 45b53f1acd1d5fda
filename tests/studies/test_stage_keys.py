"""Stage keys follow the held-out validation images: a stage trained (and its checkpoint chosen) on one set
of validation identities is never reused for another.

The validation file keeps its path (``split/val.json``) when ``study.validation`` changes its fraction or
seed; only its content changes, so the key must read the content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from reid_lab.data.records import DatasetFormatError
from reid_lab.studies.stage_keys import file_digest, stage_key
from reid_lab.studies.study import Study, StudyConfig

REPO = Path(__file__).resolve().parents[2]


def _val_payload(paths: list[str]) -> str:
    return json.dumps({"paths": paths, "num_ids": 1, "num_images": len(paths), "fraction": 0.15, "seed": 0})


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(_val_payload(["a.jpg"]))
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_the_stage_key_changes_with_the_validation_files_content_only(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(_val_payload(["a.jpg", "b.jpg"]))
    parts = {"stage": "train", "config": {"model": {"lr": 1e-3}}, "train_subset": "0123"}
    first = stage_key(**parts, val_subset=file_digest(path))
    path.write_text(_val_payload(["a.jpg", "c.jpg"]))  # same path, other held-out images
    assert stage_key(**parts, val_subset=file_digest(path)) != first
    assert stage_key(**parts, val_subset=None) != first  # validation: none chooses on the test split
    path.write_text(_val_payload(["a.jpg", "b.jpg"]))
    assert stage_key(**parts, val_subset=file_digest(path)) == first


def test_a_trained_stage_is_reused_only_with_the_same_validation_images(tmp_path, capsys):
    # The dataset root does not exist: a reused stage never reads it, a stage that trains again fails at once.
    missing = tmp_path / "no_dataset"
    stage = {"configs": [str(REPO / "configs/model/bot_r18.yaml")],
             "overrides": {"data.init_args.root": str(missing), "data.init_args.num_workers": 0,
                           "trainer.accelerator": "cpu"}}
    study = Study(StudyConfig.load({"study": {
        "name": "keys", "out": str(tmp_path / "out"), "configs": [str(REPO / "configs/data/synthetic.yaml")],
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0}, "logger": "none",
        "old": stage, "new": stage, "methods": {"independent": {}},
    }}))
    train_subset = tmp_path / "old_train.json"
    train_subset.write_text(json.dumps({"paths": ["a.jpg"]}))
    study.val_file.parent.mkdir(parents=True)
    study.val_file.write_text(_val_payload(["v1.jpg", "v2.jpg"]))

    with pytest.raises(DatasetFormatError, match="no_dataset"):  # trained (tried to): no stage to reuse yet
        study.train("old", stage, str(train_subset), {})
    stage_dir = tmp_path / "out" / "train" / "old"
    key = (stage_dir / "key").read_text().strip()  # written before the fit starts
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"weights")
    (stage_dir / "done.json").write_text(json.dumps({"checkpoint": str(checkpoint), "key": key}))
    capsys.readouterr()

    assert study.train("old", stage, str(train_subset), {}) == str(checkpoint)  # same inputs: reused
    assert "done earlier" in capsys.readouterr().out

    study.val_file.write_text(_val_payload(["v1.jpg", "v3.jpg"]))  # other held-out identities, same path
    with pytest.raises(DatasetFormatError, match="no_dataset"):  # it trains again: the missing data stops it
        study.train("old", stage, str(train_subset), {})
    assert "training again" in capsys.readouterr().out
    assert (stage_dir / "key").read_text().strip() != key
