"""``reid-lab fit | validate | test | predict``: the LightningCLI over the embedding modules.

A LightningCLI over :class:`~reid_lab.modules.base.EmbeddingModule` subclasses (``ReIDModule`` by default,
any other by ``class_path``) and :class:`~reid_lab.data.ReIDDataModule`; YAML building blocks from
``configs/`` are combined with repeated ``--config`` (later files override earlier ones) and ``${...}``
interpolation is resolved after merging (omegaconf+ mode). It sits below the study runner (which trains
every stage through it) and the ``reid-lab`` entry point (:mod:`reid_lab.cli`).
"""

from __future__ import annotations

import os

import jsonargparse
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from reid_lab.embedding.features import FeatureWriter
from reid_lab.modules.base import EmbeddingModule

jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "reid_lab", "save_dir": "runs", "offline": True},
}
DEFAULT_CALLBACKS = [
    {"class_path": "reid_lab.modules.checkpointing.EmbeddingCheckpoint"},  # monitor: the module's key
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "epoch"}},
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
]


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved ``config.yaml`` next to the run and pushes it into the logger's hyperparameters."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


class ReIDLabCLI(LightningCLI):
    """LightningCLI with omegaconf+ interpolation, ``num_classes`` linked from the data, a feature writer.

    Every module class used here takes ``num_classes`` (0: no classifier), so one link serves them all; checkpoints are selected by the module's own ``monitor`` key (:class:`EmbeddingCheckpoint`).
    """

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("parser_mode", "omegaconf+")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # Defaults a config can replace: wandb offline, checkpoints on val/mAP, rich progress, our PK sampler.
        parser.set_defaults({
            "trainer.logger": DEFAULT_LOGGER,
            "trainer.callbacks": DEFAULT_CALLBACKS,
            "trainer.use_distributed_sampler": False,
        })
        parser.add_lightning_class_args(FeatureWriter, "predict_writer")


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> ReIDLabCLI:
    """Build (and by default run) the LightningCLI; ``args`` replaces ``sys.argv[1:]``."""
    from reid_lab.data.datamodule import ReIDDataModule

    os.environ.setdefault("WANDB_SILENT", "true")
    return ReIDLabCLI(
        EmbeddingModule,
        ReIDDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
