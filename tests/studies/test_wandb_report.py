"""The study's extras in a real offline wandb run, read back from the run folder wandb wrote: the flipped-queries
table (its JSON file), the stage configs and the artifacts (the run's record log)."""

from __future__ import annotations

import json

import pytest

from reid_lab.studies.wandb_report import FLIP_COLUMNS, log_study_extras
from tests.studies.test_html_report import _study
from tests.wandb_records import is_complete


def test_flipped_queries_table_configs_and_artifacts_land_in_the_offline_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    study = _study(tmp_path)
    checkpoints = study / "train" / "old" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "epoch001-mAP40.00.ckpt").write_bytes(b"weights")
    (checkpoints / "last.ckpt").write_bytes(b"weights and optimiser state")
    rows = json.loads((study / "report.json").read_text())["study"]
    run = wandb.init(project="reid_lab_test", dir=str(tmp_path), mode="offline")
    try:
        counts = log_study_extras(run, study, rows, artifacts=True, name="tiny")
    finally:
        run.finish()
    wandb.teardown()  # wait for wandb's service to finish writing the run's files before reading them
    assert counts == {"flipped_rows": 1, "artifacts": 3}  # features old + bct, the old stage's selected model

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (table_file,) = (run_dir / "files" / "media" / "table" / "upgrade" / "tables").glob("flipped_queries_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == FLIP_COLUMNS
    (row,) = table["data"]
    # the one flip _study builds: identity 1's new query finds identity 2 first; its positives then sit at ranks
    # 3 and 4 of 6 (no junk: the query's camera has no gallery image): AP = (1/3 + 2/4) / 2
    assert row[0] == "bct" and row[1] == 1 and row[4] == 100.0 and row[5] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2, abs=0.01)
    assert row[3] == "Image" and row[6] == "Image"  # pictures (kept in the run's table artifact)

    log_file = next(run_dir.glob("run-*.wandb"))
    assert is_complete(log_file)  # the whole log, up to its exit record (not a 7-byte header)
    log = log_file.read_bytes()
    for expected in (b"tiny-features-old", b"tiny-features-bct", b"tiny-model-old", b"epoch001-mAP40.00.ckpt",
                     b"mobilenet_v2"):  # artifacts, their files, and the stage config in the run config
        assert expected in log, expected
    assert b"last.ckpt" not in log  # only selected checkpoints are artifacts
