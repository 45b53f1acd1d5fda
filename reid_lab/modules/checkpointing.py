"""Checkpoint selection keyed by the module: each embedding module names its own validation metric."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class EmbeddingCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``monitor`` (and file name) default to the module's ``monitor`` key.

    ``ReIDModule`` selects on ``val/mAP``; a text-to-image module may select on ``val/R1``. An explicit
    ``monitor`` argument wins. Selection is ``mode="max"`` unless the module says ``monitor_mode = "min"``.

    ``last.ckpt`` is written at the end of every training epoch, whatever the validation frequency
    (``ModelCheckpoint`` alone writes it only when it validates, so a run with ``check_val_every_n_epoch: 8``
    killed in epoch 7 lost everything).
    """

    def __init__(self, dirpath: str | None = None, monitor: str | None = None, mode: str = "max",
                 filename: str | None = None, save_last: bool = True, save_top_k: int = 1,
                 auto_insert_metric_name: bool = False, **kwargs) -> None:
        self._monitor_from_module = monitor is None
        self._filename_from_module = filename is None
        super().__init__(dirpath=dirpath, monitor=monitor, mode=mode, filename=filename, save_last=save_last,
                         save_top_k=save_top_k, auto_insert_metric_name=auto_insert_metric_name, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        monitor = getattr(pl_module, "monitor", None)
        if self._monitor_from_module and monitor:
            self.monitor = monitor
            if getattr(pl_module, "monitor_mode", "max") != self.mode:
                raise ValueError(f"the module selects checkpoints by {monitor} in mode "
                                 f"{pl_module.monitor_mode!r}; give EmbeddingCheckpoint(mode=...) to match")
        if self._filename_from_module and self.monitor:
            short = self.monitor.split("/")[-1]
            self.filename = f"epoch{{epoch:03d}}-{short}{{{self.monitor}:.2f}}"
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return  # this epoch's state is on disk already
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step
