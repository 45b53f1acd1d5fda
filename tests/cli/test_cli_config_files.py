"""The resolved config is saved next to its own run, never over a user's file."""

from __future__ import annotations

import pytest
import yaml

from reid_lab.lightning_cli import run_lightning_cli
from tests.cli.test_cli_fit_test import _tiny_overrides

pytestmark = pytest.mark.slow


def test_config_files_never_overwrite(tiny_synthetic, tmp_path, cli_argv):
    user_file = tmp_path / "config.yaml"
    user_file.write_text("my own notes\n")
    args = [*_tiny_overrides(tiny_synthetic, tmp_path), "--trainer.logger=false", "--ckpt_path", "random"]
    for _ in range(2):
        run_lightning_cli(["test", *args])
    assert user_file.read_text() == "my own notes\n"
    saved = sorted((tmp_path / "run_configs").glob("test-*.yaml"))
    assert len(saved) == 2  # one per run, the second did not replace the first
    assert yaml.safe_load(saved[0].read_text())["model"]["init_args"]["backbone"] == "resnet18"


def test_with_a_logger_the_config_sits_in_the_run_folder(tiny_synthetic, tmp_path, cli_argv):
    cli = run_lightning_cli(["test", *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", "random"])
    logger = cli.trainer.logger
    logger.experiment.finish()
    path = tmp_path / "runs" / logger.name / logger.version / "config.test.yaml"
    assert path.is_file() and not (tmp_path / "runs" / "config.yaml").exists()
