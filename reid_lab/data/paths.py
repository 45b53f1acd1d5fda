"""Confinement of the paths that data files name: an annotation, list or pairs file stays inside its root.

Annotation files (CUHK-PEDES JSON, MSMT17 lists, cameras CSVs, pairs JSON lines) are data, often downloaded: a
``file_path`` of ``../../../../etc/passwd`` or ``/etc/hostname`` would otherwise load as an image record, and
whatever reads it later (a loader, ``reid-lab visualize`` embedding files as data URIs) would copy an outside
file. Every such path is checked here before it becomes a record.

The check is lexical (``os.path.normpath``: no absolute path, no ``..`` that climbs out of the root), so a
symbolic link that the layout's owner placed inside the root (an ``imgs`` folder linked to another disk, a
folder of links into MSMT17) keeps working: the file system is the user's, the annotation text is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from reid_lab.data.records import DatasetFormatError


def confined_path(
    root: str | Path, relative: str, where: str, error: type[ValueError] = DatasetFormatError
) -> str:
    """The absolute, normalised path of ``relative`` under ``root``; refuses one that would lie outside it.

    Args:
        root: the folder the data file's paths are relative to (itself trusted: the user's option or layout).
        relative: the path as the data file writes it.
        where: the file and entry, for the message (e.g. ``"cuhkpedes: /d/reid_raw.json: entry 3"``).
        error: the exception type to raise (each format has its own).

    Returns:
        ``normpath(abspath(root) / relative)``, guaranteed to be ``root`` or below it.

    Raises:
        error: ``relative`` is absolute, holds a NUL byte, or climbs out of ``root`` with ``..``; the message
            names ``where``, the path and the root.

    >>> confined_path("/data/imgs", "a/../b.jpg", "entry 0")
    '/data/imgs/b.jpg'
    """
    base = os.path.normpath(os.path.abspath(root))
    expected = f"expected a path relative to {base} that stays inside it (no absolute path, no '..' out of it)"
    if "\0" in relative:
        raise error(f"{where}: path {relative!r} holds a NUL byte; {expected}")
    # isabs misses a Windows drive or UNC path on POSIX; neither is a relative path in any layout.
    drive = len(relative) > 1 and relative[1] == ":"
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or drive:
        raise error(f"{where}: path {relative!r} is absolute; {expected}")
    resolved = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, resolved]) != base:
        raise error(f"{where}: path {relative!r} resolves to {resolved}, outside the root {base}; {expected}")
    return resolved
