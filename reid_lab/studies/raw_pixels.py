"""A raw-pixel retrieval baseline: how far flattened pixels and cosine distance get on a ReID dataset.

It exists to show that the synthetic set needs learning: raw pixels see the camera (background, light)
more than the person. The evaluation is :func:`reid_lab.metrics.evaluate_rank` (Market-1501 protocol).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reid_lab.data.datasets import load_dataset
from reid_lab.data.records import ImageRecord


def pixel_features(records: list[ImageRecord], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Flattened RGB pixels ``(N, 3 * H * W)`` float32, optionally resized to ``size = (H, W)`` first."""
    rows = []
    for r in records:
        with Image.open(r.path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size[1], size[0]))
            rows.append(np.asarray(img, dtype=np.float32).ravel())
    return torch.from_numpy(np.stack(rows))


def raw_pixel_baseline(root: str | Path, dataset: str = "synthetic", size: tuple[int, int] | None = None,
                       **options) -> dict[str, float]:
    """R1 / R5 / R10 / mAP / mINP (percent) of raw pixels compared by cosine distance, query vs gallery."""
    from reid_lab.metrics import compute_distance, evaluate_rank

    splits = load_dataset(dataset, root, **options)
    q, g = splits.query, splits.gallery
    distmat = compute_distance(pixel_features(q, size), pixel_features(g, size), metric="cosine")
    result = evaluate_rank(
        distmat, np.array([r.pid for r in q]), np.array([r.pid for r in g]),
        np.array([r.camid for r in q]), np.array([r.camid for r in g]),
    )
    return result.summary()
