"""Instruction pairs in the style of MMEB's training sets (VLM2Vec): ``(query, target, hard negatives)``.

One JSON object per line::

    {"query": {"instruction": "Find the person described: ", "text": "a man in a red coat ..."},
     "target": {"instruction": "Represent the given person image: ", "image": "bounding_box_train/0001_c1_01.jpg"},
     "negatives": [{"instruction": "Represent the given person image: ", "image": "bounding_box_train/0002_c3_04.jpg"}],
     "pid": 1}

Each side is an *item*: an ``instruction`` (may be empty) and a ``text``, an ``image`` (a path relative to the
pairs file's ``image_root``, default its folder) or both, as MMEB mixes them (e.g. an image with a question).
``negatives`` (optional) are hard negatives of the target's kind; ``pid`` (optional) names the identity the pair
is about. :func:`load_pairs` checks every record and names the file, line and key of anything malformed; an
image path may not leave ``image_root`` (a pairs file is data: it never reaches outside its root).

:func:`synthetic_pairs` turns the built-in synthetic ReID set into such pairs: caption → person (text-to-person
search), person → person (ReID: another camera's image of the same identity) and person → caption, each with its
own instruction, hard negatives drawn at random from other identities. ``reid-lab pairs --negative-sampling
mined --features ...`` mines them from a model's embeddings instead (:mod:`reid_lab.data.mining`: the
most similar targets of other identities, skipping those above ``margin`` × the positive's similarity).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reid_lab.data.paths import confined_path

PAIR_KINDS = ("caption2person", "person2person", "person2caption")
INSTRUCTIONS = {
    "caption": "Find the person described: ",
    "person_query": "Find another image of this person: ",
    "person_target": "Represent the given person image: ",
    "describe": "Describe the person in this image: ",
    "caption_target": "Represent the given description: ",
}


@dataclass(frozen=True)
class Item:
    """One side of a pair: an instruction plus a text, an image path, or both."""

    instruction: str = ""
    text: str | None = None
    image: str | None = None

    @property
    def kind(self) -> str:
        """``text``, ``image`` or ``image+text``."""
        return "+".join(k for k, v in (("image", self.image), ("text", self.text)) if v is not None)


@dataclass(frozen=True)
class PairRecord:
    """A query, its target and optional hard negatives (``pid``: the identity, -1 if unknown)."""

    query: Item
    target: Item
    negatives: tuple[Item, ...] = field(default_factory=tuple)
    pid: int = -1


class PairFormatError(ValueError):
    """A pairs file that does not follow the format (the message names file, line and key)."""


ITEM_KEYS = ("instruction", "text", "image")
PAIR_KEYS = ("query", "target", "negatives", "pid")


def _item(value, where: str, image_root: Path, check_files: bool) -> Item:
    expected = "an object with an optional 'instruction' string and a 'text' string, an 'image' path or both"
    if not isinstance(value, dict):
        raise PairFormatError(f"{where}: expected {expected}, got {_json_type(value)}")
    unknown = sorted(set(value) - set(ITEM_KEYS))
    if unknown:
        raise PairFormatError(f"{where}: unknown key(s) {unknown}; an item has {', '.join(ITEM_KEYS)}")
    # A key that is present must hold a string: null is not "absent", it is a malformed file.
    for key in ITEM_KEYS:
        if key in value and not isinstance(value[key], str):
            raise PairFormatError(f"{where}.{key}: expected a string, got {_json_type(value[key])}")
    text, image, instruction = value.get("text"), value.get("image"), value.get("instruction", "")
    if text is None and image is None:
        raise PairFormatError(f"{where}: an item needs 'text', 'image' or both; expected {expected}")
    if text is not None and not text.strip():
        raise PairFormatError(f"{where}.text: empty text")
    if image is not None:
        if not image.strip():
            raise PairFormatError(f"{where}.image: empty path")
        path = confined_path(image_root, image, f"{where}.image", PairFormatError)
        if check_files and not os.path.isfile(path):
            raise PairFormatError(f"{where}.image: {path} does not exist")
        image = path
    return Item(instruction=instruction, text=text, image=image)


def _json_type(value) -> str:
    """The JSON name of ``value``'s type, for messages (``true`` is a boolean, not an integer)."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    if value is None:
        return "null"
    return f"{names.get(type(value), type(value).__name__)} {json.dumps(value)[:40]}"


