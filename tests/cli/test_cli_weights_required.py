"""`reid-lab test | predict | validate` refuse to report numbers of untrained weights unless asked to."""

from __future__ import annotations

import pytest

from reid_lab.lightning_cli import run_lightning_cli
from tests.cli.test_cli_fit_test import _tiny_overrides


@pytest.mark.parametrize("subcommand", ["test", "predict", "validate"])
def test_no_checkpoint_is_refused(subcommand, tiny_synthetic, tmp_path, cli_argv):
    with pytest.raises(SystemExit, match=rf"reid-lab {subcommand}: no --ckpt_path: .*--ckpt_path random"):
        run_lightning_cli([subcommand, *_tiny_overrides(tiny_synthetic, tmp_path)])


def test_random_weights_on_purpose(tiny_synthetic, tmp_path, cli_argv, capsys):
    cli = run_lightning_cli(["test", *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", "random"])
    cli.trainer.logger.experiment.finish()
    assert "the model's initial weights are used" in capsys.readouterr().out
    assert "test/i2i/mAP" in cli.trainer.callback_metrics
