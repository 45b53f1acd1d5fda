"""Identity attributes of synthetic people: small palettes, so single attributes collide across identities.

An identity is the *combination* of build, skin, hair, upper and lower clothing (colour, pattern, cut),
shoes, bag and hat. Every palette is small and skewed (black and grey are common, purple is rare), so a
single colour is shared by many identities; on top of that a fraction of identities are *near twins* of an
earlier one that differ in only two attributes. A per-identity shade offset (a few RGB levels) gives a
fine-grained cue that a trained model can pick up and raw pixels under changing light cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from reid_lab.data.synthetic.seeds import Stream, rng_for

# name -> (RGB, sampling weight). Weights are skewed like real street clothing.
UPPER_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((32, 32, 36), 0.20),
    "white": ((228, 228, 222), 0.15),
    "grey": ((128, 128, 132), 0.13),
    "blue": ((45, 75, 185), 0.15),
    "red": ((195, 40, 40), 0.10),
    "green": ((45, 135, 65), 0.10),
    "yellow": ((225, 195, 55), 0.08),
    "purple": ((120, 60, 150), 0.09),
}
LOWER_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((30, 30, 34), 0.30),
    "blue": ((50, 70, 125), 0.25),
    "grey": ((115, 115, 120), 0.15),
    "brown": ((140, 110, 75), 0.12),
    "white": ((222, 222, 215), 0.08),
    "green": ((60, 95, 60), 0.10),
}
PATTERN_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "white": ((235, 235, 235), 0.35),
    "black": ((25, 25, 25), 0.30),
    "red": ((200, 35, 35), 0.15),
    "yellow": ((230, 205, 60), 0.10),
    "blue": ((50, 90, 200), 0.10),
}
HAIR_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((22, 20, 20), 0.45),
    "brown": ((90, 60, 35), 0.30),
    "blonde": ((200, 165, 95), 0.15),
    "grey": ((160, 160, 160), 0.10),
}
SKIN_TONES: dict[str, tuple[tuple[int, int, int], float]] = {
    "light": ((236, 200, 175), 0.35),
    "medium": ((205, 160, 120), 0.30),
    "tan": ((165, 115, 80), 0.20),
    "dark": ((105, 70, 50), 0.15),
}
SHOE_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((25, 25, 25), 0.40),
    "white": ((235, 235, 235), 0.25),
    "brown": ((100, 65, 35), 0.15),
    "grey": ((120, 120, 125), 0.10),
    "red": ((190, 40, 40), 0.10),
}
ACCESSORY_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "black": ((30, 30, 30), 0.35),
    "brown": ((115, 75, 40), 0.20),
    "red": ((185, 35, 45), 0.15),
    "blue": ((40, 70, 170), 0.15),
    "grey": ((125, 125, 130), 0.15),
}
PATTERNS = {"plain": 0.5, "stripes": 0.25, "logo": 0.25}
SLEEVES = {"long": 0.5, "short": 0.5}
LOWER_TYPES = {"trousers": 0.6, "shorts": 0.2, "skirt": 0.2}
HAIR_LENGTHS = {"short": 0.6, "long": 0.4}
BUILD_WIDTHS = {"slim": (0.86, 0.3), "average": (1.0, 0.45), "broad": (1.16, 0.25)}
BUILD_HEIGHTS = {"short": (0.91, 0.25), "average": (1.0, 0.5), "tall": (1.06, 0.25)}
BAGS = {"none": 0.4, "backpack": 0.25, "shoulder bag": 0.2, "handbag": 0.15}
HAT_PROBABILITY = 0.2

NEAR_TWIN_PROBABILITY = 0.15
"""Fraction of identities copied from an earlier identity with two attributes re-drawn."""

SHADE_JITTER = 10
"""Maximum per-identity offset, in RGB levels, added to each palette colour."""

_TWIN_GROUPS = ("upper", "pattern", "lower", "hair", "shoes", "bag", "hat", "build")


@dataclass(frozen=True)
class Colour:
    """A named colour with the identity's own shade of it."""

    name: str
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class PersonAttributes:
    """Everything that defines one synthetic identity's appearance."""

    build_width: str
    build_height: str
    skin: Colour
    hair: Colour
    hair_length: str
    upper: Colour
    sleeves: str
    pattern: str
    pattern_colour: Colour
    lower: Colour
    lower_type: str
    shoes: Colour
    bag: str
    bag_colour: Colour
    hat: bool
    hat_colour: Colour

    @property
    def width_factor(self) -> float:
        """Horizontal scale of the body (1.0 = average build)."""
        return BUILD_WIDTHS[self.build_width][0]

    @property
    def height_factor(self) -> float:
        """Vertical scale of the body (1.0 = average height)."""
        return BUILD_HEIGHTS[self.build_height][0]

    def names(self) -> tuple:
        """The attribute values with colours reduced to their names (shades ignored)."""
        return tuple(
            v.name if isinstance(v, Colour) else v for v in (getattr(self, f.name) for f in fields(self))
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict; colours become ``{"name": ..., "rgb": [r, g, b]}``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = {"name": value.name, "rgb": list(value.rgb)} if isinstance(value, Colour) else value
        return out


_CUMULATIVE: dict[int, tuple[list[str], np.ndarray]] = {}
"""Cumulative weights per palette, keyed by ``id``: the palettes are this module's constants."""


def _pick(rng: np.random.Generator, table: dict) -> str:
    """A name of ``table`` drawn with its weight (the last element of each value)."""
    if id(table) not in _CUMULATIVE:
        weights = np.array([w[-1] if isinstance(w, tuple) else w for w in table.values()], dtype=np.float64)
        _CUMULATIVE[id(table)] = list(table), np.cumsum(weights / weights.sum())
    names, cumulative = _CUMULATIVE[id(table)]
    return names[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(names) - 1)]


