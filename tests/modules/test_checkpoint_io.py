"""Checkpoint writes are atomic: a save that fails half-way leaves the previous checkpoint whole."""

from __future__ import annotations

import pytest
import torch

from reid_lab.modules.checkpoint_io import AtomicCheckpointIO


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed half-way through the write")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, path)
    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "epoch": 2, "bad": _Unpicklable()}, path)
    kept = io.load_checkpoint(path)
    assert kept["epoch"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left behind