def _unique_keys(where: str):
    """A ``json`` ``object_pairs_hook`` refusing duplicate keys (``json`` keeps the last one silently)."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise PairFormatError(f"{where}: duplicate key(s) {repeated} in one object; each key once")
        return dict(pairs)

    return hook


def _parse_line(data: bytes, where: str) -> dict:
    """Decode one line of a pairs file to its JSON object, every failure named by ``where`` (file:line)."""
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PairFormatError(
            f"{where}: not UTF-8 text (byte {data[err.start]:#04x} at column {err.start + 1}); "
            "expected a UTF-8 encoded JSON object per line"
        ) from None
    try:
        raw = json.loads(line, object_pairs_hook=_unique_keys(where))
    except json.JSONDecodeError as err:
        raise PairFormatError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
    except ValueError as err:  # e.g. an integer over Python's 4300-digit conversion limit
        if isinstance(err, PairFormatError):
            raise
        raise PairFormatError(f"{where}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PairFormatError(f"{where}: expected a JSON object per line, got {_json_type(raw)}")
    return raw


def load_pairs(path: str | Path, image_root: str | Path | None = None, check_files: bool = True) -> list[PairRecord]:
    """Read a pairs file (JSON lines; see the module docstring).

    Every image path must stay inside ``image_root`` (default: the pairs file's folder): an absolute path or a
    ``..`` that climbs out is refused, so a pairs file can never make a loader read a file outside its root.

    Raises:
        FileNotFoundError: the file does not exist.
        PairFormatError: a malformed line, named as ``file:line`` plus the key: not UTF-8, not JSON, a
            duplicate key, a value of the wrong JSON type (``pid`` an integer, not a boolean; ``negatives`` an
            array; item fields strings), an image outside the root or missing; or no pair at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    # Split bytes on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines() breaks on.
    lines = path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
    for number, data in enumerate(lines, start=1):
        if not data.strip():
            continue
        where = f"{path}:{number}"
        raw = _parse_line(data, where)
        unknown = sorted(set(raw) - set(PAIR_KEYS))
        missing = [k for k in ("query", "target") if k not in raw]
        if unknown or missing:
            raise PairFormatError(f"{where}: " + (f"unknown key(s) {unknown}" if unknown else f"missing {missing}")
                                  + "; a pair has query, target, optional negatives and pid")
        negatives = raw.get("negatives", [])
        if not isinstance(negatives, list):
            raise PairFormatError(
                f"{where}: negatives must be an array of items, got {_json_type(negatives)}"
            )
        pid = raw.get("pid", -1)
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < -1:
            raise PairFormatError(
                f"{where}: pid must be an integer >= 0 (or -1: unknown identity), got {_json_type(pid)}"
            )
        target = _item(raw["target"], f"{where}: target", root, check_files)
        negs = tuple(_item(n, f"{where}: negatives[{i}]", root, check_files) for i, n in enumerate(negatives))
        for i, n in enumerate(negs):
            if n.kind != target.kind:
                raise PairFormatError(f"{where}: negatives[{i}] is {n.kind} but the target is {target.kind}")
        records.append(PairRecord(_item(raw["query"], f"{where}: query", root, check_files), target, negs, pid))
    if not records:
        raise PairFormatError(f"{path}: no pairs")
    return records


def synthetic_pairs(root: str | Path, kinds: tuple[str, ...] = PAIR_KINDS, num_negatives: int = 1,
                    split: str = "train", seed: int = 0) -> list[dict]:
    """Pairs (as JSON-ready dicts, image paths relative to ``root``) from a ``reid-lab synth`` set's captions.

    For every image of ``split``: ``caption2person`` (one of its captions → the image), ``person2person`` (the
    image → an image of the same identity from another camera, when there is one) and ``person2caption`` (the
    image → one of its captions). Hard negatives: ``num_negatives`` targets of other identities.
    """
    unknown = sorted(set(kinds) - set(PAIR_KINDS))
    if unknown:
        raise ValueError(f"unknown pair kind(s) {unknown}; expected some of {PAIR_KINDS}")
    root = Path(root)
    raw = [r for r in json.loads((root / "reid_raw.json").read_text()) if r.get("split") == split]
    if not raw:
        raise ValueError(f"{root / 'reid_raw.json'} has no {split!r} images")
    rng = np.random.default_rng(seed)
    by_pid: dict[int, list[dict]] = {}
    for r in raw:
        by_pid.setdefault(int(r["id"]), []).append(r)

    def camera(r: dict) -> str:
        return Path(r["file_path"]).name.split("_")[1][:2]

    def others(pid: int) -> list[dict]:
        pool = [i for i in range(len(raw)) if int(raw[i]["id"]) != pid]
        return [raw[i] for i in rng.choice(pool, size=num_negatives, replace=False)]

    def person(r: dict, instruction: str) -> dict:
        return {"instruction": instruction, "image": r["file_path"]}

    def caption(r: dict, instruction: str) -> dict:
        return {"instruction": instruction, "text": r["captions"][int(rng.integers(len(r["captions"])))]}

    pairs = []
    for r in raw:
        pid = int(r["id"])
        if "caption2person" in kinds:
            pairs.append({"query": caption(r, INSTRUCTIONS["caption"]),
                          "target": person(r, INSTRUCTIONS["person_target"]),
                          "negatives": [person(o, INSTRUCTIONS["person_target"]) for o in others(pid)], "pid": pid})
        if "person2person" in kinds:
            views = [o for o in by_pid[pid] if camera(o) != camera(r)]
            if views:
                target = views[int(rng.integers(len(views)))]
                pairs.append({"query": person(r, INSTRUCTIONS["person_query"]),
                              "target": person(target, INSTRUCTIONS["person_target"]),
                              "negatives": [person(o, INSTRUCTIONS["person_target"]) for o in others(pid)],
                              "pid": pid})
        if "person2caption" in kinds:
            pairs.append({"query": person(r, INSTRUCTIONS["describe"]),
                          "target": caption(r, INSTRUCTIONS["caption_target"]),
                          "negatives": [caption(o, INSTRUCTIONS["caption_target"]) for o in others(pid)], "pid": pid})
    return pairs


def write_pairs(pairs: list[dict], path: str | Path) -> Path:
    """Write ``pairs`` as JSON lines, atomically."""
    from reid_lab.atomic import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))


