"""Atomic writes: the destination is either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from reid_lab.atomic import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    umask,
)


def test_writers_round_trip_and_create_folders(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "t.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    path = atomic_write_json(tmp_path / "x.json", {"k": [1, 2.5, None]})
    assert json.loads(path.read_text()) == {"k": [1, 2.5, None]}
    assert path.read_text().endswith("\n")
    saved = atomic_torch_save({"w": torch.arange(4)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(saved)["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.pt", "t.txt", "x.json"]


def test_permissions_follow_the_umask_not_mkstemp(tmp_path):
    path = atomic_write_text(tmp_path / "p.txt", "x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "keep.txt", "old contents")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(path, "w") as handle:
            handle.write("half of the new con")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(TypeError):  # an object json cannot encode: same guarantee
        atomic_write_json(path, {"bad": object()})
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "f", "a"):
            pass


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "features.json"
    child = ("import os, signal, sys\n"
             "import reid_lab.atomic as a\n"
             "with a.atomic_open(sys.argv[1]) as f:\n"
             "    f.write('half')\n"
             "    f.flush()\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", child, str(target)], capture_output=True, timeout=120,
                            env={**os.environ})
    assert result.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".features.json.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()  # nothing under the destination's name
    atomic_write_json(target, {"ok": 1})
    assert not list(tmp_path.glob(".features.json.*.tmp")) and target.read_text() == '{\n "ok": 1\n}\n'
