"""``reid-lab fit | validate | test | predict``: the LightningCLI over the embedding modules.

A LightningCLI over :class:`~reid_lab.modules.base.EmbeddingModule` subclasses (``ReIDModule`` by default,
any other by ``class_path``) and :class:`~reid_lab.data.ReIDDataModule`; YAML building blocks from
``configs/`` are combined with repeated ``--config`` (later files override earlier ones) and ``${...}``
interpolation is resolved after merging (omegaconf+ mode). It sits below the study runner (which trains
every stage through it) and the ``reid-lab`` entry point (:mod:`reid_lab.cli`).

Run folders have one writer. ``fit``, ``validate`` and ``test`` hold a lock (:mod:`reid_lab.run_lock`) on
the logger's run folder ``<save_dir>/<name>/<version>`` (and, for ``fit``, on a checkpoint ``dirpath`` outside
it) for the whole run: a second run on the same folder ends in :class:`~reid_lab.run_lock.FolderInUse`
naming the process that holds it. A ``fit`` that is not a resume refuses (:class:`RunFolderTaken`, before
training) a folder that already holds files, e.g. a logger ``version`` given twice; a version the logger
numbers itself moves past a folder another run has just taken. ``fit --ckpt_path <run>/checkpoints/last.ckpt``
continues that run's folder with every logger the configs offer (CSV, TensorBoard, wandb): same version /
id, top-k state reloaded, ``metrics.csv`` kept. A ``--ckpt_path`` that cannot be read as a reid_lab
checkpoint is refused before Lightning reads it (:class:`CheckpointUnreadable`, naming the file).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import sys
import time
import warnings
from pathlib import Path

import jsonargparse
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from reid_lab.atomic import atomic_write_text
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.features import FeatureWriter
from reid_lab.modules.base import EmbeddingModule
from reid_lab.modules.checkpoint_io import AtomicCheckpointIO
from reid_lab.modules.guards import DivergenceGuard
from reid_lab.modules.progress import PlainProgress
from reid_lab.run_lock import LOCK_NAME, FolderInUse, hold_folder_lock

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


class CheckpointUnreadable(ValueError):
    """``--ckpt_path`` names a file that is missing or cannot be read as a reid_lab checkpoint."""


class RunFolderTaken(RuntimeError):
    """A fit that does not resume would write into a run folder that holds another run's files."""


# Lightning's own ``ckpt_path`` words, resolved by the Trainer itself; "random" is ours (test / predict / validate)
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc")
# The init argument that names a logger's run, by logger class: set on resume to continue the checkpoint's run
RUN_VERSION_ARG = {"CSVLogger": "version", "TensorBoardLogger": "version", "WandbLogger": "id"}


def _is_checkpoint_file(ckpt_path) -> bool:
    """True when ``ckpt_path`` names a local file (not a Lightning keyword, ``random``, or a remote URL)."""
    if not ckpt_path:
        return False
    text = str(ckpt_path)
    return text not in (*LIGHTNING_CKPT_KEYWORDS, RANDOM_WEIGHTS) and not text.startswith("registry") \
        and "://" not in text


