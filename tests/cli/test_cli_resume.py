"""`reid-lab fit --ckpt_path last.ckpt` continues the same logger run, checkpoint folder and top-k state.

For every logger the configs offer (wandb, and CSV / TensorBoard by ``class_path``): before, only wandb was
continued (by its run id); CSV and TensorBoard resumed the weights into a new ``version_1`` folder, and
Lightning warned "The dirpath has changed ... best_k_models won't be reloaded".
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

from reid_lab.lightning_cli import run_lightning_cli
from tests.cli.test_cli_fit_test import _tiny_overrides

pytestmark = pytest.mark.slow

try:
    import tensorboard  # noqa: F401
    TENSORBOARD = True
except ImportError:
    try:
        import tensorboardX  # noqa: F401
        TENSORBOARD = True
    except ImportError:
        TENSORBOARD = False


# held-out validation identities, so that a best checkpoint is selected (never on the test split)
HELD_OUT = "--data.init_args.val_fraction=0.34"


def _fit_args(tiny_synthetic, tmp_path) -> list[str]:
    args = [a for a in _tiny_overrides(tiny_synthetic, tmp_path) if not a.startswith("--trainer.max_epochs")]
    return [*args, HELD_OUT]


def _dirpath_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "dirpath has changed" in str(w.message)]


def test_resume_continues_the_run_folder(tiny_synthetic, tmp_path, cli_argv, capsys):
    args = _fit_args(tiny_synthetic, tmp_path)
    first = run_lightning_cli(["fit", *args, "--trainer.max_epochs=1"])
    run_id, folder = first.trainer.logger.version, Path(first.trainer.checkpoint_callback.dirpath)
    best_score = float(first.trainer.checkpoint_callback.best_model_score)
    first.trainer.logger.experiment.finish()
    last = folder / "last.ckpt"
    assert last.is_file()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = run_lightning_cli(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path", str(last)])
    second.trainer.logger.experiment.finish()
    assert not _dirpath_warnings(caught)
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


@pytest.mark.parametrize("logger", ["CSVLogger", "TensorBoardLogger"])
def test_resume_continues_the_version_folder(logger, tiny_synthetic, tmp_path, cli_argv, capsys):
    """CSV / TensorBoard: resume writes into the checkpoint's ``version_0`` (no ``version_1``), reloads the
    top-k state, and the run's ``metrics.csv`` keeps the first epoch's rows; ``test`` logs next to them."""
    if logger == "TensorBoardLogger" and not TENSORBOARD:
        pytest.skip("neither tensorboard nor tensorboardX is installed")
    runs = tmp_path / "runs"
    args = [a for a in _fit_args(tiny_synthetic, tmp_path) if not a.startswith("--trainer.logger")]
    args += [f"--trainer.logger=lightning.pytorch.loggers.{logger}", f"--trainer.logger.save_dir={runs}",
             "--trainer.logger.name=curves"]
    first = run_lightning_cli(["fit", *args, "--trainer.max_epochs=1"])
    folder = runs / "curves" / "version_0"
    assert Path(first.trainer.checkpoint_callback.dirpath) == folder / "checkpoints"
    best = {Path(p).name: float(v) for p, v in first.trainer.checkpoint_callback.best_k_models.items()}
    assert len(best) == 1, "the held-out validation selected a checkpoint"
    capsys.readouterr()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = run_lightning_cli(["fit", *args, "--trainer.max_epochs=2",
                                    "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])
    assert "resuming logger run version_0" in capsys.readouterr().out
    assert not _dirpath_warnings(caught)
    assert second.trainer.current_epoch == 2
    assert sorted(p.name for p in (runs / "curves").iterdir()) == ["version_0"]
    assert Path(second.trainer.checkpoint_callback.dirpath) == folder / "checkpoints"
    kept = {Path(p).name: float(v) for p, v in second.trainer.checkpoint_callback.best_k_models.items()}
    # top-k state reloaded: the first run's choice competes with epoch 2 (a reset state would know only epoch 2)
    assert max(kept.values()) >= max(best.values()) and len(kept) == 1
    assert not list((folder / "checkpoints").glob("last-v*.ckpt"))
    if logger != "CSVLogger":
        return

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = run_lightning_cli(["test", *args, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])
    assert Path(test.trainer.logger.log_dir) == folder
    assert not [w for w in caught if "will be deleted" in str(w.message)]
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    monitor = first.trainer.checkpoint_callback.monitor
    # both epochs' validation rows (the resumed writer kept the file) and the test rows, in one table
    assert [int(float(r["epoch"])) for r in rows if r.get(monitor)] == [0, 1]
    assert any(value for r in rows for key, value in r.items() if key.startswith("test/"))
