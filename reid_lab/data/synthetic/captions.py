"""Captions in the CUHK-PEDES style, written from the identity's attributes *and* what the view shows.

What a caption mentions follows the renderer's visibility rules: the shirt logo only from the front, the
backpack as a backpack from the back or side but only as straps from the front, the face only from the
front or side, shoes and lower clothing only when no obstacle covers them. Two captions per image use
different templates and word choices, as CUHK-PEDES has two annotators per image.
"""

from __future__ import annotations

import re

import numpy as np

from reid_lab.data.synthetic.attributes import PersonAttributes
from reid_lab.data.synthetic.cameras import ViewConditions

_BUILD = {"slim": "slim", "average": "", "broad": "heavy-set"}
_HEIGHT = {"short": "short", "average": "", "tall": "tall"}
_TOPS = {
    "long": ("long-sleeved shirt", "sweater", "jacket"),
    "short": ("t-shirt", "short-sleeved shirt", "top"),
}
_BOTTOMS = {"trousers": ("trousers", "pants", "long pants"), "shorts": ("shorts",), "skirt": ("skirt",)}
_SHOES = ("shoes", "sneakers")
_PERSON = ("person", "pedestrian")
_TOKEN = re.compile(r"[a-z0-9]+")


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _subject(attrs: PersonAttributes) -> str:
    words = [w for w in (_HEIGHT[attrs.build_height], _BUILD[attrs.build_width]) if w]
    return " ".join(words + ["person"])


def _hair(attrs: PersonAttributes) -> str:
    return f"{attrs.hair_length} {attrs.hair.name} hair"


def _top(attrs: PersonAttributes, view: ViewConditions, rng: np.random.Generator) -> str:
    phrase = f"{attrs.upper.name} {_choose(rng, _TOPS[attrs.sleeves])}"
    if attrs.pattern == "stripes":
        phrase += f" with {attrs.pattern_colour.name} stripes"
    elif attrs.pattern == "logo" and view.viewpoint == "front":
        phrase += f" with a {attrs.pattern_colour.name} logo on the chest"
    return _article(phrase)


def _bag(attrs: PersonAttributes, view: ViewConditions) -> str | None:
    colour = attrs.bag_colour.name
    if attrs.bag == "backpack":
        if view.viewpoint == "front":
            return f"the {colour} straps of a backpack over the shoulders"
        return f"a {colour} backpack"
    if attrs.bag == "shoulder bag":
        return f"a {colour} bag over one shoulder"
    if attrs.bag == "handbag":
        return f"a {colour} handbag in one hand"
    return None


def _lower(attrs: PersonAttributes, view: ViewConditions, rng: np.random.Generator) -> str | None:
    if view.legs_hidden:
        return None
    noun = _choose(rng, _BOTTOMS[attrs.lower_type])
    phrase = f"{attrs.lower.name} {noun}"
    return phrase if noun.endswith("s") else _article(phrase)


def _shoes(attrs: PersonAttributes, view: ViewConditions, rng: np.random.Generator) -> str | None:
    return None if view.feet_hidden else f"{attrs.shoes.name} {_choose(rng, _SHOES)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:].rstrip(" ,") + "."


def describe(attrs: PersonAttributes, view: ViewConditions, rng: np.random.Generator) -> list[str]:
    """Two different captions of one image.

    Args:
        attrs: the identity's attributes.
        view: the image's conditions, which decide what is visible.
        rng: the caption generator (separate from the image's, so captions never change pixels).

    Returns:
        ``[caption_a, caption_b]``; both always name the upper-clothing colour.
    """
    worn = [_top(attrs, view, rng)]
    lower, shoes = _lower(attrs, view, rng), _shoes(attrs, view, rng)
    worn += [item for item in (lower, shoes) if item]
    if attrs.hat:
        worn.insert(0, f"a {attrs.hat_colour.name} cap")
    bag = _bag(attrs, view)
    seen = {"front": "", "back": "seen from behind, ", "side": "seen from the side, "}[view.viewpoint]

    first = f"{seen}{_article(_subject(attrs))} with {_hair(attrs)} is wearing {_join(worn)}"
    sentences_a = [_sentence(first)]
    if bag:
        sentences_a.append(_sentence(f"the {_choose(rng, _PERSON)} carries {bag}"))
    if view.legs_hidden:
        sentences_a.append("The legs are hidden behind an obstacle.")

    # The second annotator describes bottom-up: shoes, lower, upper, then hair.
    worn_b = [_shoes(attrs, view, rng), _lower(attrs, view, rng), _top(attrs, view, rng)]
    wears = _join([item for item in worn_b if item])
    sentences_b = [_sentence(f"the {_choose(rng, _PERSON)} wears {wears}, and has {_hair(attrs)}")]
    extras = []
    if attrs.hat:
        extras.append(f"{_article(attrs.hat_colour.name)} cap on the head")
    if bag:
        extras.append(bag)
    if extras:
        sentences_b.append(_sentence(f"there is {_join(extras)}"))
    if view.viewpoint != "front":
        sentences_b.append(
            f"The {'back' if view.viewpoint == 'back' else 'side'} of the body faces the camera."
        )
    return [" ".join(sentences_a), " ".join(sentences_b)]


def tokenize(caption: str) -> list[str]:
    """CUHK-PEDES ``processed_tokens``: lower-case words and numbers, punctuation dropped."""
    return _TOKEN.findall(caption.lower())
