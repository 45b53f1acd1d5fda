"""Split files: an upgrade split saved as ``old.json`` / ``new.json`` (the data module's ``train_subset``
format) plus ``split.json``, so a study can always be reproduced (OpenCompatible issue #4: the splits of the
public code could not be reproduced)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reid_lab.atomic import atomic_write_json
from reid_lab.data.records import ImageRecord
from reid_lab.upgrade.splits import SPLIT_FORMAT_VERSION, UpgradeSplit, check_fraction, check_kind, check_seed

__all__ = ["load_split", "save_split"]


# ---------------------------------------------------------------------------------------------- files


def _side_payload(split: UpgradeSplit, side: str, records: list[ImageRecord]) -> dict[str, Any]:
    return {
        "paths": [r.path for r in records],
        "pids": [r.pid for r in records],
        "camids": [r.camid for r in records],
        "side": side,
        "kind": split.kind,
        "old_fraction": split.old_fraction,
        "seed": split.seed,
        "num_ids": len({r.pid for r in records}),
        "num_images": len(records),
    }


def _split_payloads(split: UpgradeSplit) -> dict[str, dict[str, Any]]:
    summary = split.summary()
    return {
        "old": _side_payload(split, "old", split.old),
        "new": _side_payload(split, "new", split.new),
        "split": {
            "format_version": SPLIT_FORMAT_VERSION,
            **summary,
            "files": {"old": "old.json", "new": "new.json"},
            "dropped": {
                "paths": [r.path for r in split.dropped],
                "pids": [r.pid for r in split.dropped],
                "camids": [r.camid for r in split.dropped],
            },
        },
    }


def save_split(split: UpgradeSplit, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write ``old.json``, ``new.json`` and ``split.json`` into ``out_dir`` (atomically, one file at a time).

    ``old.json`` / ``new.json`` are ``train_subset`` files of :class:`~reid_lab.data.datamodule.ReIDDataModule`:
    ``{"paths": [...], "pids": [...], "camids": [...], "side", "kind", "old_fraction", "seed", "num_ids",
    "num_images"}``. ``split.json`` holds the parameters, :meth:`UpgradeSplit.summary` and the dropped images;
    it is written last, so its presence marks a complete split.

    Saving the identical split again changes nothing. Saving a different split into a folder that holds one
    raises, unless ``overwrite=True``, so a study's split cannot change under it.

    Args:
        split: the split to save.
        out_dir: folder to write into (created if missing).
        overwrite: replace a different split already saved there.

    Returns:
        ``{"old": path, "new": path, "split": path}``.

    Raises:
        FileExistsError: ``out_dir`` holds a different split and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payloads = _split_payloads(split)
    paths = {name: out_dir / f"{name}.json" for name in payloads}
    stale = []
    for name, path in paths.items():
        if path.exists():
            try:
                existing = json.loads(path.read_text())
            except json.JSONDecodeError:
                existing = None
            if existing != payloads[name]:
                stale.append(name)
        else:
            stale.append(name)
    conflicts = [name for name in stale if paths[name].exists()]
    if conflicts and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a different upgrade split ({', '.join(f'{n}.json' for n in conflicts)} "
            f"differ from kind={split.kind!r}, old_fraction={split.old_fraction}, seed={split.seed}); "
            "use another folder or pass overwrite=True"
        )
    if stale and paths["split"].exists():
        # Remove the completion marker first: a crash mid-way must not leave a complete-looking mixed split.
        paths["split"].unlink()
        stale = sorted(set(stale) | {"split"}, key=list(payloads).index)
    for name in stale:
        atomic_write_json(paths[name], payloads[name])
    return paths


def _records_from(payload: Mapping[str, Any], where: str) -> list[ImageRecord]:
    try:
        paths, pids, camids = payload["paths"], payload["pids"], payload["camids"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: expected an object with 'paths', 'pids' and 'camids' lists") from err
    if not (isinstance(paths, list) and isinstance(pids, list) and isinstance(camids, list)):
        raise ValueError(f"{where}: 'paths', 'pids' and 'camids' must be lists")
    if not len(paths) == len(pids) == len(camids):
        raise ValueError(
            f"{where}: 'paths', 'pids' and 'camids' have different lengths ({len(paths)}, {len(pids)}, "
            f"{len(camids)})"
        )
    return [ImageRecord(str(p), int(i), int(c)) for p, i, c in zip(paths, pids, camids)]


def load_split(out_dir: str | os.PathLike) -> UpgradeSplit:
    """Read a split written by :func:`save_split`.

    Args:
        out_dir: the folder holding ``old.json``, ``new.json`` and ``split.json``.

    Returns:
        The :class:`UpgradeSplit` (equal to the one saved).

    Raises:
        FileNotFoundError: a file is missing (``split.json`` missing means the save did not finish).
        ValueError: a file is not valid JSON, or its counts disagree with its contents.
    """
    out_dir = Path(out_dir)
    payloads: dict[str, Any] = {}
    for name in ("split", "old", "new"):
        path = out_dir / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; expected a split written by save_split()")
        try:
            payloads[name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    meta = payloads["split"]
    if not isinstance(meta, dict):
        raise ValueError(f"{out_dir / 'split.json'}: expected a JSON object")
    for key in ("kind", "old_fraction", "seed", "dropped"):
        if key not in meta:
            raise ValueError(f"{out_dir / 'split.json'}: missing key {key!r}")
    split = UpgradeSplit(
        old=_records_from(payloads["old"], str(out_dir / "old.json")),
        new=_records_from(payloads["new"], str(out_dir / "new.json")),
        kind=check_kind(meta["kind"]),
        old_fraction=check_fraction(meta["old_fraction"], "old_fraction", allow_one=False),
        seed=check_seed(meta["seed"]),
        dropped=_records_from(meta["dropped"], f"{out_dir / 'split.json'} 'dropped'"),
    )
    expected = _split_payloads(split)
    for name in ("old", "new", "split"):
        if payloads[name] != expected[name]:
            differing = sorted(
                k for k in set(payloads[name]) | set(expected[name])
                if payloads[name].get(k) != expected[name].get(k)
            )
            raise ValueError(
                f"{out_dir / (name + '.json')} disagrees with the rest of the split in {', '.join(differing)}; "
                "the folder was edited or mixed with another split"
            )
    return split


