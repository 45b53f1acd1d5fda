"""The synthetic dataset written by ``reid-lab synth``: a Market-1501 tree directly at its root.

Layout: ``root/{bounding_box_train, bounding_box_test, query}`` with Market file names
(``0002_c1s1_000451_03.jpg``).
"""

from __future__ import annotations

import re
from pathlib import Path

from reid_lab.data.datasets.layout import (
    MARKET_SPLIT_FOLDERS,
    FilenameFormat,
    load_split_folders,
    resolve_root,
)
from reid_lab.data.records import ReIDSplits

# Market names with any single-digit camera: the generator may use more cameras than Market's six.
SYNTHETIC_FORMAT = FilenameFormat(
    pattern=re.compile(r"([-\d]+)_c(\d)s\d+_\d+_\d+\.(?i:jpg|jpeg|png)"),
    example="0002_c1s1_000451_03.jpg",
    extensions=(".jpg", ".jpeg", ".png"),
    cameras=(1, 9),
)


def load_synthetic(root: str | Path) -> ReIDSplits:
    """Load a synthetic dataset generated with ``reid-lab synth --out <root>``.

    Args:
        root: the folder given to ``reid-lab synth --out``.

    Returns:
        Splits named ``"synthetic"``: train pids relabelled, query / gallery pids raw, 0-based camids.

    Raises:
        DatasetFormatError: the folder does not hold a generated dataset, or a file name is malformed.
    """
    dataset_dir = resolve_root(
        root,
        "synthetic",
        (".",),
        tuple(MARKET_SPLIT_FOLDERS.values()),
        hint=f"Generate one with: reid-lab synth --out {root}",
    )
    return load_split_folders(dataset_dir, "synthetic", SYNTHETIC_FORMAT)
