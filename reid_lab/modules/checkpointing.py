"""Checkpoint selection keyed by the module, and never on test data unless the user asks for it.

Each embedding module names its own validation key (``val/i2i/mAP``, ``val/t2i/R1``, ``val/pairs/P@1``: the
protocol is part of the key). What that key is measured on comes from the data module
(``validation_source()``): held-out identities or a dataset's own val split, or the test split. On the test
split, the field's convention holds: every training identity trains, the test split is monitored and the run
keeps its *last* epoch; choosing a "best" epoch there reads the test data and would make its numbers
optimistic, so :class:`EmbeddingCheckpoint` does it only with ``select_on_test: true`` (and a warning).
Every fit and validate run prints one line saying what it validates on and which checkpoint it keeps::

    validation (val/i2i/*): the test query / gallery of market1501 (the field's convention: ...);
    checkpoint: last epoch only (last.ckpt), none selected on test data (select_on_test: true would)

Selected checkpoints are named ``epoch004-val_i2i_mAP=56.39.ckpt``: the epoch counted from 1 (as the
``[train] epoch 4/12`` and ``[epoch 4/12] val/i2i: ...`` lines count it), then the key and its value
(:func:`parse_checkpoint_name` reads them back).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, NamedTuple

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

# Metric names of the retrieval protocols, as keys carried them before they named their protocol.
LEGACY_METRICS = ("R1", "R5", "R10", "mAP", "mINP")
EPOCH_NUMBER = "epoch_number"  # the candidate the file name template reads: the epoch counted from 1
_NAME = re.compile(r"^epoch(?P<epoch>\d+)-(?P<metric>[^=]+)=(?P<value>[-+]?(?:\d+(?:\.\d*)?|nan|inf))"
                   r"(?:-v\d+)?\.ckpt$")


def current_key(key: str, tag: str) -> str:
    """The key that replaced a legacy metric key (before keys named their protocol), else ``key`` unchanged.

    ``tag`` is the protocol the module validates under (``i2i``, ``t2i``; ``P@1`` always maps to ``pairs``).

    >>> current_key("val/mAP", "i2i"), current_key("val/cross/R1", "t2i"), current_key("val/P@1", "t2i")
    ('val/i2i/mAP', 'val/cross/t2i/R1', 'val/pairs/P@1')
    >>> current_key("val/i2i/mAP", "i2i")
    'val/i2i/mAP'
    """
    parts = key.split("/")
    if len(parts) == 2 and parts[0] in ("val", "test") and parts[1] == "P@1":
        return f"{parts[0]}/pairs/P@1"
    if len(parts) == 2 and parts[0] in ("val", "test") and parts[1] in LEGACY_METRICS:
        return f"{parts[0]}/{tag}/{parts[1]}"
    if len(parts) == 3 and parts[:2] == ["val", "cross"] and parts[2] in LEGACY_METRICS:
        return f"val/cross/{tag}/{parts[2]}"
    return key


def checkpoint_filename(monitor: str) -> str:
    """The file name template of a checkpoint selected on ``monitor``: ``epoch004-val_i2i_mAP=56.39``.

    >>> checkpoint_filename("val/pairs/P@1")
    'epoch{epoch_number:03d}-val_pairs_P@1={val/pairs/P@1:.2f}'
    """
    return f"epoch{{{EPOCH_NUMBER}:03d}}-{monitor.replace('/', '_')}={{{monitor}:.2f}}"


class CheckpointName(NamedTuple):
    """What a selected checkpoint's file name says: the epoch (from 1), the key (``/`` as ``_``), its value."""

    epoch: int
    metric: str
    value: float


def parse_checkpoint_name(name: str) -> CheckpointName | None:
    """Read back a name written by :func:`checkpoint_filename` (with Lightning's ``-v1`` suffix, if any);
    ``None`` for any other name (``last.ckpt``, names before metric and value were separated).

    >>> parse_checkpoint_name("epoch003-val_i2i_mAP=56.39.ckpt")
    CheckpointName(epoch=3, metric='val_i2i_mAP', value=56.39)
    >>> parse_checkpoint_name("epoch000-R10.66.ckpt") is None
    True
    """
    match = _NAME.match(name)
    if match is None:
        return None
    return CheckpointName(int(match["epoch"]), match["metric"], float(match["value"]))


def validation_source(trainer) -> tuple[bool | None, str]:
    """``(is_test, description)`` of what validation ranks in ``trainer``'s run; ``is_test`` is ``None`` when
    unknown (a data module that does not say, loaders given directly) or when nothing is validated."""
    if trainer.limit_val_batches == 0:
        return None, "none (limit_val_batches: 0)"
    datamodule = getattr(trainer, "datamodule", None)
    describe = getattr(datamodule, "validation_source", None)
    if describe is None:
        what = type(datamodule).__name__ if datamodule is not None else "the loaders given to fit"
        return None, f"the validation loader of {what} (it does not say what it holds)"
    source = describe()
    return bool(source.is_test), source.description


class EmbeddingCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``monitor`` (and file name) default to the module's ``monitor`` key, and
    which never selects a checkpoint on test data unless told to (see the module docstring).

    ``ReIDModule`` selects on ``val/i2i/mAP``; a text-to-image module on ``val/t2i/R1``. An explicit
    ``monitor`` argument wins; a legacy key (``val/mAP``, ``val/cross/mAP``, ``val/P@1``) is mapped to the key
    that replaced it, with a warning. Selection is ``mode="max"`` unless the module says
    ``monitor_mode = "min"``.

    ``last.ckpt`` is written at the end of every training epoch, whatever the validation frequency
    (``ModelCheckpoint`` alone writes it only when it validates, so a run with ``check_val_every_n_epoch: 8``
    killed in epoch 7 lost everything).

    Args:
        select_on_test: when validation ranks the test split (no held-out identities, no val split), keep the
            best checkpoint by the monitored key anyway. Off by default: the run then keeps ``last.ckpt`` only,
            as the field reports its numbers. With it on, a warning says that the selected checkpoint's test
            numbers are optimistic.
        dirpath / monitor / mode / filename / save_last / save_top_k / auto_insert_metric_name / kwargs:
            ``ModelCheckpoint``'s; a ``filename`` template may use ``{epoch_number}`` (the epoch counted from 1,
            as the printed lines count it; Lightning's ``{epoch}`` counts from 0).
    """

    def __init__(self, dirpath: str | None = None, monitor: str | None = None, mode: str = "max",
                 filename: str | None = None, save_last: bool = True, save_top_k: int = 1,
                 auto_insert_metric_name: bool = False, select_on_test: bool = False, **kwargs) -> None:
        self._monitor_from_module = monitor is None
        self._filename_from_module = filename is None
        self.select_on_test = bool(select_on_test)
        self._save_top_k_asked = save_top_k
        super().__init__(dirpath=dirpath, monitor=monitor, mode=mode, filename=filename, save_last=save_last,
                         save_top_k=save_top_k, auto_insert_metric_name=auto_insert_metric_name, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        monitor = getattr(pl_module, "monitor", None)
        if self._monitor_from_module and monitor:
            self.monitor = monitor
            if getattr(pl_module, "monitor_mode", "max") != self.mode:
                raise ValueError(f"the module selects checkpoints by {monitor} in mode "
                                 f"{pl_module.monitor_mode!r}; give EmbeddingCheckpoint(mode=...) to match")
        if self.monitor:
            self.monitor = self._current_monitor(self.monitor, pl_module)
        if self._filename_from_module and self.monitor:
            self.filename = checkpoint_filename(self.monitor)
        if stage in ("fit", "validate"):
            self._choose_and_announce(trainer, pl_module, stage)
        super().setup(trainer, pl_module, stage)

    @staticmethod
    def _current_monitor(monitor: str, pl_module) -> str:
        tag = getattr(pl_module, "eval_tag", None)
        new = current_key(monitor, tag) if isinstance(tag, str) else monitor
        if new != monitor:
            warnings.warn(f"EmbeddingCheckpoint monitor {monitor!r} is a legacy key: metric keys now name their "
                          f"protocol, and {type(pl_module).__name__} logs it as {new!r}. Selecting on {new!r}; "
                          "write that key in the config.", FutureWarning, stacklevel=3)
        return new

    def _choose_and_announce(self, trainer, pl_module, stage: str) -> None:
        """Keep ``last.ckpt`` only when validation ranks test data (unless ``select_on_test``), and print the
        run's validation source and checkpoint rule."""
        is_test, source = validation_source(trainer)
        tag = getattr(pl_module, "eval_tag", None)
        where = f"validation{f' (val/{tag}/*)' if isinstance(tag, str) else ''}: {source}"
        if is_test:
            where += " (the field's convention: all training data trains, numbers comparable with published ones)"
        checkpoint = None
        if stage == "fit":
            self.save_top_k = self._save_top_k_asked
            on_test = bool(is_test) and bool(self.monitor) and str(self.monitor).startswith("val/")
            if on_test and not self.select_on_test:
                self.save_top_k = 0
                checkpoint = "last epoch only (last.ckpt), none selected on test data (select_on_test: true would)"
            elif self.save_top_k == 0 or not self.monitor or trainer.limit_val_batches == 0:
                checkpoint = "last epoch (last.ckpt)" if self.save_last else "none"
            elif on_test:
                checkpoint = (f"best {self.monitor} ON THE TEST SPLIT (select_on_test: true) and last.ckpt: the "
                              "selected checkpoint's test numbers are optimistic")
                if trainer.is_global_zero:
                    warnings.warn(f"EmbeddingCheckpoint(select_on_test=True) chooses the best checkpoint by "
                                  f"{self.monitor} on {source}: its test numbers read the data it was chosen on and "
                                  "are optimistic. Hold out validation identities (val_fraction / val_subset) for "
                                  "an honest choice.", UserWarning, stacklevel=2)
            else:
                held = "held-out data" if is_test is False else "this validation data"
                checkpoint = f"best {self.monitor} (selected on {held}) and last.ckpt"
        if trainer.is_global_zero:
            print(where if checkpoint is None else f"{where}; checkpoint: {checkpoint}", flush=True)

    def _monitor_candidates(self, trainer) -> dict[str, Any]:
        candidates = super()._monitor_candidates(trainer)
        # a checkpoint is written after its epoch's training and validation: the epoch the printed lines showed
        candidates[EPOCH_NUMBER] = torch.tensor(trainer.current_epoch + 1)
        return candidates

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return  # this epoch's state is on disk already
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step