def _colour(rng: np.random.Generator, palette: dict[str, tuple[tuple[int, int, int], float]]) -> Colour:
    name = _pick(rng, palette)
    base = np.array(palette[name][0])
    shade = rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, size=3)
    return Colour(name, tuple(int(v) for v in np.clip(base + shade, 0, 255)))


def _redraw(attrs: PersonAttributes, group: str, rng: np.random.Generator) -> PersonAttributes:
    """Re-draw one attribute group of ``attrs`` (used to make near twins)."""
    if group == "upper":
        return replace(attrs, upper=_colour(rng, UPPER_COLOURS), sleeves=_pick(rng, SLEEVES))
    if group == "pattern":
        return replace(attrs, pattern=_pick(rng, PATTERNS), pattern_colour=_colour(rng, PATTERN_COLOURS))
    if group == "lower":
        return replace(attrs, lower=_colour(rng, LOWER_COLOURS), lower_type=_pick(rng, LOWER_TYPES))
    if group == "hair":
        return replace(attrs, hair=_colour(rng, HAIR_COLOURS), hair_length=_pick(rng, HAIR_LENGTHS))
    if group == "shoes":
        return replace(attrs, shoes=_colour(rng, SHOE_COLOURS))
    if group == "bag":
        return replace(attrs, bag=_pick(rng, BAGS), bag_colour=_colour(rng, ACCESSORY_COLOURS))
    if group == "hat":
        return replace(attrs, hat=not attrs.hat, hat_colour=_colour(rng, ACCESSORY_COLOURS))
    if group == "build":
        return replace(attrs, build_width=_pick(rng, BUILD_WIDTHS), build_height=_pick(rng, BUILD_HEIGHTS))
    raise ValueError(f"unknown attribute group {group!r}; expected one of {_TWIN_GROUPS}")


def random_attributes(rng: np.random.Generator) -> PersonAttributes:
    """Draw one identity's attributes independently from the palettes."""
    return PersonAttributes(
        build_width=_pick(rng, BUILD_WIDTHS),
        build_height=_pick(rng, BUILD_HEIGHTS),
        skin=_colour(rng, SKIN_TONES),
        hair=_colour(rng, HAIR_COLOURS),
        hair_length=_pick(rng, HAIR_LENGTHS),
        upper=_colour(rng, UPPER_COLOURS),
        sleeves=_pick(rng, SLEEVES),
        pattern=_pick(rng, PATTERNS),
        pattern_colour=_colour(rng, PATTERN_COLOURS),
        lower=_colour(rng, LOWER_COLOURS),
        lower_type=_pick(rng, LOWER_TYPES),
        shoes=_colour(rng, SHOE_COLOURS),
        bag=_pick(rng, BAGS),
        bag_colour=_colour(rng, ACCESSORY_COLOURS),
        hat=bool(rng.random() < HAT_PROBABILITY),
        hat_colour=_colour(rng, ACCESSORY_COLOURS),
    )


def sample_identities(num_ids: int, seed: int) -> dict[int, PersonAttributes]:
    """Attributes of identities ``1 .. num_ids``; identity ``pid`` depends only on ``(seed, pid)``.

    Args:
        num_ids: how many identities to draw.
        seed: dataset seed.

    Returns:
        ``{pid: attributes}`` with 1-based pids. About ``NEAR_TWIN_PROBABILITY`` of them copy an earlier
        identity and re-draw two attribute groups, so look-alikes exist on purpose.
    """
    identities: dict[int, PersonAttributes] = {}
    for pid in range(1, num_ids + 1):
        rng = rng_for(seed, Stream.ATTRIBUTES, pid)
        attrs = random_attributes(rng)
        if pid > 1 and rng.random() < NEAR_TWIN_PROBABILITY:
            source = identities[int(rng.integers(1, pid))]
            attrs = replace(source, skin=attrs.skin)
            for group in rng.choice(_TWIN_GROUPS, size=2, replace=False):
                for _ in range(20):  # re-draw until the group really differs from the source
                    changed = _redraw(attrs, str(group), rng)
                    if changed.names() != attrs.names():
                        break
                attrs = changed
        identities[pid] = attrs
    return identities
