"""Fault-injection tier: a fit killed with SIGKILL mid-epoch resumes to exactly the uninterrupted result, in the
same run folder (its lock, left by the killed process, is taken over)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from reid_lab.run_lock import lock_holder

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.faults]

STEPS_PER_EPOCH = 3


def _config(root: Path, out: Path, kill_at: int | None) -> Path:
    callbacks = [{"class_path": "reid_lab.modules.checkpointing.EmbeddingCheckpoint",
                  "init_args": {"dirpath": str(out / "checkpoints")}}]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.faults.injection.KillAtStep", "init_args": {"step": kill_at}})
    config = {
        "seed_everything": 0,
        "model": {"class_path": "reid_lab.modules.ReIDModule",
                  "init_args": {"backbone": "resnet18", "last_stride": 2, "warmup_epochs": 1}},
        "data": {"class_path": "reid_lab.data.ReIDDataModule",
                 "init_args": {"dataset": "synthetic", "root": str(root), "image_size": [64, 32], "batch_size": 8,
                               "num_instances": 2, "num_workers": 0, "eval_batch_size": 64, "padding": 4}},
        "trainer": {"max_epochs": 3, "limit_train_batches": STEPS_PER_EPOCH, "check_val_every_n_epoch": 2,
                    "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(out), "callbacks": callbacks},
    }
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "reid_lab.cli", "fit", "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_mid_epoch_resumes_exactly(tiny_synthetic, tmp_path):
    straight = _fit(_config(tiny_synthetic, tmp_path / "straight", kill_at=None))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    kill_step = STEPS_PER_EPOCH * 2 + 1  # the second batch of epoch 2, which is not a validation epoch
    killed = _fit(_config(tiny_synthetic, killed_dir, kill_at=kill_step))
    assert killed.returncode == -signal.SIGKILL
    last = killed_dir / "checkpoints" / "last.ckpt"
    # last.ckpt follows every epoch even though validation runs only every second one
    assert torch.load(last, weights_only=True)["global_step"] == STEPS_PER_EPOCH * 2
    # the killed run still "holds" its checkpoint folder on disk (its pid in the lock file), but not in the kernel
    assert lock_holder(last.parent) not in (None, os.getpid())

    resumed = _fit(_config(tiny_synthetic, killed_dir, kill_at=None), "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = _weights(last)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume: {(a[name] - b[name]).abs().max()}"
    assert not list((killed_dir / "checkpoints").glob("last-v*.ckpt"))  # the old last.ckpt was replaced
    assert lock_holder(last.parent) is None  # the resumed run took the stale lock over and released it


def test_killed_csv_run_resumes_in_its_version_folder(tiny_synthetic, tmp_path):
    """CSVLogger: the resumed fit continues ``version_0`` (checkpoints and ``metrics.csv``), and the killed
    run's rows after its last checkpoint are dropped, so every step is logged once."""
    config = _config(tiny_synthetic, tmp_path, kill_at=STEPS_PER_EPOCH * 2 + 1)
    cfg = yaml.safe_load(config.read_text())
    runs = tmp_path / "runs"
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(runs), "name": "csv",
                                              "flush_logs_every_n_steps": 1}}
    cfg["trainer"]["log_every_n_steps"] = 1
    cfg["trainer"]["callbacks"][0]["init_args"] = {}  # checkpoints in the logger's run folder
    config.write_text(yaml.safe_dump(cfg))
    assert _fit(config).returncode == -signal.SIGKILL
    folder = runs / "csv" / "version_0"
    last = folder / "checkpoints" / "last.ckpt"
    killed_rows = _rows(folder / "metrics.csv")
    # the checkpoint holds steps 0..5 (the logged step is the 0-based batch); step 6 ran after it
    assert max(int(r["step"]) for r in killed_rows) >= STEPS_PER_EPOCH * 2

    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][:1]  # no kill this time
    config.write_text(yaml.safe_dump(cfg))
    resumed = _fit(config, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming logger run version_0" in resumed.stdout
    assert sorted(p.name for p in (runs / "csv").iterdir()) == ["version_0"]
    rows = _rows(folder / "metrics.csv")
    train = [(r["step"], r["epoch"]) for r in rows if r.get("train/loss")]
    assert len(train) == len(set(train)) == STEPS_PER_EPOCH * 3  # every step once, none lost, none twice
    assert torch.load(last, weights_only=True)["global_step"] == STEPS_PER_EPOCH * 3


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
