"""Fault-injection tier: `reid-lab upgrade` killed (SIGKILL) in the middle of a stage's training resumes that stage
from its last.ckpt, reuses the finished ones, and ends with exactly the weights of an uninterrupted study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _config(root: Path, out: Path) -> Path:
    tiny = {"data.init_args.root": str(root), "data.init_args.image_size": [64, 32], "data.init_args.batch_size": 8,
            "data.init_args.eval_batch_size": 64, "data.init_args.num_workers": 0, "trainer.max_epochs": 4,
            "trainer.check_val_every_n_epoch": 4, "trainer.limit_train_batches": 3, "trainer.accelerator": "cpu"}
    study = {"study": {
        "name": "killed", "out": str(out),
        # no wandb: a SIGKILLed run's wandb service can outlive it and hold the run id the resumed stage
        # continues ("run ID ... is in use"); this test is about the training state
        "logger": "none",
        "configs": [str(REPO / "configs/data/synthetic.yaml"), str(REPO / "configs/trainer/cpu_demo.yaml")],
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0},
        "old": {"configs": [str(REPO / "configs/model/bot_r18.yaml")], "overrides": tiny},
        "new": {"configs": [str(REPO / "configs/model/bot_r18.yaml")], "overrides": tiny},
        "methods": {"bct": {"compatible_losses": [{"name": "bct"}]}},
        "evaluation": {"orderings": ["random"], "ratios": [0, 0.5, 1.0]},
    }}
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _upgrade(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "-m", "reid_lab.cli", "upgrade", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _weights(stage: Path) -> dict[str, torch.Tensor]:
    return torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_a_study_killed_mid_training_resumes_to_the_uninterrupted_result(tiny_synthetic, tmp_path):
    straight = _upgrade(_config(tiny_synthetic, tmp_path / "straight"))
    output, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, output[-3000:]

    out = tmp_path / "killed"
    config = _config(tiny_synthetic, out)
    run = _upgrade(config)
    last = out / "train" / "bct" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 900
    while not last.is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # right after the new model's first epoch checkpoint
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert (out / "train" / "old" / "done.json").is_file() and not (out / "train" / "bct" / "done.json").exists()
    epoch_at_kill = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert epoch_at_kill < 3  # killed before the last epoch: there is something left to resume

    old_done = (out / "train" / "old" / "done.json").stat().st_mtime
    rerun = _upgrade(config)
    output, _ = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, output[-3000:]
    assert "[train old] done earlier" in output and f"[train bct] resuming from {last}" in output
    assert (out / "train" / "old" / "done.json").stat().st_mtime == old_done
    for version in ("old", "bct"):
        a, b = _weights(tmp_path / "straight" / "train" / version), _weights(out / "train" / version)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{version}: {name} differs: {(a[name] - b[name]).abs().max()}"
    assert (out / "report.json").is_file()
