"""`reid-lab fit --ckpt_path last.ckpt` continues the same logger run, checkpoint folder and top-k state."""

from __future__ import annotations

from pathlib import Path

import pytest

from reid_lab.lightning_cli import run_lightning_cli
from tests.cli.test_cli_fit_test import _tiny_overrides

pytestmark = pytest.mark.slow


def test_resume_continues_the_run_folder(tiny_synthetic, tmp_path, cli_argv, capsys):
    args = [a for a in _tiny_overrides(tiny_synthetic, tmp_path) if not a.startswith("--trainer.max_epochs")]
    first = run_lightning_cli(["fit", *args, "--trainer.max_epochs=1"])
    run_id, folder = first.trainer.logger.version, Path(first.trainer.checkpoint_callback.dirpath)
    best_score = float(first.trainer.checkpoint_callback.best_model_score)
    first.trainer.logger.experiment.finish()
    last = folder / "last.ckpt"
    assert last.is_file()

    second = run_lightning_cli(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path", str(last)])
    second.trainer.logger.experiment.finish()
    assert "resuming logger run" in capsys.readouterr().out
    assert second.trainer.logger.version == run_id
    assert Path(second.trainer.checkpoint_callback.dirpath) == folder
    assert second.trainer.current_epoch == 2
    # top-k state came back with the folder: the best score can only have improved, never been reset
    assert float(second.trainer.checkpoint_callback.best_model_score) >= best_score
    assert not list(folder.glob("last-v*.ckpt"))


def test_test_logs_into_the_checkpoint_run_without_a_dirpath_warning(tiny_synthetic, tmp_path, cli_argv, capsys):
    """`reid-lab test --ckpt_path` logs into the checkpoint's own run id (not a new run), so the checkpoint
    callback keeps its folder and Lightning has no "dirpath has changed" to warn about."""
    import warnings

    args = [a for a in _tiny_overrides(tiny_synthetic, tmp_path) if not a.startswith("--trainer.max_epochs")]
    fit = run_lightning_cli(["fit", *args, "--trainer.max_epochs=1"])
    run_id, folder = fit.trainer.logger.version, Path(fit.trainer.checkpoint_callback.dirpath)
    fit.trainer.logger.experiment.finish()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = run_lightning_cli(["test", *args, "--ckpt_path", str(folder / "last.ckpt")])
        test.trainer.logger.experiment.finish()
    assert "logging into logger run" in capsys.readouterr().out
    assert test.trainer.logger.version == run_id
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
