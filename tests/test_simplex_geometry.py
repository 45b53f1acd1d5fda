"""experiments/simplex_geometry.py: the energy share inside the vertices' span, checked by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("simplex_geometry", REPO / "experiments" / "simplex_geometry.py")
simplex_geometry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simplex_geometry)


def test_span_share_is_the_projected_energy():
    # span of (1, 1, 0) and (1, -1, 0) is the xy-plane: (1, 1, 1) keeps 2 of its 3 units; (0, 0, 2) none; (3, 4, 0) all
    vertices = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]])
    assert simplex_geometry.span_share(torch.tensor([[1.0, 1.0, 1.0]]), vertices) == pytest.approx(2 / 3)
    assert simplex_geometry.span_share(torch.tensor([[0.0, 0.0, 2.0]]), vertices) == pytest.approx(0.0)
    both = torch.tensor([[1.0, 1.0, 1.0], [3.0, 4.0, 0.0]])
    assert simplex_geometry.span_share(both, vertices) == pytest.approx((2 / 3 + 1) / 2)
