"""Stage keys: a study stage is reused only when everything it depends on is unchanged.

A key is a SHA-256 over a stage's resolved config, the content of its input files, the keys of the stages
it reads from, and the code version (a hash of the ``reid_lab`` sources), so changing a method from
``bct`` to ``ract``, a weight, an epoch count, the split or the code re-runs that stage and every stage
downstream of it, while an unchanged stage is reused.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import reid_lab


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of every ``reid_lab/**/*.py`` file (path and content)."""
    root = Path(reid_lab.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (an input of a stage)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def stage_key(**parts: Any) -> str:
    """SHA-256 of the JSON of ``parts`` (sorted keys) and the code version."""
    payload = json.dumps({"code": code_version(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
