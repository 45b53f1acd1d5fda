"""Training subsets: a JSON file naming the training images a data module uses (an upgrade split's
``old.json`` / ``new.json``, see :mod:`reid_lab.upgrade.split_files`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar


class HasPath(Protocol):
    path: str


R = TypeVar("R", bound=HasPath)


def select_subset(records: Sequence[R], subset_file: str | Path) -> list[R]:
    """The records whose ``path`` the subset file lists, in ``records`` order.

    The file is ``{"paths": [...], ...}``. Every listed path must be in ``records``: a subset written for
    another dataset (or another root) is refused rather than silently trained on a smaller set.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON, no ``paths`` list, or a listed image missing from ``records`` (one is named).
    """
    path = Path(subset_file)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train_subset file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"train_subset file {path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("paths"), list):
        raise ValueError(f"train_subset file {path}: expected a JSON object with a 'paths' list")
    wanted = set(payload["paths"])
    selected = [r for r in records if r.path in wanted]
    missing = wanted - {r.path for r in selected}
    if missing:
        raise ValueError(
            f"train_subset file {path} names {len(missing)} image(s) not in the training split, "
            f"e.g. {sorted(missing)[0]!r}"
        )
    return selected
