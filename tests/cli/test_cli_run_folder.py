"""One writer per run folder: the folder lock, and `reid-lab fit` refusing a folder that is not its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reid_lab.cli import main
from reid_lab.run_lock import LOCK_NAME, FolderInUse, hold_folder_lock, lock_holder
from tests.cli.test_cli_fit_test import _tiny_overrides

REPO = Path(__file__).resolve().parents[2]

# A second process that holds a folder's lock until its stdin closes (or it is killed).
HOLDER = """
import sys
from reid_lab.run_lock import hold_folder_lock
with hold_folder_lock(sys.argv[1], what=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    """A real other process holding ``folder``'s lock for the ``with`` block."""

    def __init__(self, folder: Path, what: str = "run"):
        self.folder, self.what = folder, what

    def __enter__(self) -> subprocess.Popen:
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(self.folder), self.what], cwd=REPO,
                                        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"
        return self.process

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


# ------------------------------------------------------------------------------------------ the lock itself
def test_a_second_process_is_refused_and_told_who_holds_the_folder(tmp_path):
    folder = tmp_path / "study"
    with Holder(folder, what="study") as holder:
        with pytest.raises(FolderInUse) as caught:
            with hold_folder_lock(folder, what="study"):
                pytest.fail("two holders of one folder")
        assert caught.value.pid == holder.pid and caught.value.folder == folder
        assert str(folder) in str(caught.value) and f"process {holder.pid}" in str(caught.value)
        assert str(caught.value).startswith("study folder")
    with hold_folder_lock(folder, what="study"):  # released when the holder finished
        assert lock_holder(folder) == os.getpid()
    assert lock_holder(folder) is None  # a released lock names nobody


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    with Holder(folder) as holder:
        holder.kill()  # SIGKILL: the holder's own cleanup never runs
        holder.wait(timeout=30)
        assert lock_holder(folder) == holder.pid  # the dead process's pid is still written in the file
        with caplog.at_level("WARNING", logger="reid_lab.run_lock"), hold_folder_lock(folder) as held:
            assert held == folder and lock_holder(folder) == os.getpid()
        assert f"taking over the lock of process {holder.pid}" in caplog.text


def test_one_process_cannot_hold_a_folder_twice_and_an_error_releases_it(tmp_path):
    with hold_folder_lock(tmp_path):
        with pytest.raises(FolderInUse, match=r"\(this process\)"):
            with hold_folder_lock(tmp_path):
                pass
    with pytest.raises(KeyError), hold_folder_lock(tmp_path):
        raise KeyError("boom")
    with hold_folder_lock(tmp_path):  # the error released it
        pass
    assert (tmp_path / LOCK_NAME).is_file()  # kept in place: see the module docstring


# ------------------------------------------------------------------------------------------ reid-lab fit
def _csv_fit_args(root: Path, tmp: Path, *extra: str) -> list[str]:
    args = [a for a in _tiny_overrides(root, tmp) if not a.startswith(("--trainer.logger", "--trainer.max_epochs"))]
    return ["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp / 'runs'}",
            "--trainer.logger.name=csv", *extra]


@pytest.mark.slow
def test_a_second_fit_with_the_same_version_refuses_before_training(tiny_synthetic, tmp_path, cli_argv, capsys):
    """Two fits given one logger version: the second is no resume, so it refuses and leaves the folder as the
    first run wrote it (before: both exited 0, one metrics.csv, two models' checkpoints side by side)."""
    args = _csv_fit_args(tiny_synthetic, tmp_path, "--trainer.logger.version=shared")
    assert main(args) == 0
    folder = tmp_path / "runs" / "csv" / "shared"
    before = {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != LOCK_NAME}
    assert Path("checkpoints/last.ckpt") in before
    capsys.readouterr()

    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and "another run's files" in err, err
    after = {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != LOCK_NAME}
    assert after == before  # nothing added (no last-v1.ckpt, no config.fit-1.yaml), nothing rewritten


@pytest.mark.slow
def test_a_fit_into_a_folder_another_process_holds_is_refused(tiny_synthetic, tmp_path, cli_argv, capsys):
    folder = tmp_path / "runs" / "csv" / "shared"
    with Holder(folder) as holder:
        assert main(_csv_fit_args(tiny_synthetic, tmp_path, "--trainer.logger.version=shared")) == 1
    err = capsys.readouterr().err
    assert f"run folder {folder} is in use by process {holder.pid}" in err
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing there


@pytest.mark.slow
def test_a_fresh_version_moves_past_a_folder_another_run_just_took(tiny_synthetic, tmp_path, cli_argv, capsys):
    """Two fresh runs started at once both count ``version_0`` as free; the second takes ``version_1``."""
    taken = tmp_path / "runs" / "csv" / "version_0"
    with Holder(taken):
        assert main(_csv_fit_args(tiny_synthetic, tmp_path)) == 0
    assert sorted(p.name for p in taken.iterdir()) == [LOCK_NAME]
    assert (taken.parent / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert (taken.parent / "version_1" / "metrics.csv").is_file()

