"""Fault injection for the tests: a callback that kills its own process (SIGKILL, as ``kill -9``)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the training process when ``trainer.global_step`` reaches ``step`` (before that batch runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
