"""Independent random streams, so every identity, camera and image is reproducible on its own.

Each generator is seeded from ``(seed, stream, *keys)`` through numpy's ``SeedSequence``; an image
therefore depends only on the dataset seed, its pid and its index, never on the order or the process in
which images are drawn (the result is the same with any number of workers).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a random generator is used for."""

    ATTRIBUTES = 0
    IMAGE = 1
    CAMERA = 2
    PLAN = 3
    DISTRACTOR = 4
    JUNK = 5
    CAPTION = 6


def rng_for(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """The generator of ``stream`` for ``keys`` (e.g. pid and image index) under dataset ``seed``."""
    return np.random.default_rng([seed, int(stream), *keys])
