"""Synthetic person re-identification data: procedurally drawn people under varied cameras.

``generate_synthetic`` writes a Market-1501 tree (plus CUHK-PEDES captions and per-identity attributes)
that any Market-1501 parser can read; ``main`` is the ``reid-lab synth`` command.

Modules: ``attributes`` (who a person is), ``cameras`` (how each camera and each shot sees them),
``person`` / ``scene`` / ``shapes`` / ``render`` (drawing), ``captions`` (text), ``layout`` (Market
folders and names), ``seeds`` (per-image random streams), ``writer`` (the atomic, cached tree),
``baseline`` (raw-pixel retrieval) and ``cli``.
"""

from __future__ import annotations

from reid_lab.data.synthetic.cli import main
from reid_lab.data.synthetic.writer import GENERATOR_VERSION, generate_synthetic

__all__ = ["GENERATOR_VERSION", "generate_synthetic", "main"]
