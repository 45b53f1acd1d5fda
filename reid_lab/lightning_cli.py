"""``reid-lab fit | validate | test | predict``: the LightningCLI over the embedding modules.

A LightningCLI over :class:`~reid_lab.modules.base.EmbeddingModule` subclasses (``ReIDModule`` by default,
any other by ``class_path``) and :class:`~reid_lab.data.ReIDDataModule`; YAML building blocks from
``configs/`` are combined with repeated ``--config`` (later files override earlier ones) and ``${...}``
interpolation is resolved after merging (omegaconf+ mode). It sits below the study runner (which trains
every stage through it) and the ``reid-lab`` entry point (:mod:`reid_lab.cli`).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import jsonargparse
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from reid_lab.atomic import atomic_write_text
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.features import FeatureWriter
from reid_lab.modules.base import EmbeddingModule
from reid_lab.modules.checkpoint_io import AtomicCheckpointIO
from reid_lab.modules.guards import DivergenceGuard
from reid_lab.modules.progress import PlainProgress

jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.WandbLogger",
    "init_args": {"project": "reid_lab", "save_dir": "runs", "offline": True},
}
DEFAULT_CALLBACKS = [
    {"class_path": "reid_lab.modules.checkpointing.EmbeddingCheckpoint"},  # monitor: the module's key
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "epoch"}},
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
    {"class_path": "reid_lab.modules.guards.DivergenceGuard"},  # NaN / exploding loss stops the run
]


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config next to its own run, never over an existing file, and into the logger.

    The file is ``<save_dir>/<name>/<version>/config.<stage>.yaml`` (the folder that also holds the run's
    checkpoints) or, without a logger, ``<default_root_dir>/run_configs/<stage>-<time>.yaml``; a name already
    taken gets a numbered suffix. (Lightning's own callback writes ``config.yaml`` into the logger's shared
    ``save_dir``, or the working folder without a logger, over whatever file is there.)
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            path = _free_path(_config_path(trainer, stage))
            atomic_write_text(path, self.parser.dump(self.config, skip_none=False))
            self.config_path = path
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


def _config_path(trainer, stage) -> Path:
    stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
    logger = trainer.logger
    version = getattr(logger, "version", None) if logger is not None else None
    if version is not None:
        root = Path(logger.save_dir or trainer.default_root_dir)
        name = logger.name or ""
        return root / str(name) / (version if isinstance(version, str) else f"version_{version}") / f"config.{stage}.yaml"
    # not "configs/": run from the project root, that is where the project's own config files live
    return Path(trainer.default_root_dir) / "run_configs" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"


def _free_path(path: Path) -> Path:
    """``path``, or ``<stem>-1<suffix>``, ``-2`` ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


RANDOM_WEIGHTS = "random"


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

    def before_instantiate_classes(self) -> None:
        """``fit / test / validate --ckpt_path``: log into the checkpoint's own logger run (same run id), so its
        checkpoint folder and top-k state are the same ones and test metrics land next to the training curves
        (offline: a second run folder with the same id, which ``wandb sync`` appends to the run) instead of a
        new run, and Lightning does not warn that the checkpoint dirpath changed."""
        if self.subcommand not in ("fit", "test", "validate"):
            return
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(str(ckpt_path)).is_file():
            return
        run = (read_checkpoint(ckpt_path).get("run") or {})
        logger = config.get("trainer", {}).get("logger")
        if not run.get("version") or not logger or not hasattr(logger, "get"):
            return
        init_args = logger.get("init_args")
        if run.get("logger") == str(logger.get("class_path", "")).rsplit(".", 1)[-1] and init_args is not None:
            if "id" in init_args and init_args.get("id") is None:
                init_args["id"] = run["version"]
                verb = "resuming" if self.subcommand == "fit" else "logging into"
                print(f"reid-lab {self.subcommand}: {verb} logger run {run['version']} of {ckpt_path}")

    # ``test`` / ``predict`` without weights would report numbers of a random initialisation: refuse unless
    # the user says so with ``--ckpt_path random``.
    def before_test(self) -> None:
        self._require_checkpoint()

    def before_predict(self) -> None:
        self._require_checkpoint()

    def before_validate(self) -> None:
        self._require_checkpoint()

    def _require_checkpoint(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == RANDOM_WEIGHTS:
            config["ckpt_path"] = None
            print(f"reid-lab {self.subcommand}: --ckpt_path {RANDOM_WEIGHTS}: the model's initial weights are used")
            return
        if config.get("ckpt_path") is None:
            raise SystemExit(
                f"reid-lab {self.subcommand}: no --ckpt_path: this would {self.subcommand} the model's initial "
                f"(untrained) weights. Pass --ckpt_path <checkpoint>, or --ckpt_path {RANDOM_WEIGHTS} to do so "
                "on purpose."
            )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Our callers (``reid-lab``, the study runner) always pass the whole command line as ``args``;
        # Lightning warns whenever ``sys.argv`` is non-empty as well, i.e. on every run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # Checkpoints are written atomically unless a config brings its own checkpoint plugin.
        plugins = config.get("plugins")
        plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, list | tuple) else [plugins])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": [*plugins, AtomicCheckpointIO()]}
        # The divergence guard stays on when a config lists its own callbacks (which replaces the defaults);
        # a config that lists a DivergenceGuard configures it (``explosion_factor: null`` turns that check off).
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if not any(isinstance(c, DivergenceGuard) for c in [*listed, *callbacks]):
            callbacks = [*callbacks, DivergenceGuard()]
        # Output to a file or a pipe: Rich draws nothing until the end; print plain progress lines instead.
        if not sys.stdout.isatty() and not any(isinstance(c, PlainProgress) for c in [*listed, *callbacks]):
            callbacks = [*callbacks, PlainProgress()]
        return super()._instantiate_trainer(config, callbacks)


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> ReIDLabCLI:
    """Build (and by default run) the LightningCLI; ``args`` replaces ``sys.argv[1:]``."""
    os.environ.setdefault("WANDB_SILENT", "true")
    return ReIDLabCLI(
        EmbeddingModule,
        LightningDataModule,  # any data module with num_classes: ReIDDataModule, TextImageDataModule, ...
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
