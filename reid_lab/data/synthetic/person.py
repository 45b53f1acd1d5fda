"""Drawing one person from their attributes, seen from the front, the back or the side.

The viewpoint decides what is visible, as in real footage: a shirt logo only from the front, a backpack as
a large block from the back, a narrow block from the side and only as two straps from the front; long
hair frames the face from the front and covers the upper back from behind. Proportions are fractions of
the person's height ``u`` so the same drawing works at any image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reid_lab.data.synthetic.attributes import PersonAttributes
from reid_lab.data.synthetic.shapes import Canvas


@dataclass(frozen=True)
class Placement:
    """Where and how a person stands in the image.

    Attributes:
        cx: horizontal centre in pixels.
        top: y of the top of the head in pixels.
        height: person height in pixels (before the identity's own height factor).
        viewpoint: ``"front"``, ``"back"`` or ``"side"`` (side views face +x).
        stride: gait phase in ``[-1, 1]``.
    """

    cx: float
    top: float
    height: float
    viewpoint: str
    stride: float


_BODY_WIDTH = 1.15
"""Body width relative to the attribute's build factor; Market boxes are tight, people fill half the width."""


def _width(attrs: PersonAttributes) -> float:
    return attrs.width_factor * _BODY_WIDTH


def _shade(rgb: tuple[int, int, int], factor: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) * factor, 0, 255)


def _torso_stripes(canvas: Canvas, y0: float, y1: float, top: tuple, bottom: tuple, u: float, colour) -> None:
    period, thick = 0.055 * u, 0.024 * u
    y = y0 + 0.02 * u
    while y + thick <= y1:
        ta, tb = (y - y0) / (y1 - y0), (y + thick - y0) / (y1 - y0)
        canvas.quad(
            y,
            y + thick,
            (top[0] + ta * (bottom[0] - top[0]), top[1] + ta * (bottom[1] - top[1])),
            (top[0] + tb * (bottom[0] - top[0]), top[1] + tb * (bottom[1] - top[1])),
            colour,
        )
        y += period


def _arm(
    canvas: Canvas, attrs: PersonAttributes, x0: float, y0: float, x1: float, y1: float, u: float
) -> None:
    """An arm from shoulder ``(x0, y0)`` to wrist ``(x1, y1)``: sleeve colour, then skin for short sleeves."""
    width = 0.05 * u * _width(attrs)
    skin, upper = attrs.skin.rgb, attrs.upper.rgb
    canvas.band(x0, y0, x1, y1, width, upper)
    if attrs.sleeves == "short":
        t = 0.35
        canvas.band(x0 + t * (x1 - x0), y0 + t * (y1 - y0), x1, y1, width * 0.85, skin)
    elif attrs.pattern == "stripes":
        for t in (0.3, 0.6):
            ya = y0 + t * (y1 - y0)
            canvas.band(
                x0 + t * (x1 - x0), ya, x0 + t * (x1 - x0), ya + 0.024 * u, width, attrs.pattern_colour.rgb
            )
    canvas.ellipse(x1, y1 + 0.015 * u, 0.022 * u, 0.026 * u, skin)


def _legs(canvas: Canvas, attrs: PersonAttributes, p: Placement, u: float, top: float) -> None:
    """Legs, lower clothing and shoes."""
    bw = _width(attrs)
    y_hip, y_foot = top + 0.52 * u, top + 0.93 * u
    leg_w = 0.085 * u * bw
    if p.viewpoint == "side":
        tops = (p.cx, p.cx)
        bottoms = (p.cx - p.stride * 0.09 * u, p.cx + p.stride * 0.09 * u)
    else:
        spread = 0.012 * u * abs(p.stride)
        tops = (p.cx - 0.048 * u * bw, p.cx + 0.048 * u * bw)
        bottoms = (tops[0] - spread, tops[1] + spread)
    lower, skin = attrs.lower.rgb, attrs.skin.rgb
    covered_to = {"trousers": 1.0, "shorts": 0.4, "skirt": 0.0}[attrs.lower_type]
    for x_top, x_bot in zip(tops, bottoms):
        canvas.band(x_top, y_hip, x_bot, y_foot, leg_w, skin)
        if covered_to > 0:
            y_end = y_hip + covered_to * (y_foot - y_hip)
            canvas.band(x_top, y_hip, x_top + covered_to * (x_bot - x_top), y_end, leg_w * 1.05, lower)
        forward = 0.035 * u if p.viewpoint == "side" else 0.0
        canvas.rect(
            x_bot - leg_w * 0.6,
            y_foot - 0.01 * u,
            x_bot + leg_w * 0.6 + forward,
            y_foot + 0.045 * u,
            attrs.shoes.rgb,
        )
    half = (0.075 if p.viewpoint == "side" else 0.1) * u * bw
    if attrs.lower_type == "skirt":
        canvas.quad(
            top + 0.47 * u,
            top + 0.72 * u,
            (p.cx - half, p.cx + half),
            (p.cx - 1.5 * half, p.cx + 1.5 * half),
            lower,
        )
    else:
        canvas.quad(
            top + 0.47 * u,
            top + 0.57 * u,
            (p.cx - half, p.cx + half),
            (p.cx - half * 1.05, p.cx + half * 1.05),
            lower,
        )


