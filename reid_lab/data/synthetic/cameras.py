"""Camera conditions: what is fixed per camera, what changes per image, and the photometric pipeline.

A :class:`CameraStyle` is drawn once per camera (colour cast, brightness, contrast, background style,
typical distance, viewpoint bias, sensor noise, resolution, JPEG quality). A :class:`ViewConditions` is
drawn per image (viewpoint, scale and crop jitter, gait, lighting gradient, blur, occlusion, clutter).
Cameras differ far more than identities do in raw pixels, which is what makes the synthetic set hard.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from reid_lab.data.synthetic.seeds import Stream, rng_for

VIEWPOINTS = ("front", "back", "side")
BACKGROUND_STYLES = ("windows", "stripes", "bricks", "foliage", "plain")
OCCLUDERS = ("none", "bottom", "side", "person")


@dataclass(frozen=True)
class CameraStyle:
    """Conditions fixed for one camera.

    Attributes:
        camid: 0-based camera index.
        gains: per-channel RGB multipliers (colour cast times brightness).
        contrast: contrast factor around the image mean.
        wall: RGB of the upper background (wall, hedge, shop front), 0-255.
        floor: RGB of the ground, 0-255.
        accent: RGB of the background texture, 0-255.
        horizon: height of the wall / floor boundary as a fraction of the image height.
        background: one of ``BACKGROUND_STYLES``.
        period: texture period as a fraction of the image width.
        scale: typical person height as a fraction of the image height.
        view_probs: probabilities of (front, back, side).
        noise: standard deviation of the sensor noise, in 0-1 intensity units.
        blur: typical Gaussian blur radius in pixels at 128 px height.
        resolution: the camera's effective resolution relative to the output (1.0 = sharp).
        clutter: mean number of clutter objects in the background.
        jpeg_quality: JPEG quality the camera's images are saved with.
    """

    camid: int
    gains: tuple[float, float, float]
    contrast: float
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    accent: tuple[int, int, int]
    horizon: float
    background: str
    period: float
    scale: float
    view_probs: tuple[float, float, float]
    noise: float
    blur: float
    resolution: float
    clutter: float
    jpeg_quality: int


@dataclass(frozen=True)
class ViewConditions:
    """Conditions of one image under one camera.

    Attributes:
        viewpoint: ``"front"``, ``"back"`` or ``"side"``; decides what is visible.
        mirrored: the image is flipped left-right (side views face either way).
        scale: person height as a fraction of the image height.
        dx: horizontal offset of the person, fraction of the image width.
        dy: vertical offset of the person, fraction of the image height (crop jitter).
        stride: gait phase in ``[-1, 1]``; legs and arms swing with it.
        brightness: per-image exposure multiplier.
        gradient: strength of a left-right lighting gradient.
        blur: Gaussian blur radius in pixels at 128 px height.
        occluder: one of ``OCCLUDERS``.
        occlusion: fraction of the person covered by the occluder (height for ``bottom``, width otherwise).
        background_people: number of other people drawn behind the person.
    """

    viewpoint: str
    mirrored: bool
    scale: float
    dx: float
    dy: float
    stride: float
    brightness: float
    gradient: float
    blur: float
    occluder: str
    occlusion: float
    background_people: int

    @property
    def feet_hidden(self) -> bool:
        """The shoes are covered by an obstacle in front of the person."""
        return self.occluder == "bottom" and self.occlusion > 0.12

    @property
    def legs_hidden(self) -> bool:
        """Most of the lower clothing is covered by an obstacle in front of the person."""
        return self.occluder == "bottom" and self.occlusion > 0.38


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in values)


def sample_camera_style(seed: int, camid: int) -> CameraStyle:
    """Draw the fixed conditions of camera ``camid`` (0-based); depends only on ``(seed, camid)``."""
    rng = rng_for(seed, Stream.CAMERA, camid)
    cast = 1.0 + rng.uniform(-0.15, 0.15, size=3)
    brightness = rng.uniform(0.7, 1.2)
    grey = int(rng.integers(70, 180))
    wall = np.clip(grey + rng.integers(-35, 36, size=3), 0, 255)
    accent = 0.75 * wall + 0.25 * rng.integers(20, 236, size=3)
    floor = np.clip(int(rng.integers(60, 160)) + rng.integers(-25, 26, size=3), 0, 255)
    return CameraStyle(
        camid=camid,
        gains=tuple(float(g) for g in cast * brightness),
        contrast=float(rng.uniform(0.7, 1.15)),
        wall=_rgb(wall),
        floor=_rgb(floor),
        accent=_rgb(accent),
        horizon=float(rng.uniform(0.5, 0.75)),
        background=str(rng.choice(BACKGROUND_STYLES)),
        period=float(rng.uniform(0.15, 0.5)),
        scale=float(rng.uniform(0.8, 0.95)),
        view_probs=tuple(float(p) for p in rng.dirichlet([2.0, 2.0, 2.0])),
        noise=float(rng.uniform(0.0, 0.04)),
        blur=float(rng.uniform(0.0, 1.0)),
        resolution=float(rng.choice([1.0, 0.75, 0.5])),
        clutter=float(rng.uniform(0.5, 3.0)),
        jpeg_quality=int(rng.integers(70, 96)),
    )


def sample_view(rng: np.random.Generator, camera: CameraStyle) -> ViewConditions:
    """Draw the conditions of one image taken by ``camera``."""
    viewpoint = VIEWPOINTS[int(rng.choice(3, p=np.asarray(camera.view_probs)))]
    occluder = OCCLUDERS[int(rng.choice(4, p=[0.7, 0.13, 0.1, 0.07]))]
    low, high = {"none": (0.0, 0.0), "bottom": (0.1, 0.5), "side": (0.15, 0.4), "person": (0.2, 0.45)}[
        occluder
    ]
    occlusion = rng.uniform(low, high) if high > 0 else 0.0
    return ViewConditions(
        viewpoint=viewpoint,
        mirrored=bool(rng.random() < 0.5),
        scale=float(np.clip(camera.scale * rng.uniform(0.88, 1.12), 0.6, 1.0)),
        dx=float(rng.normal(0.0, 0.035)),
        dy=float(rng.normal(0.0, 0.03)),
        stride=float(rng.uniform(-1.0, 1.0)),
        brightness=float(rng.uniform(0.8, 1.2)),
        gradient=float(rng.uniform(-0.3, 0.3)),
        blur=float(camera.blur + rng.exponential(0.3)),
        occluder=occluder,
        occlusion=float(occlusion),
        background_people=int(rng.random() < 0.2),
    )


def apply_camera(
    pixels: np.ndarray, camera: CameraStyle, view: ViewConditions, rng: np.random.Generator
) -> np.ndarray:
    """Turn a clean rendering into what ``camera`` records: cast, exposure, lighting, noise, blur, resolution.

    Args:
        pixels: ``(H, W, 3)`` float32 rendering in 0-255.
        camera: the camera's fixed conditions.
        view: this image's conditions.
        rng: the image's generator (for sensor noise).

    Returns:
        ``(H, W, 3)`` uint8 image.
    """
    height, width = pixels.shape[:2]
    if view.mirrored:
        pixels = pixels[:, ::-1]
    ramp = 1.0 + view.gradient * np.linspace(-1.0, 1.0, width, dtype=np.float32)
    gains = np.asarray(camera.gains, dtype=np.float32) * view.brightness
    out = pixels * gains * ramp[None, :, None]
    mean = out.mean()
    out = (out - mean) * camera.contrast + mean
    if camera.noise > 0:
        out += rng.standard_normal(size=out.shape, dtype=np.float32) * np.float32(camera.noise * 255.0)
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    if camera.resolution < 1.0:
        low = (max(4, round(width * camera.resolution)), max(4, round(height * camera.resolution)))
        image = image.resize(low, Image.BILINEAR).resize((width, height), Image.BILINEAR)
    radius = view.blur * height / 128.0
    if radius > 0.15:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(image)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a ``(H, W, 3)`` uint8 image; identical input gives identical bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
