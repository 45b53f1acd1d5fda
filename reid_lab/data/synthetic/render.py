"""Composing one image: background, clutter, other people, the person, occluders, then the camera pipeline.

Three kinds of image, as in Market-1501: a *person* sighting, a *distractor* (pid 0: a false detection,
mostly background, sometimes a sliver of somebody) and *junk* (pid -1: a bad box on a body part).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from reid_lab.data.synthetic.attributes import PersonAttributes, random_attributes
from reid_lab.data.synthetic.cameras import CameraStyle, ViewConditions, apply_camera, sample_view
from reid_lab.data.synthetic.person import Placement, draw_person
from reid_lab.data.synthetic.scene import draw_background, draw_clutter, draw_occluder
from reid_lab.data.synthetic.shapes import Canvas

_HALF_WIDTH = 0.14
"""Half the width of an average person's shoulders, as a fraction of their height."""


def _scene(camera: CameraStyle, size: tuple[int, int], rng: np.random.Generator) -> tuple[Canvas, float]:
    canvas = Canvas(*size)
    horizon = draw_background(canvas, camera, rng)
    draw_clutter(canvas, camera, horizon, rng)
    return canvas, horizon


def _passer_by(canvas: Canvas, cx: float, top: float, height: float, rng: np.random.Generator) -> None:
    """Somebody who is not one of the dataset's identities."""
    view = ("front", "back", "side")[int(rng.integers(3))]
    draw_person(canvas, random_attributes(rng), Placement(cx, top, height, view, float(rng.uniform(-1, 1))))


def render_person(
    attrs: PersonAttributes,
    camera: CameraStyle,
    view: ViewConditions,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """One sighting of an identity.

    Args:
        attrs: the identity.
        camera: the camera's fixed conditions.
        view: this image's conditions (viewpoint, jitter, occlusion, ...).
        size: ``(height, width)`` of the output.
        rng: the image's own generator; the same generator state gives the same pixels.

    Returns:
        ``(height, width, 3)`` uint8 image.
    """
    h, w = size
    canvas, _ = _scene(camera, size, rng)
    u = view.scale * h
    cx = w / 2 + view.dx * w
    top = (h - u) / 2 + view.dy * h
    for _ in range(view.background_people):
        side = 1 if rng.random() < 0.5 else -1
        far = u * rng.uniform(0.5, 0.8)
        _passer_by(canvas, cx + side * rng.uniform(0.35, 0.6) * w, top + (u - far) * 0.4, far, rng)
    draw_person(canvas, attrs, Placement(cx, top, u, view.viewpoint, view.stride))
    box = (cx - _HALF_WIDTH * u, top, cx + _HALF_WIDTH * u, top + u)
    if view.occluder in ("bottom", "side"):
        draw_occluder(canvas, view.occluder, view.occlusion, box, rng)
    elif view.occluder == "person":
        side = 1 if rng.random() < 0.5 else -1
        near = u * rng.uniform(1.0, 1.2)
        offset = _HALF_WIDTH * (u + near) - view.occlusion * 2 * _HALF_WIDTH * u
        _passer_by(canvas, cx + side * offset, top - (near - u) * 0.5, near, rng)
    return apply_camera(canvas.pixels, camera, view, rng)


def render_distractor(camera: CameraStyle, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A false detection (Market pid 0): background and clutter, sometimes a sliver of a passer-by."""
    h, w = size
    view = sample_view(rng, camera)
    canvas, _ = _scene(camera, size, rng)
    draw_clutter(canvas, camera, camera.horizon * h, rng)
    if rng.random() < 0.5:
        u = view.scale * h
        _passer_by(canvas, rng.choice([-0.25, 1.25]) * w, (h - u) / 2, u, rng)
    return apply_camera(canvas.pixels, camera, view, rng)


def render_junk(camera: CameraStyle, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A bad detection (Market pid -1): a box on one body part of a passer-by, too close to identify."""
    h, w = size
    view = replace(sample_view(rng, camera), occluder="none", background_people=0)
    canvas, _ = _scene(camera, size, rng)
    u = h * rng.uniform(1.8, 3.0)
    top = -rng.uniform(0.0, 1.0) * (u - h)
    _passer_by(canvas, w / 2 + rng.normal(0.0, 0.15) * w, top, u, rng)
    return apply_camera(canvas.pixels, camera, view, rng)
