"""The ``reid-lab`` command.

``reid-lab fit | validate | test | predict`` is a LightningCLI over :class:`~reid_lab.modules.ReIDModule`
(or any LightningModule given by ``class_path``) and :class:`~reid_lab.data.ReIDDataModule`; YAML building
blocks from ``configs/`` are combined with repeated ``--config`` (later files override earlier ones) and
``${...}`` interpolation is resolved after merging (omegaconf+ mode). The project's own subcommands
(``synth``, ``upgrade``, ...) are plain argparse programs dispatched before LightningCLI starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import jsonargparse
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from reid_lab.embedding.features import FeatureWriter

jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "reid_lab", "save_dir": "runs", "offline": True},
}
DEFAULT_CALLBACKS = [
    {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "monitor": "val/mAP",
            "mode": "max",
            "save_last": True,
            "filename": "epoch{epoch:03d}-mAP{val/mAP:.2f}",
            "auto_insert_metric_name": False,
        },
    },
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "epoch"}},
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
]


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved ``config.yaml`` next to the run and pushes it into the logger's hyperparameters."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


class ReIDLabCLI(LightningCLI):
    """LightningCLI with omegaconf+ interpolation, ``num_classes`` linked from the data, a feature writer."""

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
    from reid_lab.modules.reid import ReIDModule

    os.environ.setdefault("WANDB_SILENT", "true")
    return ReIDLabCLI(
        ReIDModule,
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


def _synth(argv: list[str]) -> int:
    from reid_lab.data.synthetic import main

    return main(argv)


def _upgrade(argv: list[str]) -> int:
    from reid_lab.studies.study import main

    return main(argv)


def _index(argv: list[str]) -> int:
    from reid_lab.retrieval.cli import main

    return main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"synth": _synth, "upgrade": _upgrade, "index": _index}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reid-lab`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(SUBCOMMANDS[argv[0]](argv[1:]) or 0)
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