def _head(canvas: Canvas, attrs: PersonAttributes, p: Placement, u: float, top: float) -> None:
    """Neck, face or back of the head, hair and hat."""
    skin, hair = attrs.skin.rgb, attrs.hair.rgb
    cx, cy = p.cx, top + 0.075 * u
    rx, ry = 0.05 * u, 0.066 * u
    canvas.rect(cx - 0.02 * u, top + 0.12 * u, cx + 0.02 * u, top + 0.17 * u, _shade(skin, 0.9))
    if p.viewpoint == "back":
        canvas.ellipse(cx, cy, rx * 1.05, ry * 1.02, hair)
        if attrs.hair_length == "long":
            canvas.quad(cy, top + 0.27 * u, (cx - rx, cx + rx), (cx - rx * 1.2, cx + rx * 1.2), hair)
    elif p.viewpoint == "front":
        canvas.ellipse(cx, cy - 0.01 * u, rx * 1.08, ry, hair)
        canvas.ellipse(cx, cy + 0.012 * u, rx * 0.92, ry * 0.86, skin)
        if attrs.hair_length == "long":
            for side in (-1, 1):
                canvas.rect(
                    cx + side * rx * 0.75 - 0.018 * u,
                    cy - 0.01 * u,
                    cx + side * rx * 0.75 + 0.018 * u,
                    top + 0.23 * u,
                    hair,
                )
        canvas.ellipse(cx - 0.35 * rx, cy + 0.005 * u, 0.008 * u, 0.006 * u, (30, 25, 25))
        canvas.ellipse(cx + 0.35 * rx, cy + 0.005 * u, 0.008 * u, 0.006 * u, (30, 25, 25))
    else:
        if attrs.hair_length == "long":
            canvas.quad(
                cy, top + 0.25 * u, (cx - rx * 1.1, cx + rx * 0.1), (cx - rx * 1.2, cx - rx * 0.1), hair
            )
        canvas.ellipse(cx + 0.006 * u, cy, rx, ry, skin)
        canvas.ellipse(cx - 0.012 * u, cy - 0.012 * u, rx * 1.0, ry * 0.9, hair)
        canvas.ellipse(cx + 0.6 * rx, cy + 0.003 * u, 0.007 * u, 0.006 * u, (30, 25, 25))
    if attrs.hat:
        hat = attrs.hat_colour.rgb
        canvas.ellipse(cx, top + 0.045 * u, rx * 1.12, 0.045 * u, hat, upper_half=True)
        if p.viewpoint == "side":
            canvas.rect(cx, top + 0.038 * u, cx + rx * 1.9, top + 0.052 * u, _shade(hat, 0.8))
        elif p.viewpoint == "front":
            canvas.rect(cx - rx * 1.05, top + 0.038 * u, cx + rx * 1.05, top + 0.055 * u, _shade(hat, 0.8))


