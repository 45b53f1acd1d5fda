"""VeRi-776 vehicle ReID (Liu et al., "A Deep Learning-Based Approach to Progressive Vehicle
Re-identification for Urban Surveillance", ECCV 2016).

Layout: ``VeRi/{image_train, image_query, image_test}``; file names like ``0002_c002_00030600_0.jpg``
(vehicle id, camera c001-c020, timestamp, index). Full dataset: train 576 ids / 37,778 images;
query 200 / 1,678; gallery 200 / 11,579; 20 cameras.
"""

from __future__ import annotations

import re
from pathlib import Path

from reid_lab.data.datasets.layout import FilenameFormat, load_split_folders, resolve_root
from reid_lab.data.records import ReIDSplits

VERI776_FORMAT = FilenameFormat(
    pattern=re.compile(r"(\d+)_c(\d\d\d)_\d+_\d+\.(?i:jpg)"),
    example="0002_c002_00030600_0.jpg",
    extensions=(".jpg",),
    cameras=(1, 20),
    max_pid=776,
)

VERI776_SPLIT_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}

VERI776_FOLDERS = (".", "VeRi", "veri", "veri/VeRi", "VeRi-776", "veri776")


def load_veri776(root: str | Path) -> ReIDSplits:
    """Load VeRi-776.

    Args:
        root: the ``VeRi`` folder or a parent holding it.

    Returns:
        Splits named ``"veri776"``: train pids relabelled, query / gallery pids raw, camids 0-19.

    Raises:
        DatasetFormatError: the folder is not found, or a file name does not follow the VeRi format.
    """
    dataset_dir = resolve_root(root, "veri776", VERI776_FOLDERS, tuple(VERI776_SPLIT_FOLDERS.values()))
    return load_split_folders(dataset_dir, "veri776", VERI776_FORMAT, VERI776_SPLIT_FOLDERS)
