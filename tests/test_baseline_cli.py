"""`reid-lab baseline`: raw-pixel and untrained-backbone numbers of a data config, checked against the naive
evaluator on features computed here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_lab.cli import main
from reid_lab.data.datasets import load_dataset
from reid_lab.metrics.rank import evaluate_rank_reference

REPO = Path(__file__).resolve().parents[1]


def _pixels(records, size):
    return torch.stack([torch.from_numpy(np.asarray(Image.open(r.path).convert("RGB").resize((size[1], size[0])),
                                                    dtype=np.float32).ravel()) for r in records])


def test_raw_pixel_row_equals_the_reference_evaluator(tiny_synthetic, capsys):
    assert main(["baseline", "--config", str(REPO / "configs/data/synthetic.yaml"), "--root", str(tiny_synthetic),
                 "--backbone", "resnet18"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^raw pixels\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)", out, re.M)
    assert row and re.search(r"^resnet18 \(random init\)\s+[\d.]+", out, re.M), out
    splits = load_dataset("synthetic", tiny_synthetic)
    q, g = _pixels(splits.query, (128, 64)), _pixels(splits.gallery, (128, 64))
    q, g = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    ref = evaluate_rank_reference(1 - q @ g.T, [r.pid for r in splits.query], [r.pid for r in splits.gallery],
                                  [r.camid for r in splits.query], [r.camid for r in splits.gallery])
    assert float(row.group(1)) == pytest.approx(100 * ref.cmc[0], abs=0.006)
    assert float(row.group(2)) == pytest.approx(100 * ref.mAP, abs=0.006)


def test_a_caption_data_config_is_refused_by_name(tiny_synthetic, capsys):
    assert main(["baseline", "--config", str(REPO / "configs/data/synthetic_text.yaml"),
                 "--root", str(tiny_synthetic)]) == 2
    assert "expected a ReIDDataModule config" in capsys.readouterr().err
