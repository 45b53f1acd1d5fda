"""Checkpoint files written atomically: a killed save leaves the previous checkpoint, never a truncated one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from reid_lab.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with the write done by :func:`reid_lab.atomic.atomic_torch_save`
    (temporary file in the same folder, ``fsync``, ``os.replace``). Lightning's own writer serialises to
    memory first but then writes the destination file in place, so a kill mid-write truncates
    ``last.ckpt`` and the run can no longer resume."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, Path(path))
