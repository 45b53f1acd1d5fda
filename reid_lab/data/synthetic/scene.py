"""Everything around the person: the camera's background, clutter, other people and occluders.

Clutter colours are drawn partly from the clothing palettes on purpose, so a red pole can be confused
with a red shirt by anything that looks at colour histograms.
"""

from __future__ import annotations

import numpy as np

from reid_lab.data.synthetic.attributes import UPPER_COLOURS
from reid_lab.data.synthetic.cameras import CameraStyle
from reid_lab.data.synthetic.shapes import Canvas

_CLOTHING_RGB = [rgb for rgb, _ in UPPER_COLOURS.values()]


def _clutter_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.4:
        return _CLOTHING_RGB[int(rng.integers(len(_CLOTHING_RGB)))]
    return tuple(int(v) for v in rng.integers(20, 236, size=3))


def _darker(rgb, factor: float = 0.8) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) * factor, 0, 255)


def draw_background(canvas: Canvas, camera: CameraStyle, rng: np.random.Generator) -> float:
    """Paint the camera's wall / floor scene with a per-image offset of its texture.

    Returns:
        The y of the horizon (wall / floor boundary) in pixels.
    """
    h, w = canvas.height, canvas.width
    horizon = float(np.clip(camera.horizon * h + rng.normal(0.0, 0.04 * h), 0.3 * h, 0.9 * h))
    canvas.rect(0, 0, w, horizon, camera.wall)
    canvas.rect(0, horizon, w, h, camera.floor)
    period = max(3.0, camera.period * w)
    phase = rng.uniform(0.0, period)
    accent = camera.accent
    if camera.background == "windows":
        y = rng.uniform(-period, 0.0)
        while y < horizon:
            x = -phase
            while x < w:
                canvas.rect(
                    x + 0.15 * period,
                    y + 0.15 * period,
                    x + 0.8 * period,
                    min(horizon, y + 0.9 * period),
                    accent,
                )
                x += period
            y += 1.2 * period
    elif camera.background == "stripes":
        x = -phase
        while x < w:
            canvas.rect(x, 0, x + 0.45 * period, horizon, accent)
            x += period
    elif camera.background == "bricks":
        step, mortar = max(2.0, 0.18 * period), _darker(camera.wall, 0.7)
        y, row = rng.uniform(-step, 0.0), 0
        while y < horizon:
            canvas.rect(0, y, w, y + 1, mortar)
            x = -phase + (row % 2) * 0.5 * period
            while x < w:
                canvas.rect(x, y, x + 1, min(horizon, y + step), mortar)
                x += 0.5 * period
            y += step
            row += 1
    elif camera.background == "foliage":
        for _ in range(8):
            canvas.ellipse(
                rng.uniform(0, w),
                rng.uniform(0, horizon),
                rng.uniform(0.1, 0.35) * w,
                rng.uniform(0.05, 0.2) * h,
                _darker(accent, rng.uniform(0.6, 1.1)),
            )
    else:
        for i in range(4):
            canvas.rect(0, i * horizon / 4, w, (i + 1) * horizon / 4, _darker(camera.wall, 0.85 + 0.05 * i))
    y, joint = horizon + rng.uniform(0.02, 0.08) * h, _darker(camera.floor, 0.8)
    while y < h:  # floor tiles, spacing growing towards the camera
        canvas.rect(0, y, w, y + 1, joint)
        y += max(2.0, 0.35 * (y - horizon + 2))
    canvas.rect(0, horizon - 1, w, horizon + 1, _darker(camera.wall, 0.6))
    return horizon


def draw_clutter(canvas: Canvas, camera: CameraStyle, horizon: float, rng: np.random.Generator) -> None:
    """Paint background objects: poles, boxes, signs and bushes, in camera-dependent number."""
    h, w = canvas.height, canvas.width
    for _ in range(int(rng.poisson(camera.clutter))):
        kind = int(rng.integers(4))
        colour = _clutter_colour(rng)
        x = rng.uniform(-0.1, 1.0) * w
        if kind == 0:  # pole
            pw = rng.uniform(0.03, 0.08) * w
            canvas.rect(x, rng.uniform(0.0, 0.3) * h, x + pw, horizon + rng.uniform(0.0, 0.15) * h, colour)
        elif kind == 1:  # box / bin
            bw, bh = rng.uniform(0.15, 0.4) * w, rng.uniform(0.05, 0.2) * h
            base = horizon + rng.uniform(0.0, 0.1) * h
            canvas.rect(x, base - bh, x + bw, base, colour)
        elif kind == 2:  # sign
            sw, sh = rng.uniform(0.15, 0.5) * w, rng.uniform(0.04, 0.1) * h
            y = rng.uniform(0.0, 0.5) * horizon
            canvas.rect(x, y, x + sw, y + sh, colour)
        else:  # bush
            canvas.ellipse(x, horizon, rng.uniform(0.1, 0.3) * w, rng.uniform(0.05, 0.12) * h, colour)


def draw_occluder(
    canvas: Canvas,
    kind: str,
    extent: float,
    person_box: tuple[float, float, float, float],
    rng: np.random.Generator,
) -> None:
    """Paint a ``bottom`` (car, bench, railing) or ``side`` (pillar, wall edge) occluder in front of the person.

    Args:
        canvas: the image.
        kind: ``"bottom"`` or ``"side"`` (``"person"`` occluders are drawn by the renderer).
        extent: fraction of the person's height (bottom) or width (side) that is covered.
        person_box: ``(x0, y0, x1, y1)`` of the person in pixels.
        rng: the image's generator.
    """
    x0, y0, x1, y1 = person_box
    colour = _clutter_colour(rng)
    if kind == "bottom":
        y = y1 - extent * (y1 - y0)
        canvas.rect(0, y, canvas.width, canvas.height, colour)
        if rng.random() < 0.5:  # a darker top edge reads as a car roof or bench rail
            canvas.rect(0, y, canvas.width, y + 0.03 * (y1 - y0), _darker(colour, 0.7))
    elif kind == "side":
        if rng.random() < 0.5:
            canvas.rect(0, 0, x0 + extent * (x1 - x0), canvas.height, colour)
        else:
            canvas.rect(x1 - extent * (x1 - x0), 0, canvas.width, canvas.height, colour)
    else:
        raise ValueError(f"unknown occluder kind {kind!r}; expected 'bottom' or 'side'")
