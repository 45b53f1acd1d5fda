"""CUHK03-NP, the "new protocol" split of CUHK03 (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017): 767 training and 700 test identities.

Layout (as released with the re-ranking paper): ``cuhk03-np/{detected,labeled}/{bounding_box_train,
bounding_box_test, query}``; PNG file names like ``0001_c1_1.png`` (pid, camera c1/c2, index).
Full dataset, detected: train 767 ids / 7,365 images, query 700 / 1,400, gallery 700 / 5,332;
labeled: 7,368 / 1,400 / 5,328 images.
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
from reid_lab.data.records import DatasetFormatError, ReIDSplits

CUHK03NP_FORMAT = FilenameFormat(
    pattern=re.compile(r"([-\d]+)_c(\d)_\d+\.(?i:png)"),
    example="0001_c1_1.png",
    extensions=(".png",),
    cameras=(1, 2),
)

CUHK03NP_VARIANTS = ("detected", "labeled")


def load_cuhk03np(root: str | Path, variant: str = "detected") -> ReIDSplits:
    """Load CUHK03-NP.

    Args:
        root: the ``cuhk03-np`` folder, a parent holding it, or the ``detected`` / ``labeled`` folder itself.
        variant: ``"detected"`` (boxes from a person detector) or ``"labeled"`` (hand-drawn boxes).

    Returns:
        Splits named ``"cuhk03np"``: train pids relabelled, query / gallery pids raw, camids 0-1;
        ``meta["variant"]`` records the variant.

    Raises:
        ValueError: unknown ``variant``.
        DatasetFormatError: the folder is not found, or a file name does not follow the CUHK03-NP format.
    """
    if variant not in CUHK03NP_VARIANTS:
        raise ValueError(f"cuhk03np: variant must be one of {CUHK03NP_VARIANTS}, got {variant!r}")
    candidates = (
        variant,
        f"cuhk03-np/{variant}",
        f"cuhk03_np/{variant}",
        f"cuhk03/cuhk03-np/{variant}",
        ".",
    )
    dataset_dir = resolve_root(root, "cuhk03np", candidates, tuple(MARKET_SPLIT_FOLDERS.values()))
    if dataset_dir.name in CUHK03NP_VARIANTS and dataset_dir.name != variant:
        raise DatasetFormatError(
            f"cuhk03np: {dataset_dir} is the {dataset_dir.name!r} variant but variant={variant!r} was "
            f"requested; pass the cuhk03-np folder as root or set variant={dataset_dir.name!r}"
        )
    return load_split_folders(dataset_dir, "cuhk03np", CUHK03NP_FORMAT, meta={"variant": variant})
