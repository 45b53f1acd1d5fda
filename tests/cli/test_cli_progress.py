"""Plain progress lines when stdout is not a terminal, and a training loss logged even on a tiny training set."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.modules.progress import PlainProgress

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_a_piped_run_prints_progress_and_logs_the_loss_of_a_short_epoch(tiny_synthetic, tmp_path, cli_argv, capsys):
    args = ["fit", "--config", str(REPO / "configs/experiments/synthetic_bot_r18.yaml"),
            f"--data.init_args.root={tiny_synthetic}", "--data.init_args.image_size=[64,32]",
            "--data.init_args.batch_size=16", "--data.init_args.num_workers=0", "--trainer.max_epochs=2",
            "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=10",
            "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}"]
    cli = run_lightning_cli(args)  # pytest captures stdout: not a TTY
    cli.trainer.logger.experiment.finish()
    assert any(isinstance(c, PlainProgress) for c in cli.trainer.callbacks)
    out = capsys.readouterr().out
    batches = cli.trainer.num_training_batches
    assert batches < 10 and f"log_every_n_steps 10 > {batches} batches per epoch" in out
    lines = [line for line in out.splitlines() if line.startswith("[train] epoch") and "done in" in line]
    assert [line.split("  ")[0] for line in lines] == ["[train] epoch 1/2", "[train] epoch 2/2"]
    assert all(" loss " in line and "items/s" in line for line in lines)
    # without lowering log_every_n_steps, 3 batches per epoch would never reach a logging step
    assert "train/loss" in cli.trainer.logged_metrics
