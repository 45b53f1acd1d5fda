"""`reid-lab fit | validate | test | predict --ckpt_path <bad file>`: one line naming the file, exit code 2.

Before, Lightning read the file itself and ended in ``KeyError: 101`` (a foreign file), ``PytorchStreamReader
failed reading zip archive`` (a truncated one) or ``UnpicklingError`` (one that carries code), none of which
named the file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reid_lab.cli import main
from tests.cli.test_cli_fit_test import _tiny_overrides

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious "checkpoint" does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _foreign(tmp: Path) -> Path:  # a config file given by mistake
    return Path(shutil.copy(REPO / "configs/experiments/synthetic_bot_r18.yaml", tmp / "model.ckpt"))


def _truncated(tmp: Path) -> Path:  # a copy cut short (an interrupted download or transfer)
    path = tmp / "model.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.randn(256, 256)}, "global_step": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_a_checkpoint(tmp: Path) -> Path:  # a torch file of plain tensors, not a Lightning checkpoint
    path = tmp / "model.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _carries_code(tmp: Path) -> Path:
    path = tmp / "model.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(f"touch {tmp / 'MARKER'}")}, path)
    return path


def _missing(tmp: Path) -> Path:
    return tmp / "runs" / "no-such.ckpt"


BAD_FILES = {"foreign": (_foreign, "cannot be read as a reid_lab checkpoint"),
             "truncated": (_truncated, "cannot be read as a reid_lab checkpoint"),
             "not_a_checkpoint": (_not_a_checkpoint, "no state_dict"),
             "carries_code": (_carries_code, "cannot be read as a reid_lab checkpoint"),
             "missing": (_missing, "does not exist")}


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_a_bad_ckpt_path_is_one_line_naming_the_file(bad, subcommand, tiny_synthetic, tmp_path, cli_argv, capsys):
    make, expected = BAD_FILES[bad]
    path = make(tmp_path)
    code = main([subcommand, *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", str(path)])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"reid-lab {subcommand}: --ckpt_path: ") and str(path) in lines[0], lines[0]
    assert expected in lines[0]
    assert not (tmp_path / "MARKER").exists()  # the file's code never ran
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made


def test_the_entry_point_exits_2_without_a_traceback(tiny_synthetic, tmp_path):
    """The real ``reid-lab`` process: exit status 2, one line on stderr, the code in the file never runs."""
    path = _carries_code(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "reid_lab.cli", "fit", *_tiny_overrides(tiny_synthetic, tmp_path),
                           "--ckpt_path", str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "--ckpt_path" in line]
    assert len(errors) == 1 and str(path) in errors[0]
    assert not (tmp_path / "MARKER").exists()