def main(argv: list[str] | None = None, load_features: Callable[[str], Any] | None = None) -> int:
    """``reid-lab pairs``: write instruction pairs of a ``reid-lab synth`` set (JSON lines, paths relative to it).

    ``load_features`` reads a feature file (``reid_lab.embedding.features.FeatureSet.load``, passed in by the
    ``reid-lab`` command: feature files live in a layer above this one); needed for ``--negative-sampling mined``.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="reid-lab pairs", description=main.__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the synthetic set (holds reid_raw.json)")
    parser.add_argument("--split", default="train", choices=["train", "test"],
                        help="the split whose identities the pairs are drawn from (default: train)")
    parser.add_argument("--kinds", nargs="+", default=list(PAIR_KINDS), choices=list(PAIR_KINDS),
                        help="pair kinds to write (default: all)")
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per pair")
    parser.add_argument("--negative-sampling", default="random", choices=["random", "mined"],
                        help="random: targets of other identities drawn at random (default); mined: the targets "
                             "most similar to the query under --features, of other identities, after the "
                             "--margin / --skip false-negative guard")
    parser.add_argument("--features", nargs="+", default=None,
                        help="feature files (reid-lab predict) holding every query and target item of the pairs "
                             "(image paths, caption texts), all of one model; e.g. an image and a text file")
    parser.add_argument("--margin", type=float, default=0.95,
                        help="mined: drop candidates more similar than margin x the positive's similarity "
                             "(NV-Retriever TopK-PercPos; default 0.95); a negative value turns it off")
    parser.add_argument("--skip", type=int, default=0, help="mined: also drop the best-ranked N candidates left")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair and negative draws (default: 0)")
    parser.add_argument("--max-pairs", type=int, default=None, help="keep a seeded random sample of this many pairs")
    parser.add_argument("--out", default=None, help="default: <root>/pairs_<split>.jsonl")
    args = parser.parse_args(argv)
    if args.negative_sampling == "mined" and not args.features:
        parser.error("--negative-sampling mined needs --features (feature files of the pairs' items)")
    if args.negative_sampling == "random" and (args.features or args.skip):
        parser.error("--features / --skip apply to --negative-sampling mined")
    pairs = synthetic_pairs(args.root, tuple(args.kinds), args.negatives, args.split, args.seed)
    if args.max_pairs is not None and args.max_pairs < len(pairs):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(pairs), size=args.max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    how = "random negatives"
    if args.negative_sampling == "mined":
        pairs = _mined(pairs, args, load_features)
        how = f"mined negatives (margin {args.margin if args.margin >= 0 else 'off'}, skip {args.skip})"
    out = write_pairs(pairs, args.out or Path(args.root) / f"pairs_{args.split}.jsonl")
    counts = {k: 0 for k in args.kinds}
    for p in pairs:
        q, t = ("text" in p["query"]), ("text" in p["target"])
        counts["caption2person" if q else ("person2caption" if t else "person2person")] += 1
    print(f"wrote {out}: {len(pairs)} pairs ({', '.join(f'{k} {v}' for k, v in counts.items())}), {how}")
    return 0


def _mined(pairs: list[dict], args, load_features: Callable[[str], Any] | None) -> list[dict]:
    """``pairs`` with negatives mined from the feature files of ``args.features``."""
    from reid_lab.data.mining import feature_lookup, item_key, mine_pair_negatives

    if load_features is None:
        raise ValueError("mined negatives need a feature-file reader: run them through the reid-lab command")
    lookup = feature_lookup(load_features(f) for f in args.features)

    def embedding_of(item: dict):
        key = item_key(item, args.root)
        if key not in lookup:
            raise ValueError(f"no embedding of {item.get('image') or item.get('text')!r} in the feature files "
                             f"{args.features}: they must hold every query and target of the pairs")
        return lookup[key]

    return mine_pair_negatives(pairs, embedding_of, args.negatives, skip=args.skip,
                               margin=args.margin if args.margin >= 0 else None)
