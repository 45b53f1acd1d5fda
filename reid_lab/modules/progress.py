"""Progress lines for runs whose output is not a terminal (logs, CI, ``nohup``, the study runner's stages).

Rich's progress bar draws nothing until a run ends when stdout is not a TTY; with validation every few epochs
that is minutes of silence. :class:`PlainProgress` prints one line every ``every_s`` seconds of training and at
the end of every training epoch::

    [train] epoch 2/8  step 37/78  loss 3.214  61.4 items/s  epoch ETA 0:00:41

It also lowers ``log_every_n_steps`` to the number of batches per epoch when an epoch is shorter (otherwise a
tiny training set logs no training loss at all) and says so.
"""

from __future__ import annotations

import datetime
import time

import lightning as L
import torch


class PlainProgress(L.Callback):
    """One plain progress line per ``every_s`` seconds and per training epoch (see the module docstring)."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = float(every_s)
        self._last = 0.0
        self._start = 0.0
        self._items = 0

    def on_train_start(self, trainer, pl_module) -> None:
        batches = trainer.num_training_batches
        if isinstance(batches, int) and 0 < batches < trainer.log_every_n_steps:
            print(f"[train] log_every_n_steps {trainer.log_every_n_steps} > {batches} batches per epoch: "
                  f"logging every {batches} steps", flush=True)
            trainer.log_every_n_steps = batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        self._items = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        labels = batch.get("pid") if isinstance(batch, dict) else None
        self._items += int(labels.numel()) if isinstance(labels, torch.Tensor) else 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(trainer, batch_idx + 1, now)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._print(trainer, None, time.monotonic())

    def _print(self, trainer, step: int | None, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        total = trainer.num_training_batches
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"[train] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if step is None:
            parts.append(f"done in {datetime.timedelta(seconds=round(elapsed))}")
        else:
            parts.append(f"step {step}/{total}")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{self._items / elapsed:.1f} items/s")
        if step is not None and isinstance(total, int) and step > 0:
            eta = elapsed / step * (total - step)
            parts.append(f"epoch ETA {datetime.timedelta(seconds=round(eta))}")
        print("  ".join(parts), flush=True)
