"""experiments/mixed_gallery_scales.py on a hand-built mixed gallery."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from reid_lab.embedding.features import FeatureSet

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mixed_gallery_scales", REPO / "experiments" / "mixed_gallery_scales.py")
scales = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scales)


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def _set(query: list[float], positive: list[float], negative: list[float]) -> FeatureSet:
    features = torch.tensor([query, positive, negative])
    return FeatureSet(features, torch.tensor([1, 1, 2]), torch.tensor([0, 1, 1]), torch.tensor([True, False, False]),
                      ["q.jpg", "p.jpg", "n.jpg"], {"space_id": "s"}, "image")


def test_a_refreshed_negative_above_an_old_positive_is_counted(tmp_path, capsys):
    (tmp_path / "features").mkdir()
    # old space: the positive at 60 degrees (cos 0.5) beats the negative at 84 (cos ~0.10)
    _set(_unit(0), _unit(60), _unit(84)).save(tmp_path / "features" / "old.pt")
    # new space: the query at 0 degrees, its negative at 50 degrees (cos ~0.64): above the old positive's 0.5
    _set(_unit(0), _unit(10), _unit(50)).save(tmp_path / "features" / "m.pt")
    assert scales.main([str(tmp_path), "m"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("m "))
    values = [float(v) for v in row.split()[1:]]
    assert values[0] == pytest.approx(math.cos(math.radians(10)), abs=1e-3)  # new -> new positive
    assert values[2] == pytest.approx(math.cos(math.radians(60)), abs=1e-3)  # new -> old positive
    assert values[4:] == [1.0, 0.0]  # the refreshed negative outranks; the old negative does not
