"""Fault injection: an index save killed between its two renames leaves the old index, never none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_lab.retrieval.index import GalleryIndex

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults

# Runs in a child: build a new index over the old one and SIGKILL itself right after the first rename
# (old index moved aside, new one not yet in place).
CHILD = """
import os, signal, sys, torch
import reid_lab.retrieval.index as index_module
from reid_lab.retrieval.index import GalleryIndex

real_replace = os.replace
def replace_then_die(src, dst):
    real_replace(src, dst)
    if str(dst).endswith("index"):  # the old index was just moved aside
        os.kill(os.getpid(), signal.SIGKILL)
index_module.os.replace = replace_then_die
GalleryIndex.build(torch.ones(5, 4), "flat").save(sys.argv[1])
"""


def test_killed_between_renames_keeps_the_old_index(tmp_path):
    target = tmp_path / "gallery_index"
    old = torch.from_numpy(np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32))
    GalleryIndex.build(old, "flat").save(target)
    child = subprocess.run([sys.executable, "-c", CHILD, str(target)], cwd=REPO, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert not target.exists()  # the kill landed between the renames
    assert list(tmp_path.glob(".gallery_index.*.old"))

    restored = GalleryIndex.load(target)  # the next reader finds the previous index, whole
    assert restored.ntotal == 7
    assert not list(tmp_path.glob(".gallery_index.*"))  # leftovers cleaned
    GalleryIndex.build(torch.ones(3, 4), "flat").save(target)  # and the next save replaces it normally
    assert GalleryIndex.load(target).ntotal == 3
