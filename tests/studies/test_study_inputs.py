"""What a study refuses before anything trains: names that would leave study.out, a second writer of the same
study folder, and validation / test splits that cannot be ranked; and the claim rule it builds from its data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reid_lab.cli import main
from reid_lab.embedding.features import FeatureSet
from reid_lab.run_lock import hold_folder_lock
from reid_lab.studies.claims import chance_level
from reid_lab.studies.study import Study, StudyConfig
from tests.studies.test_study import _study

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["../../../escaped_method", "a/b", "bct.v2", "x\"><script>", "", ".hidden"])
def test_method_names_that_are_not_plain_folder_names_are_refused(tiny_synthetic, tmp_path, capsys, name):
    cfg = _study(tiny_synthetic, tmp_path / "out")
    cfg["study"]["methods"] = {name: {"compatible_losses": [{"name": "bct"}]}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["upgrade", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "study.methods: name" in err and repr(name) in err and "letters, digits" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert not list(tmp_path.glob("escaped*")) and not (tmp_path.parent / "escaped_method").exists()


def test_a_study_name_with_a_path_separator_is_refused(tiny_synthetic, tmp_path):
    cfg = _study(tiny_synthetic, tmp_path / "out")
    cfg["study"]["name"] = "../up"
    with pytest.raises(ValueError, match=r"study.name: name '../up' is not allowed"):
        StudyConfig.load(cfg)


def test_every_study_path_resolves_inside_study_out(tiny_synthetic, tmp_path):
    study = Study(StudyConfig.load(_study(tiny_synthetic, tmp_path / "out")))
    assert study.inside("train", "bct") == tmp_path / "out" / "train" / "bct"
    with pytest.raises(ValueError, match="outside study.out"):
        study.inside("train", "../../elsewhere")


def test_a_second_writer_of_a_study_folder_is_refused_and_a_killed_one_leaves_no_lock(tiny_synthetic, tmp_path,
                                                                                    capsys):
    out = tmp_path / "out"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_study(tiny_synthetic, out)))
    holder = subprocess.Popen(  # another `reid-lab upgrade` holding the study folder
        [sys.executable, "-c", "import sys, time; from reid_lab.run_lock import hold_folder_lock\n"
         f"with hold_folder_lock({str(out)!r}, 'study'):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["upgrade", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"study folder {out} is in use by process {holder.pid}" in err
        assert not (out / "split").exists()  # nothing written by the refused run
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a killed run: its lock file stays, its lock does not
        holder.wait()
    assert (out / ".reid_lab.lock").is_file()
    with hold_folder_lock(out, "study"):
        pass


def test_a_study_whose_validation_split_has_no_gallery_stops_before_training(tiny_synthetic, tmp_path):
    """Cameras from a file-name regex that gives every image its own camera: each held-out identity then has
    one image per camera, so the ReID construction makes every image a query and leaves no gallery."""
    from tests.studies.test_study import _folder_from_synthetic

    root = tmp_path / "folder"
    _folder_from_synthetic(tiny_synthetic, root)
    for i, path in enumerate(sorted(root.rglob("*.jpg"))):  # camera label = a running number: unique
        path.rename(path.with_name(f"{path.stem.split('_c')[0]}_c{i}s1.jpg"))
    options = {"camera_regex": "_c(?P<cam>\\d+)s", "train_fraction": 0.5, "num_query_per_id": 1, "seed": 0}
    cfg = _study(root, tmp_path / "out")
    for stage in ("old", "new"):
        cfg["study"][stage]["overrides"].update({"data.init_args.dataset": "folder",
                                                 "data.init_args.dataset_options": options})
    cfg["study"]["logger"] = "none"
    study = Study(StudyConfig.load(cfg))
    with pytest.raises(ValueError, match=r"study.old: .*validation .* has \d+ query and 0 gallery items"):
        study.run()
    assert not (tmp_path / "out" / "train").exists()


def test_the_claim_rule_uses_the_margin_and_the_chance_level_of_the_evaluated_split(tiny_synthetic, tmp_path):
    cfg = _study(tiny_synthetic, tmp_path / "out")
    cfg["study"]["evaluation"]["claim_margin"] = 0.5
    study = Study(StudyConfig.load(cfg))
    pids = torch.arange(40) % 8
    camids = torch.arange(40) % 3
    query = FeatureSet(torch.randn(40, 4), pids, camids, torch.ones(40, dtype=torch.bool), [f"q{i}" for i in range(40)])
    gallery = FeatureSet(torch.randn(40, 4), pids, (camids + 1) % 3, torch.zeros(40, dtype=torch.bool),
                         [f"g{i}" for i in range(40)])
    rule = study.claim_rule(query, gallery)
    chance, chance_std = chance_level(pids, pids, camids, (camids + 1) % 3)
    assert (rule.margin, rule.chance, rule.chance_std) == (0.5, chance, chance_std)
    assert rule.chance_margin == max(0.5, 3 * chance_std) > 0
    # a cross-test above old + margin but within the chance margin earns no claim
    assert not rule.decide(chance + 0.9 * rule.chance_margin, reference=0.0).holds
    assert rule.decide(chance + 1.1 * rule.chance_margin + 1, reference=chance).holds