def _is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launchers' environment (before the Trainer knows):
    torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, Lightning's own launcher's ``NODE_RANK`` + ``LOCAL_RANK``."""
    env = os.environ
    for key in ("RANK", "SLURM_PROCID"):
        if key in env:
            return int(env[key]) == 0
    return int(env.get("NODE_RANK", 0)) == 0 and int(env.get("LOCAL_RANK", 0)) == 0


def _logger_run_folder(logger, default_root_dir) -> Path:
    """``<save_dir>/<name>/<version>``: where ModelCheckpoint puts ``checkpoints/`` for this logger, and where
    CSV / TensorBoard logs and our saved configs go. A wandb run without an id gets one (its run is started)."""
    version = logger.version
    if version is None and hasattr(logger, "experiment"):
        _ = logger.experiment  # wandb names a new run when it starts it (Lightning starts it in setup anyway)
        version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(os.path.realpath(os.path.join(logger.save_dir or default_root_dir, str(logger.name), version)))


def _keep_csv_metrics(logger: CSVLogger, resume_step: int | None) -> None:
    """Keep a run folder's ``metrics.csv`` when a resumed fit or a test continues it.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, and rewrites the file with only
    its own columns when a new one appears (which fails on older rows with other columns). So: start the writer
    with the file set aside, put the file back, and seed the writer with its columns. A resumed fit also drops
    the rows of steps the checkpoint had not reached (``step`` is the 0-based batch, so a checkpoint at
    ``global_step`` S holds steps ``< S``): a killed run's lost batches, which the resumed run logs again.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file() or logger._experiment is not None:
        return
    aside = path.with_name(".metrics.csv.resumed")
    os.replace(path, aside)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Experiment logs directory")  # nothing is deleted
            writer = logger.experiment
    finally:
        with open(aside, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns, rows = list(reader.fieldnames or []), list(reader)
        if resume_step is not None:
            rows = [r for r in rows if not r.get("step") or float(r["step"]) < resume_step]
        out = io.StringIO()
        table = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        table.writeheader()
        table.writerows(rows)
        atomic_write_text(path, out.getvalue())
        aside.unlink()
    writer.metrics_keys = sorted(columns)


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
        if trainer.logger is not None:  # as nested keys (trainer.max_epochs, model.init_args.lr): sortable
            trainer.logger.log_hyperparams(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))


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
        # Defaults a config can replace: wandb offline, checkpoints on the module's protocol key (val/i2i/mAP for ReID), rich progress, our PK sampler.
        parser.set_defaults({
            "trainer.logger": DEFAULT_LOGGER,
            "trainer.callbacks": DEFAULT_CALLBACKS,
            "trainer.use_distributed_sampler": False,
        })
        parser.add_lightning_class_args(FeatureWriter, "predict_writer")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads it (here, for the hyper-parameters it holds).

        A missing, truncated, foreign or code-carrying file ends in :class:`CheckpointUnreadable` naming the
        file; Lightning would fail deep inside ``torch.load`` without naming it."""
        self._ckpt_run, self._ckpt_step = None, None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if _is_checkpoint_file(ckpt_path):
            try:
                checkpoint = read_checkpoint(ckpt_path)
            except (OSError, ValueError) as err:
                raise CheckpointUnreadable(f"reid-lab {subcommand}: --ckpt_path: {' '.join(str(err).split())}; "
                                           "expected a checkpoint written by reid-lab fit") from None
            # keep only the run record and step: the weights are read again by Lightning, and may be large
            self._ckpt_run = dict(checkpoint.get("run") or {})
            self._ckpt_step = int(checkpoint.get("global_step") or 0)
            del checkpoint
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """``fit / test / validate --ckpt_path``: log into the checkpoint's run (:meth:`_continue_logger_run`);
        a wandb run gets a unique name, tags and a job type (:meth:`_describe_wandb_run`); ``predict`` writes
        feature files and logs nothing, so it opens no logger run."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if self.subcommand == "predict":
            config["trainer"]["logger"] = False
        if self.subcommand in ("fit", "test", "validate") and self._ckpt_run is not None:
            ckpt_path = config.get("ckpt_path")
            self._continue_logger_run(config, Path(str(ckpt_path)))
        self._describe_wandb_run(config)

    def _describe_wandb_run(self, config) -> None:
        """A wandb run you can sort and filter: ``job_type`` the subcommand, tags ``dataset:`` / ``model:`` /
        ``backbone:`` / ``method:`` (compatible losses) from the config, and a name made unique by its start time
        (``synthetic_bot_r18-1207-051530``; runs of one config no longer share a name). Values the config sets
        win; a run that continues a checkpoint's run, or one of a group (a study's stages), keeps its name."""
        logger = config.get("trainer", {}).get("logger")
        if not logger or not hasattr(logger, "get") or logger.get("init_args") is None:
            return
        if not str(logger.get("class_path", "")).endswith("WandbLogger"):
            return
        init_args = logger["init_args"]
        model = config.get("model") or {}
        model_args = (model.get("init_args") if hasattr(model, "get") else None) or {}
        data_args = ((config.get("data") or {}).get("init_args") if hasattr(config.get("data") or {}, "get")
                     else None) or {}
        upgrade = model_args.get("upgrade") if hasattr(model_args, "get") else None
        losses = (upgrade.get("compatible_losses") if hasattr(upgrade, "get") else None) or []
        tags = {
            "dataset": data_args.get("dataset") if hasattr(data_args, "get") else None,
            "model": str(model.get("class_path", "")).rsplit(".", 1)[-1] if hasattr(model, "get") else None,
            "backbone": next((model_args.get(k) for k in ("backbone", "image_backbone", "model_name")
                              if hasattr(model_args, "get") and model_args.get(k)), None),
            "method": "+".join(str(loss.get("name")) for loss in losses if hasattr(loss, "get")) or "none",
        }
        if not init_args.get("tags"):
            init_args["tags"] = [f"{k}:{v}"[:64] for k, v in tags.items() if v]
        if not init_args.get("job_type"):
            init_args["job_type"] = self.subcommand
        if init_args.get("name") and getattr(self, "_ckpt_run", None) is None and not init_args.get("group"):
            # names are unique within its group already
            init_args["name"] = f"{init_args['name']}-{time.strftime('%m%d-%H%M%S')}"

    def _continue_logger_run(self, config, ckpt_path: Path) -> None:
        """Set the logger's version (CSV, TensorBoard) or run id (wandb) to the checkpoint's run, unless the config
        sets one: logs and checkpoints continue in the checkpoint's run folder, ModelCheckpoint finds its own
        dirpath and reloads its top-k state (no "dirpath has changed" warning), and test metrics land next to
        the training curves (wandb offline: a second local run folder with the same id, which ``wandb sync``
        appends to the run). The run is the checkpoint's folder when it lies in this logger's layout
        (``<save_dir>/<name>/<version>/checkpoints/``), else the run recorded in the checkpoint."""
        logger = config.get("trainer", {}).get("logger")
        if not logger or not hasattr(logger, "get") or logger.get("init_args") is None:
            return
        kind = str(logger.get("class_path", "")).rsplit(".", 1)[-1]
        key = RUN_VERSION_ARG.get(kind)
        init_args = logger["init_args"]
        if key is None or key not in init_args or init_args.get(key) is not None or init_args.get("version"):
            return  # a logger we do not know, or the config chose the run
        version = self._version_from_folder(kind, init_args, config, ckpt_path)
        if version is None and self._ckpt_run.get("logger") == kind and self._ckpt_run.get("version"):
            recorded = str(self._ckpt_run["version"])  # recorded as str(logger.version): "0" was version_0
            version = int(recorded) if kind != "WandbLogger" and recorded.isdigit() else recorded
        if version is None:
            return
        init_args[key] = version
        verb = "resuming" if self.subcommand == "fit" else "logging into"
        shown = version if isinstance(version, str) else f"version_{version}"
        print(f"reid-lab {self.subcommand}: {verb} logger run {shown} of {ckpt_path}")

    @staticmethod
    def _version_from_folder(kind: str, init_args, config, ckpt_path: Path) -> int | str | None:
        """The logger version whose run folder holds ``ckpt_path``'s ``checkpoints/`` folder, if any."""
        if ckpt_path.parent.name != "checkpoints":
            return None
        if kind == "WandbLogger":  # WandbLogger: save_dir or dir, and its "name" is the project
            save_dir = init_args.get("save_dir") or init_args.get("dir")
            name = str(init_args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs"))
        else:
            save_dir, name = init_args.get("save_dir"), init_args.get("name") or ""
        root = Path(str(save_dir or config.get("trainer", {}).get("default_root_dir") or os.getcwd()))
        run_folder = ckpt_path.resolve().parent.parent
        if run_folder.parent != (root / name).resolve():
            return None
        if kind == "WandbLogger":
            return run_folder.name
        numbered = re.fullmatch(r"version_(\d+)", run_folder.name)
        return int(numbered[1]) if numbered else run_folder.name

    # ``test`` / ``predict`` without weights would report numbers of a random initialisation: refuse unless
    # the user says so with ``--ckpt_path random``.
    def before_test(self) -> None:
        self._require_checkpoint()

    def before_predict(self) -> None:
        self._require_checkpoint()

    def before_validate(self) -> None:
        self._require_checkpoint()

    def _require_checkpoint(self) -> None:
        if getattr(self, "_weights_checked", False):
            return
        self._weights_checked = True
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

    # ------------------------------------------------------------------------------------- run folders
    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand as the only writer of its run folder(s) (see :meth:`_run_folders`).

        Only the global-zero process takes the locks: it is the one that writes logs and checkpoints."""
        if subcommand in ("test", "predict", "validate"):
            self._require_checkpoint()  # before any run folder is made
        if subcommand not in ("fit", "test", "validate") or not _is_global_zero():
            return super()._run_subcommand(subcommand)
        with contextlib.ExitStack() as held:
            folders = self._claim_run_folders(held, subcommand)
            if subcommand == "fit":
                for folder in folders:
                    self._refuse_other_runs_files(folder)
            for logger in self.trainer.loggers:
                if isinstance(logger, CSVLogger):
                    _keep_csv_metrics(logger, self._ckpt_step if subcommand == "fit" else None)
            with warnings.catch_warnings():
                # in a fresh folder our lock file is all there is: no "exists and is not empty" about it
                fresh = {str(f) for f in folders if [p.name for p in f.iterdir()] == [LOCK_NAME]}
                fresh |= {logger.log_dir for logger in self.trainer.loggers if isinstance(logger, CSVLogger)
                          and os.path.realpath(logger.log_dir) in fresh}
                for folder in fresh:
                    warnings.filterwarnings("ignore", message=f"(Checkpoint|Experiment logs) directory "
                                                              f"{re.escape(folder)} exists and is not empty")
                super()._run_subcommand(subcommand)

    def _run_folders(self, subcommand: str) -> list[Path]:
        """Where this subcommand writes: the logger's run folder (``<save_dir>/<name>/<version>``, which holds
        its logs, configs and, by default, checkpoints) and, for ``fit``, every checkpoint folder outside it."""
        trainer = self.trainer
        folders = []
        if trainer.loggers:
            folders.append(_logger_run_folder(trainer.loggers[0], trainer.default_root_dir))
        if subcommand == "fit":
            for callback in trainer.checkpoint_callbacks:
                dirpath = getattr(callback, "dirpath", None)
                if dirpath is None and not trainer.loggers:
                    dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
                if dirpath is not None:
                    folders.append(Path(os.path.realpath(dirpath)))
        kept: list[Path] = []
        for folder in sorted(set(folders), key=lambda f: len(f.parts)):
            if not any(folder.is_relative_to(outer) for outer in kept):
                kept.append(folder)
        return kept

    def _claim_run_folders(self, held: contextlib.ExitStack, subcommand: str) -> list[Path]:
        """Lock every run folder; a numbered version the logger chose itself moves on to the next free one
        when another run took it first (two fresh runs started at once), instead of refusing."""
        logger = self.trainer.loggers[0] if self.trainer.loggers else None
        chose_version = isinstance(logger, CSVLogger | TensorBoardLogger) and logger._version is None
        for _attempt in range(100):
            folders = self._run_folders(subcommand)
            claim = contextlib.ExitStack()
            try:
                for folder in folders:
                    claim.enter_context(hold_folder_lock(folder, "run"))
            except FolderInUse as err:
                claim.close()
                if not (chose_version and err.folder == folders[0]):
                    raise
                logger._version = None  # the lock made the folder: the next free version is past it
                continue
            held.enter_context(claim)
            return folders
        raise RuntimeError(f"no free logger version found next to {folders[0]}")

    def _refuse_other_runs_files(self, folder: Path) -> None:
        """A fit that does not continue ``folder``'s run does not write into it (two models' checkpoints and one
        run's metrics would end up side by side)."""
        found = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        if not found or self._continues(folder):
            return
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise RunFolderTaken(
            f"reid-lab fit: {folder} already holds another run's files ({shown}); a new fit does not write into "
            f"it. Resume that run with --ckpt_path <its checkpoints folder>/last.ckpt, or choose another logger "
            "version / checkpoint dirpath (leave the logger's version unset for a fresh one)."
        )

    def _continues(self, folder: Path) -> bool:
        """True when this fit resumes the run that owns ``folder``: its checkpoint lies in the folder, or the
        logger continues the checkpoint's recorded run."""
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path in LIGHTNING_CKPT_KEYWORDS:
            return True  # Lightning looks for it in this run's checkpoint folder
        if not _is_checkpoint_file(ckpt_path):
            return False
        if Path(os.path.realpath(str(ckpt_path))).is_relative_to(folder):
            return True
        logger = self.trainer.loggers[0] if self.trainer.loggers else None
        run = self._ckpt_run or {}
        return (logger is not None and folder == _logger_run_folder(logger, self.trainer.default_root_dir)
                and run.get("logger") == type(logger).__name__ and run.get("version") == str(logger.version))

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Our callers (``reid-lab``, the study runner) always pass the whole command line as ``args``;
        # Lightning warns whenever ``sys.argv`` is non-empty as well, i.e. on every run.
        if any(a in ("-h", "--help") or str(a).endswith(".help") for a in args or ()):
            # jsonargparse lists the subclasses it has seen: load every module class (slow imports: only here)
            import reid_lab.modules.clip  # noqa: F401
            import reid_lab.modules.vlm  # noqa: F401
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # A training set too small for one PK batch fails here, in one line naming the options, before the
        # Trainer, its logger's run or the saved config exist (Lightning would fail at the first batch).
        check_pk = getattr(self.datamodule, "check_pk_sampling", None)
        if self.subcommand == "fit" and check_pk is not None:
            check_pk(option_prefix="--data.init_args.")
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
