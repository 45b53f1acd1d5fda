"""Instruction pairs in the style of MMEB's training sets (VLM2Vec): ``(query, target, hard negatives)``.

One JSON object per line::

    {"query": {"instruction": "Find the person described: ", "text": "a man in a red coat ..."},
     "target": {"instruction": "Represent the given person image: ", "image": "bounding_box_train/0001_c1_01.jpg"},
     "negatives": [{"instruction": "Represent the given person image: ", "image": "bounding_box_train/0002_c3_04.jpg"}],
     "pid": 1}

Each side is an *item*: an ``instruction`` (may be empty) and a ``text``, an ``image`` (a path relative to the
pairs file's ``image_root``, default its folder) or both, as MMEB mixes them (e.g. an image with a question).
``negatives`` (optional) are hard negatives of the target's kind; ``pid`` (optional) names the identity the pair
is about. :func:`load_pairs` checks every record and names the file, line and key of anything malformed.

:func:`synthetic_pairs` turns the built-in synthetic ReID set into such pairs: caption → person (text-to-person
search), person → person (ReID: another camera's image of the same identity) and person → caption, each with its
own instruction, hard negatives drawn from other identities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def _item(value, where: str, image_root: Path, check_files: bool) -> Item:
    if not isinstance(value, dict):
        raise PairFormatError(f"{where}: expected an object with 'instruction' and 'text' and / or 'image', "
                              f"got {type(value).__name__}")
    unknown = sorted(set(value) - {"instruction", "text", "image"})
    if unknown:
        raise PairFormatError(f"{where}: unknown key(s) {unknown}; an item has instruction, text, image")
    text, image, instruction = value.get("text"), value.get("image"), value.get("instruction", "")
    if text is None and image is None:
        raise PairFormatError(f"{where}: an item needs 'text', 'image' or both")
    for key, v in (("text", text), ("image", image), ("instruction", instruction)):
        if v is not None and not isinstance(v, str):
            raise PairFormatError(f"{where}.{key}: expected a string, got {type(v).__name__}")
    if text is not None and not text.strip():
        raise PairFormatError(f"{where}.text: empty text")
    if image is not None:
        path = image_root / image
        if check_files and not path.is_file():
            raise PairFormatError(f"{where}.image: {path} does not exist")
        image = str(path)
    return Item(instruction=instruction, text=text, image=image)


def load_pairs(path: str | Path, image_root: str | Path | None = None, check_files: bool = True) -> list[PairRecord]:
    """Read a pairs file (JSON lines; see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        PairFormatError: a malformed line (file, line number and key named), or no pair at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise PairFormatError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(raw, dict):
            raise PairFormatError(f"{where}: expected a JSON object per line")
        unknown = sorted(set(raw) - {"query", "target", "negatives", "pid"})
        missing = [k for k in ("query", "target") if k not in raw]
        if unknown or missing:
            raise PairFormatError(f"{where}: " + (f"unknown key(s) {unknown}" if unknown else f"missing {missing}")
                                  + "; a pair has query, target, optional negatives and pid")
        negatives = raw.get("negatives") or []
        if not isinstance(negatives, list):
            raise PairFormatError(f"{where}: negatives must be a list of items")
        pid = raw.get("pid", -1)
        if not isinstance(pid, int):
            raise PairFormatError(f"{where}: pid must be an integer, got {pid!r}")
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


def main(argv: list[str] | None = None) -> int:
    """``reid-lab pairs``: write instruction pairs of a ``reid-lab synth`` set (JSON lines, paths relative to it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="reid-lab pairs", description=main.__doc__)
    parser.add_argument("--root", required=True, help="the synthetic set (holds reid_raw.json)")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--kinds", nargs="+", default=list(PAIR_KINDS), choices=list(PAIR_KINDS))
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pairs", type=int, default=None, help="keep a seeded random sample of this many pairs")
    parser.add_argument("--out", default=None, help="default: <root>/pairs_<split>.jsonl")
    args = parser.parse_args(argv)
    pairs = synthetic_pairs(args.root, tuple(args.kinds), args.negatives, args.split, args.seed)
    if args.max_pairs is not None and args.max_pairs < len(pairs):
        keep = np.sort(np.random.default_rng(args.seed).choice(len(pairs), size=args.max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    out = write_pairs(pairs, args.out or Path(args.root) / f"pairs_{args.split}.jsonl")
    counts = {k: 0 for k in args.kinds}
    for p in pairs:
        q, t = ("text" in p["query"]), ("text" in p["target"])
        counts["caption2person" if q else ("person2caption" if t else "person2person")] += 1
    print(f"wrote {out}: {len(pairs)} pairs ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0
