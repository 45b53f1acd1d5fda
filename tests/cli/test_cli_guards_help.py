"""`reid-lab --help` lists every command, no spurious LightningCLI warning, the divergence guard always on."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from reid_lab.cli import main
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.modules.guards import DivergenceGuard

REPO = Path(__file__).resolve().parents[2]
REID_LAB = Path(sys.executable).with_name("reid-lab")
ARGS_WARNING = "LightningCLI's args parameter"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([str(REID_LAB), *args], capture_output=True, text=True, env=env, timeout=300)


def _experiment(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs/experiments/synthetic_bot_r18.yaml"),
        f"--data.init_args.root={root}", "--data.init_args.image_size=[64,32]",
        "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        f"--trainer.default_root_dir={tmp}", *extra,
    ]


def test_top_level_help_lists_every_command_without_the_args_warning():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for command in ("fit", "validate", "test", "predict", "synth", "upgrade", "index"):
        assert command in result.stdout
    assert ARGS_WARNING not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["synth", "upgrade", "index"])
def test_listed_project_commands_answer_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0 and f"usage: reid-lab {command}" in capsys.readouterr().out


def test_subcommand_help_has_no_args_warning():
    result = _run("fit", "--help")
    assert result.returncode == 0 and "--trainer.max_epochs" in result.stdout
    assert ARGS_WARNING not in result.stdout + result.stderr


def test_study_style_call_is_quiet_and_keeps_the_guard(tiny_synthetic, tmp_path, monkeypatch):
    # The study runner calls run_lightning_cli(args) from inside `reid-lab upgrade ...`; the experiment config
    # lists its own callbacks (replacing the defaults), yet the divergence guard is there.
    monkeypatch.setattr(sys, "argv", ["reid-lab", "upgrade", "--config", "study.yaml"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_lightning_cli(_experiment(tiny_synthetic, tmp_path), run=False)
    assert not [w for w in caught if ARGS_WARNING in str(w.message)]
    guards = [c for c in cli.trainer.callbacks if isinstance(c, DivergenceGuard)]
    assert len(guards) == 1 and guards[0].explosion_factor == 1e3


@pytest.mark.slow
def test_fit_at_lr_1e6_exits_non_zero_naming_the_step(tiny_synthetic, tmp_path, cli_argv, capsys):
    code = main(["fit", *_experiment(tiny_synthetic, tmp_path, "--model.init_args.lr=1e6",
                                     "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=1")])
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged at global step 1 (epoch 1," in err and "exploded" in err
    assert "train/ce=" in err and "none written before the divergence" in err
    assert not list(tmp_path.rglob("*.ckpt"))  # no "best" (or any) checkpoint of a diverged run