def _worn_bag(
    canvas: Canvas, attrs: PersonAttributes, p: Placement, u: float, top: float, sh: float, waist: float
) -> None:
    """Backpack or shoulder bag: a block on the back, behind the body, or only straps, by viewpoint.

    ``sh`` and ``waist`` are the torso's half-widths at the shoulders and the waist in pixels.
    """
    bw, bag, y_sh = _width(attrs), attrs.bag_colour.rgb, top + 0.15 * u
    if attrs.bag == "backpack":
        if p.viewpoint == "back":
            canvas.rect(p.cx - 0.085 * u * bw, top + 0.18 * u, p.cx + 0.085 * u * bw, top + 0.43 * u, bag)
            canvas.rect(p.cx - 0.05 * u, top + 0.33 * u, p.cx + 0.05 * u, top + 0.41 * u, _shade(bag, 0.75))
        elif p.viewpoint == "side":
            x_back = p.cx - sh
            canvas.rect(x_back - 0.07 * u, top + 0.18 * u, x_back + 0.015 * u, top + 0.43 * u, bag)
            canvas.band(p.cx - 0.02 * u, y_sh, p.cx - 0.01 * u, top + 0.3 * u, 0.02 * u, _shade(bag, 0.8))
        else:
            for s in (-1, 1):
                canvas.band(
                    p.cx + s * 0.075 * u * bw,
                    y_sh,
                    p.cx + s * 0.07 * u * bw,
                    top + 0.36 * u,
                    0.022 * u,
                    bag,
                )
    if attrs.bag == "shoulder bag":
        if p.viewpoint == "side":
            canvas.band(
                p.cx - 0.01 * u,
                y_sh,
                p.cx + 0.02 * u,
                top + 0.45 * u,
                0.016 * u,
                _shade(bag, 0.85),
            )
            canvas.rect(p.cx + 0.03 * u, top + 0.42 * u, p.cx + 0.11 * u, top + 0.54 * u, bag)
        else:
            s = 1 if p.viewpoint == "front" else -1
            canvas.band(
                p.cx - s * 0.1 * u * bw,
                y_sh,
                p.cx + s * 0.1 * u * bw,
                top + 0.45 * u,
                0.016 * u,
                _shade(bag, 0.85),
            )
            x_bag = p.cx + s * (waist + 0.035 * u)
            canvas.rect(x_bag - 0.045 * u, top + 0.42 * u, x_bag + 0.045 * u, top + 0.54 * u, bag)


def draw_person(canvas: Canvas, attrs: PersonAttributes, placement: Placement) -> None:
    """Paint the person described by ``attrs`` onto ``canvas`` at ``placement``.

    Args:
        canvas: the image to paint on (background already drawn).
        attrs: the identity's attributes.
        placement: position, size, viewpoint and gait of this sighting.
    """
    p = placement
    u = p.height * attrs.height_factor
    top = p.top + (p.height - u)  # feet stay on the same ground line whatever the height
    bw = _width(attrs)
    side = p.viewpoint == "side"
    upper, bag = attrs.upper.rgb, attrs.bag_colour.rgb
    y_sh, y_waist = top + 0.15 * u, top + 0.5 * u
    sh, waist = (0.075 if side else 0.13) * u * bw, (0.07 if side else 0.105) * u * bw
    torso_top, torso_bot = (p.cx - sh, p.cx + sh), (p.cx - waist, p.cx + waist)

    if attrs.hair_length == "long" and p.viewpoint == "front":
        canvas.rect(p.cx - 0.065 * u, top + 0.04 * u, p.cx + 0.065 * u, top + 0.2 * u, attrs.hair.rgb)
    if side:  # the far arm swings opposite to the near one
        _arm(canvas, attrs, p.cx, y_sh + 0.02 * u, p.cx - p.stride * 0.07 * u, top + 0.46 * u, u)
    _legs(canvas, attrs, p, u, top)
    canvas.quad(y_sh, y_waist, torso_top, torso_bot, upper)
    canvas.ellipse(p.cx, y_sh + 0.01 * u, sh, 0.025 * u, upper, upper_half=True)
    if attrs.pattern == "stripes":
        _torso_stripes(canvas, y_sh, y_waist, torso_top, torso_bot, u, attrs.pattern_colour.rgb)
    if attrs.pattern == "logo" and p.viewpoint == "front":
        canvas.ellipse(p.cx, top + 0.27 * u, 0.035 * u, 0.035 * u, attrs.pattern_colour.rgb)

    _worn_bag(canvas, attrs, p, u, top, sh, waist)

    if side:
        x_hand = p.cx + p.stride * 0.08 * u
        _arm(canvas, attrs, p.cx, y_sh + 0.02 * u, x_hand, top + 0.46 * u, u)
        hands = [x_hand]
    else:
        swing = 0.01 * u * p.stride
        hands = []
        for s in (-1, 1):
            x0 = p.cx + s * (sh - 0.02 * u)
            x1 = p.cx + s * (sh + 0.01 * u) + s * swing
            _arm(canvas, attrs, x0, y_sh + 0.015 * u, x1, top + 0.46 * u, u)
            hands.append(x1)
    if attrs.bag == "handbag":
        x_hand = hands[-1]
        canvas.band(x_hand, top + 0.47 * u, x_hand, top + 0.5 * u, 0.012 * u, _shade(bag, 0.7))
        canvas.rect(x_hand - 0.04 * u, top + 0.5 * u, x_hand + 0.04 * u, top + 0.58 * u, bag)
    _head(canvas, attrs, p, u, top)
