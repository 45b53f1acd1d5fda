"""One writer per folder: an exclusive lock that names the process holding it and cannot go stale.

A run folder (a training run's logs and checkpoints) or a study folder has one writer at a time: two
processes writing the same ``metrics.csv``, ``checkpoints/`` or study records interleave their files into
something that belongs to neither. :func:`hold_folder_lock` takes an exclusive ``fcntl.flock`` on
``<folder>/.reid_lab.lock`` for the length of a ``with`` block; a second holder, in another process or in this
one, gets :class:`FolderInUse` naming the folder and the pid written into the lock file.

Why ``flock`` on a file that stays in place: the kernel drops the lock when its holder exits, however it exits
(SIGKILL, power loss of a local disk), so a lock left by a killed run is never taken for a live one; the pid in
the file is only for the message. The file is not removed on release: removing it would let a waiter lock the
unlinked file while a third process locks a new one under the same name, and both would "hold" the folder.
POSIX only (``fcntl``), like the rest of the training stack; on network file systems ``flock`` is as good as the
file system's lock support.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderInUse", "hold_folder_lock", "lock_holder"]

LOCK_NAME = ".reid_lab.lock"

log = logging.getLogger(__name__)


class FolderInUse(RuntimeError):
    """Another writer holds ``folder``; ``pid`` is its process id (``None`` when it has not written it yet)."""

    def __init__(self, folder: Path, pid: int | None, what: str = "run"):
        self.folder, self.pid, self.what = Path(folder), pid, what
        holder = f"process {pid}" if pid is not None else "another process"
        mine = " (this process)" if pid == os.getpid() else ""
        super().__init__(
            f"{what} folder {self.folder} is in use by {holder}{mine}: one {what} writes a folder at a time "
            f"(lock file {self.folder / LOCK_NAME}). Wait for it to finish, stop it, or use another folder."
        )


def lock_holder(folder: str | Path) -> int | None:
    """The pid written in ``folder``'s lock file (the last holder, live or not), ``None`` if none is written."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def hold_folder_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``folder`` (created if missing) exclusively for the ``with`` block; yields the folder.

    Args:
        folder: the folder to own (a run's log folder, a study folder).
        what: the word for the folder's owner in messages (``"run"``, ``"study"``).

    Raises:
        FolderInUse: another open lock on the folder exists (another process, or an outer ``with`` of this
            one); nothing is written then. A lock file left by a process that has exited is taken over (and a
            warning names that process).

    Example::

        with hold_folder_lock(study_dir, what="study"):
            ...  # the only writer of study_dir until the block ends
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    # O_CLOEXEC: a program this one starts (wandb's service) must not inherit the lock and outlive the run
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(folder, lock_holder(folder), what) from None
        stale = lock_holder(folder)  # a released lock names nobody: a pid here is a holder that died
        if stale is not None:
            log.warning("%s folder %s: taking over the lock of process %d, which ended without releasing it",
                        what, folder, stale)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)  # released: the file names no holder
            # explicit unlock: forked children (data loader workers) share the descriptor, so closing ours
            # alone would leave the folder locked until they exit
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
