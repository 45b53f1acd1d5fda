"""experiments/learning_curves.py reads val R1 / mAP per epoch back from a CSVLogger's metrics.csv."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "learning_curves.py"


@pytest.fixture(scope="module")
def learning_curves():
    spec = importlib.util.spec_from_file_location("learning_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_reader_keeps_validation_rows_of_a_hand_written_legacy_csv(learning_curves, tmp_path):
    # As the CSVLogger wrote it before keys named their protocol: train rows with empty val cells in between,
    # Lightning's 0-based epochs.
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/R1,val/R10,val/R5,val/mAP,val/mINP\n"
        "0,9,7.5,,,,,\n"
        "0,77,,20.5,60.0,45.0,10.25,2.0\n"
        "1,87,6.1,,,,,\n"
        "1,155,,41.0,80.0,70.0,25.5,6.5\n"
    )
    assert learning_curves.read_val_metrics(path) == {
        0: {"R1": 20.5, "mAP": 10.25, "mINP": 2.0},
        1: {"R1": 41.0, "mAP": 25.5, "mINP": 6.5},
    }


def test_reader_reads_what_lightnings_csv_logger_writes(learning_curves, tmp_path):
    logger = CSVLogger(tmp_path, name="", version="fit")
    logger.log_metrics({"train/loss": 7.0, "epoch": 0}, step=9)
    logger.log_metrics({"val/i2i/R1": 30.0, "val/i2i/mAP": 12.5, "val/i2i/mINP": 3.0, "epoch": 0}, step=77)
    logger.log_metrics({"train/loss": 5.0, "epoch": 1}, step=87)
    logger.log_metrics({"val/i2i/R1": 50.0, "val/i2i/mAP": 33.0, "val/i2i/mINP": 9.0, "epoch": 1}, step=155)
    logger.save()
    assert learning_curves.read_val_metrics(Path(logger.log_dir) / "metrics.csv") == {
        0: {"R1": 30.0, "mAP": 12.5, "mINP": 3.0},
        1: {"R1": 50.0, "mAP": 33.0, "mINP": 9.0},
    }


def test_epoch_clock_splits_validation_from_the_train_loop(learning_curves):
    clock = learning_curves.EpochClock()
    clock.epoch_seconds, clock.validate_seconds = [10.0, 12.0], [3.0, 4.0]
    assert clock.summary() == {"epoch": 11.0, "validate": 3.5, "train": 7.5}
