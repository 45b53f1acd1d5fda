"""The README's quick start runs as written, each line after the one before, at tiny scale.

Every command line of the "## Quick start" code block is run in order through ``reid_lab.cli.main`` (what the
``reid-lab`` script calls) in a fresh folder that holds the repository's ``configs/`` and ``experiments/``, as a
user runs it from the repository root. Only documented options are appended to shrink it: fewer synthetic
identities and images, one short epoch, small batches, no worker processes. A line that needs the output of an
earlier one (``test`` / ``predict`` read the checkpoint of ``fit``, ``index`` reads the file of ``predict``) finds
it where the earlier line wrote it, or the test fails (before: ``index build --features features/gallery.pt``
named a file no line wrote, and ``--ckpt_path <ckpt>`` was a placeholder).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import wandb

from reid_lab.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Lines not run here, with the reason; each must still be a line of the block (kept in step with the README).
NOT_RUN = {
    "make install && source .venv/bin/activate": "installs the environment this test runs in",
    "reid-lab upgrade --config experiments/synthetic_upgrade.yaml": "a whole multi-stage study (tests/studies "
                                                                    "runs studies at tiny scale)",
}
TINY_TRAINING = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
                 "2", "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch", "1",
                 "--trainer.accelerator", "cpu", "--data.init_args.batch_size", "16",
                 "--data.init_args.eval_batch_size", "32", "--data.init_args.num_workers", "0"]
TINY_EVALUATION = ["--trainer.accelerator", "cpu", "--data.init_args.eval_batch_size", "32",
                   "--data.init_args.num_workers", "0"]
# appended per command (argparse and LightningCLI both take the last value of an option given twice)
TINY = {
    "synth": ["--ids", "24", "--images-per-id", "4", "5", "--distractors", "4", "--junk", "2"],
    "fit": TINY_TRAINING,
    "test": TINY_EVALUATION,
    "predict": TINY_EVALUATION,
    "baseline": ["--batch-size", "32"],
    "vlm-processor": ["--vocab-size", "300"],
}


def quickstart_lines(readme: str) -> list[str]:
    """The command lines of the README's quick-start code block: continuations joined, comments dropped."""
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no ```bash block under ## Quick start"
    text = re.sub(r"\\\n\s*", " ", block.group(1))
    lines = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment (the block has no '#' inside arguments)
        if line:
            lines.append(" ".join(line.split()))
    return lines


def test_the_quick_start_lines_are_what_this_test_expects():
    lines = quickstart_lines((REPO / "README.md").read_text())
    assert set(NOT_RUN) <= set(lines)
    assert all(line.startswith("reid-lab ") for line in lines if line not in NOT_RUN)


def test_every_quick_start_line_runs_after_the_one_before(tmp_path, monkeypatch, cli_argv, capsys):
    for folder in ("configs", "experiments"):
        os.symlink(REPO / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    for line in quickstart_lines((REPO / "README.md").read_text()):
        if line in NOT_RUN:
            continue
        argv = shlex.split(line)[1:]
        argv += TINY.get(argv[0], [])
        try:
            code = main(argv)
        except SystemExit as exit_:  # --print_config ends by exiting
            code = exit_.code or 0
        except Exception as error:
            raise AssertionError(f"`{line}` failed: {error}") from error
        finally:
            wandb.finish()  # a user runs each line in its own process: no wandb run carries over to the next
        captured = capsys.readouterr()
        assert code == 0, f"`{line}` exited {code}:\n{captured.err[-3000:]}"
    # what the chain produced, where the next line looked for it
    assert (tmp_path / "runs/reid_lab/synthetic_r18/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "features/synthetic_test.pt").is_file()
    assert (tmp_path / "results.json").is_file()
