"""Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015).

Layout: ``Market-1501-v15.09.15/{bounding_box_train, bounding_box_test, query}``; file names like
``0002_c1s1_000451_03.jpg`` (pid 0002, camera c1 of 1-6, sequence s1, frame 000451, box 03). Pid ``-1`` is a
junk detection (dropped), pid ``0000`` a distractor (kept in the gallery).
Full dataset: train 751 ids / 12,936 images; query 750 / 3,368; gallery 751 (750 + pid 0) / 15,913.
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

MARKET1501_FORMAT = FilenameFormat(
    pattern=re.compile(r"([-\d]+)_c(\d)s\d+_\d+_\d+\.(?i:jpg)"),
    example="0002_c1s1_000451_03.jpg",
    extensions=(".jpg",),
    cameras=(1, 6),
    max_pid=1501,
)

# fast-reid keeps the release folder directly under its root, torchreid under ``market1501/``.
MARKET1501_FOLDERS = (
    ".",
    "Market-1501-v15.09.15",
    "market1501/Market-1501-v15.09.15",
    "market1501",
    "Market-1501",
)


def load_market1501(root: str | Path) -> ReIDSplits:
    """Load Market-1501.

    Args:
        root: the ``Market-1501-v15.09.15`` folder or a parent holding it (fast-reid or torchreid layout).

    Returns:
        Splits named ``"market1501"``: train pids relabelled, query / gallery pids raw, camids 0-5.

    Raises:
        DatasetFormatError: the folder is not found, or a file name does not follow the Market format.
    """
    dataset_dir = resolve_root(root, "market1501", MARKET1501_FOLDERS, tuple(MARKET_SPLIT_FOLDERS.values()))
    return load_split_folders(dataset_dir, "market1501", MARKET1501_FORMAT)
