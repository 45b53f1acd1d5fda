"""`reid-lab upgrade`: one command runs a whole compatible-upgrade study, in resumable stages.

A study YAML (``experiments/<name>.yaml``) names the shared LightningCLI building blocks, an upgrade
scenario, the old model, the new model and the methods to compare::

    study:
      name: synthetic_upgrade
      out: reports/synthetic_upgrade
      configs: [configs/data/synthetic.yaml]          # shared by every training stage
      scenario: configs/scenario/extended_class.yaml   # or an inline mapping
      old: {configs: [configs/model/bot_r18.yaml], overrides: {trainer.max_epochs: 10}}
      new: {configs: [configs/model/bot_r34.yaml], overrides: {trainer.max_epochs: 10}}
      methods:
        independent: {}                                 # φ_new*, the upper bound
        bct: {compatible_losses: [{name: bct}]}
        ract: {compatible_losses: [{name: ract}]}
      evaluation: {orderings: [random, uncertainty, oracle], independent: independent}
      validation: {fraction: 0.15, seed: 0}            # held-out training identities (default); none: test split
      selection: best                                  # best validation checkpoint (default) or last
      logger: wandb                                    # offline wandb runs per stage; none: no logger
      artifacts: false                                 # true: features + selected checkpoints as wandb artifacts

**Model selection never reads the test split** (unless ``validation: none``): before the scenario splits the
training set, a seeded share of its identities is held out (``split/val.json``, see
:mod:`reid_lab.data.validation`); every stage trains without them and validates on their query / gallery.
``selection: best`` keeps each stage's best validation checkpoint: the module's own key (``val/mAP`` or
``val/R1``) for the old model and methods without compatible losses, the validation *cross-test*
(``val/cross/i2i/mAP``, ``val/cross/t2i/mAP`` for caption queries: new queries against the old model's gallery) for compatible methods; ``last`` keeps the
last epoch. The rule is written into the report. The test split is read only by the evaluation stages.

A study is not tied to one encoder: a stage may train any module on any data module (a ReID CNN on
``ReIDDataModule``, a dual encoder ``CLIPModule`` on ``TextImageDataModule``; split files name images by path,
so both read them). The evaluation data (``evaluation.data``, a data config, default the old stage's data)
sets the protocol: image queries with camera filtering (ReID), or caption queries against the image gallery
(text-to-person, no camera filter), so "new text queries search the old image gallery" is the cross-test.
A method's ``pairings`` (e.g. ``[image->image, text->image]``) choose which new-to-old embeddings its
compatible losses tie (see :mod:`reid_lab.upgrade.host`).

Stages, each under ``<out>/``: ``split/`` (old / new training sets), ``train/<version>/`` (one Lightning
``fit`` per version, config written to ``config.yaml`` first), ``features/<version>.pt`` (query and
gallery embeddings with their embedding-space record), and the report (``report.json``, ``report.md``, ``report.html``,
PNG plots). A finished stage leaves a marker and is skipped on the next run; a killed training stage
resumes from its ``last.ckpt``. After the evaluation, every method that passes the empirical criterion
M(φ_new, φ_old) > M(φ_old, φ_old) gets a verified compatibility claim on the old space, written into its
checkpoint and feature file (see :mod:`reid_lab.embedding.space`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from reid_lab.atomic import atomic_torch_save, atomic_write_text
from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.text_datamodule import TextImageDataModule
from reid_lab.data.validation import DEFAULT_VAL_FRACTION, carve_validation_ids
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.extract import extract
from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import add_claim
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.metrics.backfill import (
    DEFAULT_BACKFILL_RATIOS,
    backfill_curves,
    old_feature_groups,
    old_model_uncertainty,
    order_by_sigma,
    order_by_uncertainty,
    order_oracle,
    order_random,
    order_round_robin,
)
from reid_lab.metrics.compatibility import VersionFeatures, compatibility_matrix
from reid_lab.metrics.distance import evaluate_features
from reid_lab.run_lock import FolderInUse, hold_folder_lock
from reid_lab.studies.claims import DEFAULT_CLAIM_MARGIN, EVALUATION_SPLIT, chance_level
from reid_lab.studies.evaluation_split import embed_evaluation_split, training_images
from reid_lab.studies.html_report import write_html_report
from reid_lab.studies.report import write_report
from reid_lab.studies.results import ClaimRule, StudyResults, build_results, console_lines
from reid_lab.studies.stage_keys import file_digest, stage_key
from reid_lab.studies.wandb_report import log_study_extras
from reid_lab.upgrade.adapters import FCTTransformation, train_transformation
from reid_lab.upgrade.old_model import load_embedder
from reid_lab.upgrade.scenario import ScenarioConfig, load_scenario
from reid_lab.upgrade.split_files import save_split

log = logging.getLogger(__name__)

# "uncertainty" is RACT's entropy order; "uncertainty_margin" / "uncertainty_least_confidence" use the other
# estimators of reid_lab.metrics.backfill.old_model_uncertainty on the same old-classifier posteriors.
# "uncertainty_round_robin": the entropy order taken round-robin over the gallery's identities (every identity
# refreshes at the same pace; a gallery with tracklet or identity labels has them), "uncertainty_round_robin_kmeans"
# over k-means clusters of the old gallery features (k = the number of gallery identities) for one without labels.
ROUND_ROBIN = ("uncertainty_round_robin", "uncertainty_round_robin_kmeans")
ORDERINGS = ("random", "uncertainty", "uncertainty_margin", "uncertainty_least_confidence", *ROUND_ROBIN, "oracle",
             "sigma")
# Study and method names: folder and file names inside study.out (no "/", "..", dots, quotes or markup).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
STUDY_KEYS = {"name", "out", "configs", "scenario", "old", "new", "methods", "evaluation", "logger", "validation",
              "selection", "artifacts"}
VALIDATION_KEYS = {"fraction", "seed"}
SELECTIONS = ("best", "last")
STAGE_KEYS = {"configs", "overrides"}
METHOD_KEYS = {"compatible_losses", "adapter", "pairings", "overrides", "transformation", "reference"}
TRANSFORMATION_KEYS = {"of", "uncertainty", "epochs", "hidden_dim", "lr", "batch_size", "warmup_epochs"}
# FCT (Ramanujan et al. NeurIPS'22) trains its transformation with a 2048-wide mixer for 80 epochs, 5 of them
# warm-up; a study config that uses less says so (experiments/synthetic_upgrade.yaml does, for a CPU budget).
FCT_DEFAULTS = {"hidden_dim": 2048, "epochs": 80, "warmup_epochs": 5, "lr": 5e-4, "batch_size": 256}
EVAL_KEYS = {"orderings", "ratios", "seed", "independent", "distance", "claim_margin", "data"}
# Data modules a study can split, train and evaluate on: image queries (ReID protocol) or caption queries
# against an image gallery (text-to-person protocol, no camera filter).
DATA_MODULES = {"ReIDDataModule": ReIDDataModule, "TextImageDataModule": TextImageDataModule}


@dataclass
class StudyConfig:
    """A parsed study YAML (see the module docstring). Paths are relative to the working directory."""

    name: str
    out: Path
    configs: list[str]
    scenario: ScenarioConfig
    old: dict[str, Any]
    new: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    evaluation: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"
    logger: str = "wandb"  # "wandb" (offline runs under each stage folder) or "none"
    artifacts: bool = False  # features and selected checkpoints as wandb artifacts of the report run
    validation: dict[str, Any] | None = field(default_factory=lambda: {"fraction": DEFAULT_VAL_FRACTION, "seed": 0})
    selection: str = "best"

    @classmethod
    def load(cls, path_or_dict: str | Path | dict) -> StudyConfig:
        if isinstance(path_or_dict, dict):
            raw, source = path_or_dict, "<dict>"
        else:
            source = str(path_or_dict)
            if not Path(source).is_file():
                raise FileNotFoundError(f"study config {source} does not exist")
            raw = yaml.safe_load(Path(source).read_text())
        if not isinstance(raw, dict) or "study" not in raw:
            raise ValueError(f"{source}: expected a top-level 'study:' mapping")
        study = raw["study"]
        _check_keys(study, STUDY_KEYS, f"{source}: study")
        for key in ("name", "scenario", "old", "new", "methods"):
            if key not in study:
                raise ValueError(f"{source}: study.{key} is required")
        for stage in ("old", "new"):
            _check_keys(study[stage], STAGE_KEYS, f"{source}: study.{stage}")
        methods = study["methods"]
        if not isinstance(methods, dict) or not methods:
            raise ValueError(f"{source}: study.methods must map method names to settings, got {methods!r}")
        _check_name(study["name"], f"{source}: study.name")
        for name, spec in methods.items():
            _check_name(name, f"{source}: study.methods")
            spec = spec or {}
            methods[name] = spec
            if name == "old":
                raise ValueError(f"{source}: 'old' is reserved for the old model; rename the method")
            _check_keys(spec, METHOD_KEYS, f"{source}: study.methods.{name}")
            if "transformation" in spec:
                _check_keys(spec["transformation"], TRANSFORMATION_KEYS, f"{source}: methods.{name}.transformation")
                base = spec["transformation"].get("of")
                if base not in methods or "transformation" in (methods.get(base) or {}):
                    raise ValueError(
                        f"{source}: methods.{name}.transformation.of must name a trained method, got {base!r}"
                    )
            if "reference" in spec:  # BT²'s φ_n*: an independent new model trained earlier in the study
                ref, earlier = spec["reference"], list(methods)[: list(methods).index(name)]
                if ref not in earlier or (methods.get(ref) or {}).get("compatible_losses") or \
                        "transformation" in (methods.get(ref) or {}):
                    raise ValueError(f"{source}: methods.{name}.reference must name an independently trained method "
                                     f"listed before it (no compatible_losses, no transformation), got {ref!r}")
                if not spec.get("compatible_losses"):
                    raise ValueError(f"{source}: methods.{name}.reference is read by a compatible loss (bt2); "
                                     "give compatible_losses")
        logger = str(study.get("logger", "wandb"))
        if logger not in ("wandb", "none"):
            raise ValueError(f"{source}: study.logger must be 'wandb' or 'none', got {logger!r}")
        validation = study.get("validation", {})
        if validation in (None, False, "none"):
            validation = None
        else:
            _check_keys(validation, VALIDATION_KEYS, f"{source}: study.validation")
            validation = {"fraction": float(validation.get("fraction", DEFAULT_VAL_FRACTION)),
                          "seed": int(validation.get("seed", 0))}
            if not 0 < validation["fraction"] < 1:
                raise ValueError(f"{source}: study.validation.fraction must be in (0, 1), got {validation['fraction']}")
        selection = str(study.get("selection", "best"))
        if selection not in SELECTIONS:
            raise ValueError(f"{source}: study.selection must be one of {SELECTIONS}, got {selection!r}")
        artifacts = study.get("artifacts", False)
        if not isinstance(artifacts, bool):
            raise ValueError(f"{source}: study.artifacts must be true or false, got {artifacts!r}")
        evaluation = study.get("evaluation") or {}
        _check_keys(evaluation, EVAL_KEYS, f"{source}: study.evaluation")
        ratios = evaluation.get("ratios")
        if ratios is not None:
            steps = [b - a for a, b in zip(ratios, ratios[1:])]
            if len(ratios) < 2 or ratios[0] != 0 or ratios[-1] != 1 or any(abs(d - steps[0]) > 1e-9 for d in steps):
                raise ValueError(f"{source}: study.evaluation.ratios must be an equally spaced grid from 0 to 1 "
                                 f"(the backfill AUC is the mean over it, as FastFill), got {ratios}")
        for ordering in evaluation.get("orderings", ["random", "uncertainty", "oracle"]):
            if ordering not in ORDERINGS:
                raise ValueError(f"{source}: unknown ordering {ordering!r}; expected one of {ORDERINGS}")
        return cls(
            name=str(study["name"]),
            out=Path(study.get("out", f"reports/{study['name']}")),
            configs=list(study.get("configs", [])),
            scenario=load_scenario(study["scenario"]),
            old=study["old"],
            new=study["new"],
            methods=methods,
            evaluation=evaluation,
            source=source,
            logger=logger,
            validation=validation,
            selection=selection,
            artifacts=artifacts,
        )

    @property
    def trained_methods(self) -> list[str]:
        return [m for m, spec in self.methods.items() if "transformation" not in spec]


class Study:
    """Runs the stages of a :class:`StudyConfig`; every stage is skipped when its output exists."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.out = config.out
        self.timings: dict[str, float] = {}
        self.keys: dict[str, str] = {}  # stage key of every trained version and of its checkpoint path

    # ------------------------------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        """Validate, then run every stage while holding the study folder (one ``reid-lab upgrade`` writes a
        study at a time: a second one is refused with the holder's pid; a lock left by a killed run is free)."""
        self.validate()
        with hold_folder_lock(self.out, what="study"):
            return self._run_stages()

    def _run_stages(self) -> dict[str, Any]:
        fractions = self.config.scenario.fractions
        if fractions is not None and len(fractions) > 2:
            return self.run_chain()
        split_files = self.split()
        self.check_splits({"old": split_files["old"], "new": split_files["new"]})
        checkpoints = {"old": self.train("old", self.config.old, split_files["old"], self.config.scenario.old_model)}
        for method in self.config.trained_methods:
            spec = self.config.methods[method]
            checkpoints[method] = self.train(
                method, self.config.new, split_files["new"], self.config.scenario.new_model,
                method_spec=spec, old_checkpoint=checkpoints["old"],
                reference_checkpoint=checkpoints[spec["reference"]] if spec.get("reference") else None,
            )
        features = {version: self.embed(version, ckpt) for version, ckpt in checkpoints.items()}
        return self.evaluate(checkpoints, features, split_files)

    def validate(self) -> None:
        """Check what every stage will instantiate before anything trains: each stage's module class, the
        scenario's model overrides against that class's signature, and every compatible-loss plugin."""
        from reid_lab.upgrade.host import build_plugins

        text_queries = self.query_modality == "text"
        for stage, overrides in (("old", self.config.scenario.old_model), ("new", self.config.scenario.new_model)):
            spec = self.config.old if stage == "old" else self.config.new
            cfg = self.compose(list(spec.get("configs") or []), dict(spec.get("overrides") or {}))
            class_path = (cfg.get("model") or {}).get("class_path")
            if not class_path:
                raise ValueError(f"{self.config.source}: study.{stage} configs give no model.class_path")
            module_name, _, class_name = class_path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError, ValueError) as err:
                raise ValueError(f"{self.config.source}: study.{stage} model {class_path!r}: {err}") from err
            if text_queries and getattr(cls, "protocol", "reid") != "cross_modal":
                raise ValueError(f"{self.config.source}: the evaluation data has caption queries (text-to-person) "
                                 f"but study.{stage} trains {class_path}, which embeds no text; use a dual "
                                 "encoder (reid_lab.modules.clip.CLIPModule) or image-query evaluation data "
                                 "(study.evaluation.data: a ReIDDataModule config)")
            allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes"}
            unknown = sorted(set(overrides or {}) - allowed)
            if unknown:
                raise ValueError(f"{self.config.source}: scenario.{stage}_model has unknown argument(s) {unknown} "
                                 f"of {class_path}; allowed: {sorted(allowed)}")
        for method, spec in self.config.methods.items():
            try:
                build_plugins(spec.get("compatible_losses"))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self.config.source}: study.methods.{method}: {err}") from err

    # ------------------------------------------------------------------------------------------- split
    def datamodule(self, train_subset: str | None = None) -> ReIDDataModule | TextImageDataModule:
        """The evaluation data: ``evaluation.data`` (a data config file, or ``{configs, overrides}`` as a stage)
        if given, else the data of the old model's stage. All stages share its test split; its class sets the protocol of the whole study:
        ``ReIDDataModule`` ranks image queries (ReID, camera filter), ``TextImageDataModule`` caption queries
        against the image gallery (text-to-person, no camera filter)."""
        data_config = self.config.evaluation.get("data")
        if data_config is not None:
            spec = data_config if isinstance(data_config, dict) else {"configs": [str(data_config)]}
            _check_keys(spec, STAGE_KEYS, f"{self.config.source}: study.evaluation.data")
            cfg = self.compose(list(spec.get("configs") or []), dict(spec.get("overrides") or {}))
            where = f"{self.config.source}: study.evaluation.data"
        else:
            cfg = self.compose(list(self.config.old.get("configs") or []),
                               dict(self.config.old.get("overrides") or {}))
            where = f"{self.config.source}: study.old"
        data = cfg.get("data") or {}
        class_name = str(data.get("class_path", "reid_lab.data.ReIDDataModule")).split(".")[-1]
        if class_name not in DATA_MODULES:
            raise ValueError(f"{where}: upgrade studies need data.class_path one of {sorted(DATA_MODULES)}, "
                             f"got {data.get('class_path')!r}")
        init = {k: _instantiate(v, f"{where}: data.init_args.{k}") for k, v in (data.get("init_args") or {}).items()}
        init["train_subset"] = train_subset
        return DATA_MODULES[class_name](**init)

    def stage_datamodule(self, stage: str, train_subset: str) -> ReIDDataModule | TextImageDataModule:
        """The data module a training stage (``old`` / ``new``) builds, with its training and validation sets."""
        spec = self.config.old if stage == "old" else self.config.new
        cfg = self.compose(list(spec.get("configs") or []), dict(spec.get("overrides") or {}))
        data = cfg.get("data") or {}
        class_name = str(data.get("class_path", "reid_lab.data.ReIDDataModule")).split(".")[-1]
        if class_name not in DATA_MODULES:
            raise ValueError(f"{self.config.source}: study.{stage}: upgrade studies need data.class_path one of "
                             f"{sorted(DATA_MODULES)}, got {data.get('class_path')!r}")
        where = f"{self.config.source}: study.{stage}: data.init_args"
        init = {k: _instantiate(v, f"{where}.{k}") for k, v in (data.get("init_args") or {}).items()}
        init["train_subset"] = train_subset
        if self.val_file is not None:
            init["val_subset"] = str(self.val_file)
        return DATA_MODULES[class_name](**init)

    def check_splits(self, train_subsets: dict[str, str]) -> None:
        """Pre-flight, before anything trains: build every stage's validation query / gallery and the
        evaluation's test query / gallery, and refuse (naming the split) one with no gallery or a query without
        a positive; a study would otherwise stop at its first validation, after a stage had trained."""
        modules = [(f"study.{stage}", self.stage_datamodule(stage, subset)) for stage, subset in train_subsets.items()]
        modules.append(("study evaluation data", self.datamodule()))
        for where, dm in modules:
            check = getattr(dm, "check_evaluation_splits", None)
            if check is None:
                continue  # caption data: every caption of an image queries a gallery that holds that image
            try:
                check()
            except ValueError as err:
                raise ValueError(f"{self.config.source}: {where}: {err}") from err

    @property
    def query_modality(self) -> str:
        """``image`` (ReID evaluation) or ``text`` (caption queries against the image gallery)."""
        return "text" if isinstance(self.datamodule(), TextImageDataModule) else "image"

    def split(self) -> dict[str, str]:
        """Stage 1: split the training set by the scenario and save it (reused when identical)."""
        dm = self.datamodule()
        upgrade_split = self.config.scenario.split(self.training_pool(dm))
        try:
            files = save_split(upgrade_split, self.out / "split")
        except FileExistsError:  # the scenario changed: a new split, and every stage trained on the old one re-runs
            print(f"[split] the scenario changed since the last run: replacing {self.out / 'split'}")
            files = save_split(upgrade_split, self.out / "split", overwrite=True)
        summary = upgrade_split.summary()
        log.info("split %s: %s", self.config.scenario.kind, summary)
        print(f"[split] {self.config.scenario.kind} (old fraction {self.config.scenario.old_fraction}): "
              f"old {summary['old_ids']} ids / {summary['old_images']} images, "
              f"new {summary['new_ids']} ids / {summary['new_images']} images")
        return {"old": str(files["old"]), "new": str(files["new"])}

    @property
    def val_file(self) -> Path | None:
        """``split/val.json``: the held-out validation images (None with ``validation: none``)."""
        return self.out / "split" / "val.json" if self.config.validation is not None else None

    def training_pool(self, dm) -> list:
        """The training images the scenario splits: all of them, less the held-out validation identities
        (written to :attr:`val_file`, unchanged when it already holds the same images)."""
        images = training_images(dm)
        if self.config.validation is None:
            print("[split] validation: none: checkpoints are selected on the test split")
            return images
        fraction, seed = self.config.validation["fraction"], self.config.validation["seed"]
        held = carve_validation_ids([r.pid for r in images], fraction, seed)
        val = [r for r in images if r.pid in held]
        payload = json.dumps({"paths": sorted(r.path for r in val), "num_ids": len(held), "num_images": len(val),
                              "fraction": fraction, "seed": seed}, indent=1)
        path = self.val_file
        if not path.is_file() or path.read_text() != payload:
            atomic_write_text(path, payload)
        print(f"[split] validation: {len(held)} held-out training identities / {len(val)} images ({path})")
        return [r for r in images if r.pid not in held]

    def protocol(self) -> dict[str, str]:
        """How this study chose its checkpoints and where it measured (recorded in the report), in the words of
        its evaluation protocol: image queries (ReID) or caption queries against an image gallery."""
        text = self.query_modality == "text"
        if text:
            evaluation = ("test split: every caption of the test images queries the test image gallery (text-to-"
                          "image, identities disjoint from every training set); a gallery image is a match when it "
                          "shows the caption's identity; no camera filter")
        else:
            evaluation = ("test query / gallery (image-to-image ReID, identities disjoint from every training "
                          "set); gallery images of the query's identity and camera and junk (pid -1) removed")
        if self.config.validation is None:
            validation = ("none: validation ran on the test split; no checkpoint is selected on it (every stage "
                          "keeps its last epoch)")
        else:
            v = self.config.validation
            inside = ("every caption of a held-out image queries the held-out images" if text else
                      "query / gallery inside them by camera (the first image of an identity per camera is a "
                      "query; without cameras, the first image of an identity)")
            validation = (f"held-out training identities ({v['fraction']:.0%}, seed {v['seed']}, {self.val_file}); "
                          f"{inside}; no training set contains them")
        key = "val/t2i/R1" if text else "val/i2i/mAP"
        if self.config.selection == "last" or self.config.validation is None:
            selection = "the last epoch of every stage"
        else:
            selection = (f"best validation checkpoint: the module's own key ({key}) for the old model and methods "
                         f"without compatible losses; the validation cross-test val/cross/{'t2i' if text else 'i2i'}/mAP "
                         "(new queries against the old gallery) for compatible methods")
        return {"evaluation": evaluation, "validation": validation, "selection": selection}

    def inside(self, *parts: str) -> Path:
        """``study.out / parts``, refused unless it resolves inside ``study.out`` (every file a study writes)."""
        path = self.out.joinpath(*parts)
        root = self.out.resolve()
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"{self.config.source}: {'/'.join(parts)!r} would write {path.resolve()}, outside "
                             f"study.out {root}")
        return path

    # ---------------------------------------------------------------------------------------- training
    def compose(self, stage_configs: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
        """Merge the study's shared configs, the stage's configs and dotted overrides; resolve ``${...}``."""
        merged = OmegaConf.create({})
        for path in [*self.config.configs, *stage_configs]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{self.config.source}: config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for key, value in overrides.items():
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
        return OmegaConf.to_container(merged, resolve=True)

    def train(self, version: str, stage: dict[str, Any], train_subset: str, model_overrides: dict[str, Any],
              method_spec: dict[str, Any] | None = None, old_checkpoint: str | None = None,
              reference_checkpoint: str | None = None) -> str:
        """Stage 2: fit one version with the real LightningCLI; returns its best checkpoint."""
        stage_dir = self.inside("train", version)
        done = stage_dir / "done.json"
        method_spec = method_spec or {}
        overrides = dict(stage.get("overrides") or {})
        overrides.update(method_spec.get("overrides") or {})
        cfg = self.compose(list(stage.get("configs") or []), overrides)
        model_args = cfg.setdefault("model", {}).setdefault("init_args", {})
        model_args.update(model_overrides or {})
        model_args["space_label"] = f"{self.config.name}/{version}"
        if method_spec.get("compatible_losses"):
            model_args["upgrade"] = {
                "old_checkpoint": str(old_checkpoint),
                "compatible_losses": method_spec["compatible_losses"],
                "adapter": method_spec.get("adapter", "linear"),
                **({"pairings": list(method_spec["pairings"])} if method_spec.get("pairings") else {}),
                **({"reference_checkpoint": str(reference_checkpoint)} if reference_checkpoint else {}),
            }
        data_args = cfg.setdefault("data", {}).setdefault("init_args", {})
        data_args["train_subset"] = train_subset
        if self.val_file is not None:
            data_args["val_subset"] = str(self.val_file)
        key = stage_key(stage="train", config=cfg, train_subset=file_digest(train_subset),
                        val_subset=file_digest(self.val_file) if self.val_file is not None else None,
                        selection=self.config.selection,
                        old=self.keys.get(str(old_checkpoint)) if old_checkpoint else None,
                        **({"reference": self.keys.get(str(reference_checkpoint))} if reference_checkpoint else {}))
        if done.is_file():
            info = json.loads(done.read_text())
            if info.get("key") == key and Path(info["checkpoint"]).is_file():
                print(f"[train {version}] done earlier (stage key {key}): {info['checkpoint']}")
                return self._trained(version, key, info["checkpoint"])
            print(f"[train {version}] its config, inputs or code changed (stage key {info.get('key')} -> {key}): "
                  "training again")
        self._discard_stage(stage_dir, version, keep_checkpoints=self._same_key(stage_dir, key))
        trainer = cfg.setdefault("trainer", {})
        trainer["default_root_dir"] = str(stage_dir)
        encoder = model_args.get("backbone") or model_args.get("image_backbone") or model_args.get("model_name")
        # one wandb folder per study (<out>/wandb), one run per stage: grouped by study, typed by stage, tagged so
        # runs of many studies can be filtered and sorted side by side
        trainer["logger"] = False if self.config.logger == "none" else {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "reid_lab", "name": f"{self.config.name}-{version}", "group": self.config.name,
                          "job_type": "train-old" if version == "old" else "train-new",
                          "tags": self.tags(method=version, encoder=encoder, dataset=data_args.get("dataset")),
                          "save_dir": str(self.out), "offline": True},
        }
        checkpointing: dict[str, Any] = {"dirpath": str(stage_dir / "checkpoints")}
        if method_spec.get("compatible_losses") and self.config.selection == "best":
            # a compatible method is chosen on its cross-test, under the evaluation's protocol
            # (the stage's own validation protocol: caption data validates text-to-image, ReID data image-to-image)
            text_data = str((cfg.get("data") or {}).get("class_path", "")).endswith("TextImageDataModule")
            checkpointing["monitor"] = f"val/cross/{'t2i' if text_data else 'i2i'}/mAP"
        trainer["callbacks"] = [
            {"class_path": "reid_lab.modules.checkpointing.EmbeddingCheckpoint", "init_args": checkpointing},
            {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
        ]
        config_path = stage_dir / "config.yaml"
        atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
        atomic_write_text(stage_dir / "key", key)
        args = ["fit", "--config", str(config_path)]
        last = stage_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            print(f"[train {version}] resuming from {last}")
            args += ["--ckpt_path", str(last)]
        print(f"[train {version}] {cfg['model'].get('class_path', '?').split('.')[-1]} ({encoder or 'model_cfg'}) "
              f"on {train_subset}")
        start = time.perf_counter()
        cli = run_lightning_cli(args)
        seconds = time.perf_counter() - start
        best = str(last) if self.config.selection == "last" else cli.trainer.checkpoint_callback.best_model_path
        best = best or str(last)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        if cli.trainer.logger is not None and hasattr(cli.trainer.logger, "experiment"):
            cli.trainer.logger.experiment.finish()
        if cli.trainer.current_epoch < int(trainer.get("max_epochs") or 0):
            raise RuntimeError(f"training of {version} stopped early at epoch {cli.trainer.current_epoch}")
        atomic_write_text(stage_dir / "key", key)
        if Path(best).resolve() != last.resolve():
            _drop_training_state(best)  # the selected weights are evaluated, never resumed: keep them slim
        atomic_write_text(done, json.dumps({"checkpoint": best, "key": key, "seconds": seconds, "val": metrics},
                                           indent=2))
        self.timings[f"train/{version}"] = seconds
        return self._trained(version, key, best)

    def tags(self, **values: Any) -> list[str]:
        """wandb tags of a study's runs: ``study:<name>``, ``scenario:<kind>`` and the given ``key:value`` pairs."""
        values = {"study": self.config.name, "scenario": self.config.scenario.kind, **values}
        return [f"{k}:{v}"[:64] for k, v in values.items() if v not in (None, "")]

    def _trained(self, version: str, key: str, checkpoint: str) -> str:
        self.keys[version] = self.keys[str(checkpoint)] = key
        return checkpoint

    @staticmethod
    def _same_key(stage_dir: Path, key: str) -> bool:
        """True when the stage folder was started with this key (its ``last.ckpt`` may be resumed)."""
        path = stage_dir / "key"
        return path.is_file() and path.read_text().strip() == key

    def _discard_stage(self, stage_dir: Path, version: str, keep_checkpoints: bool) -> None:
        """Remove what a stale stage left (its marker, its checkpoints unless resumable, its features)."""
        (stage_dir / "done.json").unlink(missing_ok=True)
        # a folder without last.ckpt cannot be resumed: a fresh fit would find another run's files there
        keep_checkpoints = keep_checkpoints and (stage_dir / "checkpoints" / "last.ckpt").is_file()
        if not keep_checkpoints and (stage_dir / "checkpoints").exists():
            shutil.rmtree(stage_dir / "checkpoints")
        for path in (self.out / "features").glob(f"{version}.*"):
            path.unlink()

    # ---------------------------------------------------------------------------------------- features
    def embed(self, version: str, checkpoint: str) -> FeatureSet:
        """Stage 3: query + gallery embeddings of one version (old-model logits kept for uncertainty)."""
        return self._embed_split(version, checkpoint, into_old_space=False)

    def embed_into_old_space(self, version: str, checkpoint: str) -> FeatureSet:
        """Stage 3b (dimension change): the version's embeddings through its learned adapter into the old
        space, for the cross-test and backfill curves (the same embed path, ``flip_test`` included)."""
        return self._embed_split(version, checkpoint, into_old_space=True)

    def _embed_split(self, version: str, checkpoint: str, into_old_space: bool) -> FeatureSet:
        path = self.inside("features", f"{version}{'.in_old_space' if into_old_space else ''}.pt")
        if path.is_file() and self._fresh(path, self.keys.get(version)):
            return FeatureSet.load(path)
        dm = self.datamodule()
        embedder = load_embedder(checkpoint, into_old_space=into_old_space)
        keeps_logits = version == "old" and not into_old_space and bool(getattr(embedder.encoder, "num_classes", 0))
        start = time.perf_counter()
        features, gallery_logits = embed_evaluation_split(embedder, dm, keep_logits=keeps_logits)
        self.timings[f"embed/{path.stem}"] = time.perf_counter() - start
        if gallery_logits is not None:  # old-model uncertainty of every gallery item, for uncertainty ordering
            atomic_torch_save({"uncertainty": old_model_uncertainty(gallery_logits), "logits": gallery_logits},
                              self.out / "features" / "old.gallery_uncertainty.pt")
        features.save(path)
        self._stamp(path, self.keys.get(version))
        return features

    @staticmethod
    def _fresh(path: Path, key: str | None) -> bool:
        """True when ``path`` was written for stage ``key`` (its ``<path>.key`` sidecar matches)."""
        sidecar = path.with_name(path.name + ".key")
        return key is not None and sidecar.is_file() and sidecar.read_text().strip() == key

    @staticmethod
    def _stamp(path: Path, key: str | None) -> None:
        if key is not None:
            atomic_write_text(path.with_name(path.name + ".key"), key)

    def transformation(self, name: str, spec: dict[str, Any], checkpoints: dict[str, str],
                       gallery_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FCT / FastFill: learn h(φ_old) ≈ φ_new on the new training set, apply it to the old gallery.

        Returns the transformed gallery ``(ng, d_new)`` and, with ``uncertainty``, FastFill's log σ².
        """
        path = self.inside("features", f"{name}.transformed_gallery.pt")
        t = spec["transformation"]
        key = stage_key(stage="transformation", spec=t, old=self.keys.get("old"), base=self.keys.get(t["of"]))
        if path.is_file() and self._fresh(path, key):
            saved = torch.load(path, weights_only=True)
            return saved["gallery"], saved.get("log_var")
        dm = self.datamodule(train_subset=str(self.out / "split" / "new.json"))
        old_embedder, new_embedder = load_embedder(checkpoints["old"]), load_embedder(checkpoints[t["of"]])
        records = dm.train_records
        old_train = extract(old_embedder, records, dm.test_transform, batch_size=dm.eval_batch_size,
                            num_workers=dm.num_workers)["embedding"]
        new_train = extract(new_embedder, records, dm.test_transform, batch_size=dm.eval_batch_size,
                            num_workers=dm.num_workers)
        uncertainty = bool(t.get("uncertainty", True))
        h = FCTTransformation(old_train.shape[1], new_train["embedding"].shape[1],
                              hidden_dim=int(t.get("hidden_dim", FCT_DEFAULTS["hidden_dim"])),
                              uncertainty=uncertainty)
        labels = torch.tensor([r.pid for r in records])
        classifier = new_embedder.encoder.classifier_weight.detach() if uncertainty else None
        start = time.perf_counter()
        h = train_transformation(h, old_train, new_train["embedding"], labels=labels if uncertainty else None,
                                 new_classifier=classifier, epochs=int(t.get("epochs", FCT_DEFAULTS["epochs"])),
                                 warmup_epochs=int(t.get("warmup_epochs", FCT_DEFAULTS["warmup_epochs"])),
                                 lr=float(t.get("lr", FCT_DEFAULTS["lr"])),
                                 batch_size=int(t.get("batch_size", FCT_DEFAULTS["batch_size"])))
        self.timings[f"transformation/{name}"] = time.perf_counter() - start
        with torch.no_grad():
            out = h(gallery_old)
        gallery, log_var = (out if uncertainty else (out, None))
        atomic_torch_save({"gallery": gallery, "log_var": log_var}, path)
        self._stamp(path, key)
        return gallery, log_var

    # -------------------------------------------------------------------------------------- evaluation
    def evaluate(self, checkpoints: dict[str, str], features: dict[str, FeatureSet],
                 split_files: dict[str, str]) -> dict[str, Any]:
        """Stage 4: compatibility matrix, backfill curves, flips, report, compatibility claims."""
        ev = self.config.evaluation
        distance = ev.get("distance", "cosine")
        ratios = tuple(ev.get("ratios", DEFAULT_BACKFILL_RATIOS))
        orderings = list(ev.get("orderings", ["random", "uncertainty", "oracle"]))
        independent = ev.get("independent", "independent" if "independent" in self.config.methods else None)
        old_q, old_g = features["old"].split()
        q_pids, q_camids, g_pids, g_camids = old_q.pids, old_q.camids, old_g.pids, old_g.camids
        versions = {v: VersionFeatures(v, *(fs.features for fs in f.split())) for v, f in features.items()}
        transformed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, spec in self.config.methods.items():
            if "transformation" in spec:
                transformed[name] = self.transformation(name, spec, checkpoints, old_g.features)
                base_q = versions[spec["transformation"]["of"]].query
                versions[name] = VersionFeatures(name, base_q, transformed[name][0])

        start = time.perf_counter()
        # Trained versions against each other; a transformation version only as (h-query, h-gallery):
        # φ_new queries against the transformed old gallery h(φ_old), the FCT cross-test.
        trained = [v for v in versions if v not in transformed]
        pairs = [(a, b) for a in trained for b in trained if versions[a].dim == versions[b].dim]
        pairs += [(t, t) for t in transformed]
        matrix = compatibility_matrix(versions, q_pids, g_pids, q_camids, g_camids, metric=distance, pairs=pairs)
        # Dimension change: the cross-test searches the old gallery with new queries through the adapter.
        projected: dict[str, FeatureSet] = {}
        for method in trained:
            if method != "old" and versions[method].dim != versions["old"].dim:
                if not (self.config.methods.get(method) or {}).get("compatible_losses"):
                    continue  # trained without the old model: no adapter, no cross-test (n/a in the matrix)
                projected[method] = self.embed_into_old_space(method, checkpoints[method])
                result = evaluate_features(projected[method].split()[0].features, old_g.features, q_pids, g_pids,
                                           q_camids, g_camids, metric=distance)
                matrix.cells[(method, "old")] = {k: float(v) for k, v in result.summary().items()}
                matrix.results[(method, "old")] = result
                matrix.not_comparable.pop((method, "old"), None)
        self.timings["evaluate/matrix"] = time.perf_counter() - start

        uncertainty_file = self.out / "features" / "old.gallery_uncertainty.pt"
        curves = {}
        rows = []
        start = time.perf_counter()
        for method, spec in self.config.methods.items():
            if "transformation" in spec:
                base = spec["transformation"]["of"]
                q_new, g_new = versions[base].query, versions[base].gallery
                stored, log_var = transformed[method]
            elif method in projected:  # curves in the old space: adapted new queries and refreshed items
                q_new, g_new = (fs.features for fs in projected[method].split())
                stored, log_var = None, None
            elif versions[method].dim != versions["old"].dim:
                # no adapter into the old space: its queries cannot search a partly refreshed gallery
                rows.append(self._summary_row(matrix, method, spec, independent, adapted=set(projected)))
                continue
            else:
                q_new, g_new = versions[method].query, versions[method].gallery
                stored, log_var = None, None
            orders = {}
            for ordering in orderings:
                if ordering == "random":
                    orders["random"] = order_random(len(g_pids), seed=int(ev.get("seed", 0)))
                elif ordering in ROUND_ROBIN and uncertainty_file.is_file():
                    saved = torch.load(uncertainty_file, weights_only=True)
                    if ordering == "uncertainty_round_robin":
                        groups = g_pids
                    else:
                        groups = old_feature_groups(old_g.features, len(torch.unique(torch.as_tensor(g_pids))),
                                                    seed=int(ev.get("seed", 0)))
                    orders[ordering] = order_round_robin(saved["uncertainty"], groups)
                elif ordering.startswith("uncertainty") and uncertainty_file.is_file():
                    saved = torch.load(uncertainty_file, weights_only=True)
                    estimator = ordering.partition("_")[2] or "entropy"
                    if estimator == "entropy":
                        orders[ordering] = order_by_uncertainty(saved["uncertainty"])
                    elif "logits" in saved:
                        orders[ordering] = order_by_uncertainty(old_model_uncertainty(saved["logits"], estimator))
                    else:
                        raise ValueError(f"{uncertainty_file} holds no old-model logits for the {ordering!r} ordering "
                                         "(written by an older reid_lab): delete it and run the study again")
                elif ordering.startswith("uncertainty") and method == next(iter(self.config.methods)):
                    print("[backfill] no uncertainty ordering: the old model has no classifier to score its "
                          "gallery items with (RACT's uncertainty, Zhang et al. ICLR'22, needs φ_old's class posteriors)")
                elif ordering == "oracle" and stored is None:
                    orders["oracle"] = order_oracle(old_g.features, g_new)
                elif ordering == "sigma" and log_var is not None:
                    orders["sigma"] = order_by_sigma(log_var)
            curves[method] = backfill_curves(
                q_new, old_g.features, g_new, q_pids, g_pids, q_camids, g_camids, orders, ratios=ratios,
                old_system=(old_q.features, old_g.features), transformed_old_gallery=stored, metric=distance,
            )
            rows.append(self._summary_row(matrix, method, spec, independent, adapted=set(projected)))
        self.timings["evaluate/backfill"] = time.perf_counter() - start

        results = build_results(matrix, rows, curves, title=f"Upgrade study: {self.config.name}",
                                rule=self.claim_rule(old_q, old_g), protocol=self.protocol(),
                                split_sizes=self.split_sizes(old_q, old_g))
        claims = self.record_claims(results, checkpoints, features)
        run = self.report_run() if self.config.logger == "wandb" else None
        try:
            files = write_report(self.out, results=results, logger=run)
            if run is not None:
                log_study_extras(run, self.out, results.to_dict()["study"], artifacts=self.config.artifacts,
                                 name=self.config.name)
        finally:
            if run is not None:
                run.finish()
        summary = {"matrix": matrix, "curves": curves, "claims": claims, "files": files, "results": results,
                   "timings": self.timings}
        atomic_write_text(self.out / "timings.json", json.dumps(self.timings, indent=2))
        files["html"] = write_html_report(self.out)
        print((self.out / "report.md").read_text())
        print(f"[study] {self.out} holds {_disk_usage(self.out) / 2**20:.1f} MiB (each stage's last.ckpt keeps the "
              "optimiser state for resuming; selected checkpoints keep weights only)")
        print(f"[study] report page (self-contained HTML): {files['html']}")
        return summary

    @staticmethod
    def _summary_row(matrix, method: str, spec: dict[str, Any], independent: str | None,
                     adapted: set[str]) -> dict[str, Any]:
        """The study-table row of ``method``: which matrix cells are its self-test and cross-test."""
        ind = independent if independent is not None and matrix.has(independent, independent) else None
        if "transformation" not in spec:
            row: dict[str, Any] = {"method": method, "new": method, "old": "old", "independent": ind}
            if not matrix.has(method, "old"):
                row["note"] = matrix.not_comparable.get((method, "old"), "no cross-test")
                if not spec.get("compatible_losses"):
                    row["note"] = ("trained without the old model and of another dimension: no adapter into the "
                                   "old space, so no cross-test and no backfill curve")
            elif method in adapted:
                how = {"truncate": "its first old-dimension coordinates (truncate adapter)",
                       "pad": "its zero-padded features (pad adapter)"}.get(spec.get("adapter", "linear"),
                                                                             "its learned adapter")
                row["note"] = (f"cross-test through {how} into the old space (dimension change); "
                               "a claim holds for the adapter's outputs, its own space records none")
            return row
        # FCT / FastFill: φ_new is the base model; the cross-test searches h(φ_old) gallery features.
        base = spec["transformation"]["of"]
        return {"method": method, "new": base, "old": "old", "independent": ind, "self_cell": (base, base),
                "cross_cell": (method, method), "old_self_cell": ("old", "old"),
                "note": f"cross-test: {base}'s queries against the transformed old gallery h(φ_old)"}

    def report_run(self):
        """The study's report run, its config the study YAML as nested keys (sortable, filterable in wandb)."""
        config = {"study": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.config).items()
                            if k in ("name", "out", "configs", "methods", "evaluation", "validation", "selection")}}
        config["study"]["scenario"] = {"kind": self.config.scenario.kind,
                                       "old_fraction": self.config.scenario.old_fraction}
        return _report_run(self.config.name, self.out, tags=self.tags(), config=json.loads(json.dumps(config,
                                                                                                      default=str)))

    def claim_rule(self, old_q: FeatureSet, old_g: FeatureSet) -> ClaimRule:
        """The study's claim rule: ``evaluation.claim_margin`` and the chance level of its queries and gallery."""
        margin = float(self.config.evaluation.get("claim_margin", DEFAULT_CLAIM_MARGIN))
        chance, chance_std = chance_level(old_q.pids, old_g.pids, old_q.camids, old_g.camids)
        return ClaimRule(margin=margin, chance=chance, chance_std=chance_std)

    def split_sizes(self, old_q: FeatureSet, old_g: FeatureSet) -> dict[str, int]:
        """Sizes of what the study evaluated on (test queries and gallery, their identities)."""
        return {"test queries": len(old_q.pids), "test gallery": len(old_g.pids),
                "query identities": len(set(torch.as_tensor(old_q.pids).tolist())),
                "gallery identities": len(set(torch.as_tensor(old_g.pids).tolist()))}

    def record_claims(self, results: StudyResults, checkpoints: dict[str, str],
                      features: dict[str, FeatureSet]) -> dict[str, bool]:
        """Write a verified compatibility claim into each passing version's checkpoint and feature file.

        The decisions are the record's (:class:`~reid_lab.studies.results.ClaimDecision`); this only prints
        them and writes those that hold on a version's own space (a dimension change's cross-test runs through
        its adapter, so its own space gets no claim, and a transformation is not a checkpoint).
        """
        for line in console_lines(results):
            print(line)
        claims = {}
        for m in results.methods:
            decision, new, old = m.claim, m.new, m.old
            if decision is None or new != m.method or new not in checkpoints or old not in features:
                continue
            claims[new] = False
            if not decision.holds:
                continue
            if features[new].space.get("dim") != features[old].space.get("dim"):
                continue  # the note in the record says why
            space = dict(features[new].space)
            add_claim(space, features[old].space, metric=results.metric, cross=decision.cross,
                      reference=decision.reference, margin=decision.margin, chance=decision.chance,
                      chance_margin=decision.chance_margin, dataset=self.config.name,
                      split=results.protocol.get("evaluation", EVALUATION_SPLIT))
            features[new].space = space
            features[new].save(self.inside("features", f"{new}.pt"))
            ckpt = read_checkpoint(checkpoints[new])
            ckpt["embedding_space"] = space
            atomic_torch_save(ckpt, checkpoints[new])
            claims[new] = True
        return claims

    # ------------------------------------------------------------------------------------ chains
    def run_chain(self) -> dict[str, Any]:
        """Multi-step upgrades φ1 → φ2 → … → φT (BCT §5, CoReS): every method trains its own chain.

        Step 1 is the shared old model; step ``t`` of a method is trained on the ``t``-th training set of the
        chain and, for a compatible method, against step ``t - 1`` of the same method. Evaluated with the
        lower-triangular compatibility matrix C[t][k] = M(φ_t, φ_k), AC and AM (CoReS).
        """
        from reid_lab.metrics.compatibility import multi_step_scores

        with_reference = [m for m, spec in self.config.methods.items() if spec.get("reference")]
        if with_reference:
            raise ValueError(f"{self.config.source}: methods {with_reference} name a reference model (BT²); a chain "
                             "grows the embedding at every step, so each step would need its own basis_transform."
                             "old_dim and reference: run them as single upgrades")
        dm = self.datamodule()
        steps = self.config.scenario.chain(self.training_pool(dm))
        step_files = []
        for t, records in enumerate(steps, start=1):
            path = self.out / "split" / f"step{t}.json"
            payload = json.dumps({"paths": sorted(r.path for r in records), "step": t,
                                  "kind": self.config.scenario.kind, "seed": self.config.scenario.seed}, indent=1)
            if path.is_file() and path.read_text() != payload:
                raise FileExistsError(f"{path} holds a different chain split; use a new study.out")
            if not path.is_file():
                atomic_write_text(path, payload)
            step_files.append(str(path))
            print(f"[split] chain step {t}: {len({r.pid for r in records})} ids / {len(records)} images")
        checkpoints = {"old": self.train("old", self.config.old, step_files[0], self.config.scenario.old_model)}
        chains: dict[str, list[str]] = {}
        for method in self.config.trained_methods:
            chain, previous = ["old"], checkpoints["old"]
            for t in range(2, len(steps) + 1):
                version = f"{method}@{t}"
                previous = checkpoints[version] = self.train(
                    version, self.config.new, step_files[t - 1], self.config.scenario.new_model,
                    method_spec=self.config.methods[method], old_checkpoint=previous,
                )
                chain.append(version)
            chains[method] = chain
        features = {version: self.embed(version, ckpt) for version, ckpt in checkpoints.items()}
        old_q, old_g = features["old"].split()
        versions = {v: VersionFeatures(v, *(fs.features for fs in f.split())) for v, f in features.items()}
        pairs = sorted({(chain[t], chain[k]) for chain in chains.values() for t in range(len(chain))
                        for k in range(t + 1) if versions[chain[t]].dim == versions[chain[k]].dim})
        matrix = compatibility_matrix(versions, old_q.pids, old_g.pids, old_q.camids, old_g.camids,
                                      metric=self.config.evaluation.get("distance", "cosine"), pairs=pairs)
        scores = {m: multi_step_scores(matrix, chain) for m, chain in chains.items()}
        rows: list[dict[str, Any]] = []
        for m, chain in chains.items():
            rows.append({"method": m, "new": chain[-1], "old": "old", "AC": scores[m]["AC"], "AM": scores[m]["AM"],
                         "note": f"chain {' → '.join(chain)}; AC / AM over its lower-triangular matrix (CoReS)"})
            rows += [{"method": chain[t], "new": chain[t], "old": chain[t - 1]} for t in range(1, len(chain))]
        results = build_results(matrix, rows, None, title=f"Multi-step upgrade study: {self.config.name}",
                                rule=self.claim_rule(old_q, old_g), protocol=self.protocol(),
                                split_sizes=self.split_sizes(old_q, old_g))
        claims = self.record_claims(results, checkpoints, features)
        run = self.report_run() if self.config.logger == "wandb" else None
        try:
            files = write_report(self.out, results=results, logger=run)
        finally:
            if run is not None:
                run.finish()
        lines = ["", "## Multi-step compatibility (CoReS)", "",
                 "| method | chain | AC | AM (mAP %) |", "|---|---|---|---|"]
        lines += [f"| {m} | {' → '.join(chains[m])} | {results.method(m).extra['AC']:.2f} | "
                  f"{results.method(m).extra['AM']:.2f} |" for m in chains]
        report_md = self.out / "report.md"
        atomic_write_text(report_md, report_md.read_text() + "\n".join(lines) + "\n")
        print(report_md.read_text())
        return {"matrix": matrix, "chains": chains, "scores": scores, "claims": claims, "files": files,
                "results": results, "timings": self.timings}


def _report_run(name: str, out: Path, tags: list[str] | None = None, config: dict[str, Any] | None = None):
    """An offline wandb run (grouped with the study's training runs, in the study's one wandb folder) that receives
    the report: tables, plots, line plots of the backfill curves, and the results as summary scalars."""
    import wandb

    return wandb.init(project="reid_lab", name=f"{name}-report", group=name, job_type="upgrade-report",
                      dir=str(out), mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous",
                      tags=tags, config=config)


def _instantiate(value: Any, where: str) -> Any:
    """A ``{class_path, init_args}`` mapping of a config as its object (as LightningCLI would build it)."""
    if not (isinstance(value, dict) and "class_path" in value):
        return value
    module_name, _, class_name = str(value["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{where}: cannot import {value['class_path']!r}: {err}") from err
    return cls(**{k: _instantiate(v, where) for k, v in (value.get("init_args") or {}).items()})


def _check_name(name: Any, where: str) -> None:
    """Study and method names become folder and file names under ``study.out`` and wandb run names: they must
    match :data:`NAME_PATTERN` (no path separators, no dots, no quotes or markup)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{where}: name {name!r} is not allowed; names are 1-64 characters of letters, digits, "
                         "'_' and '-', starting with a letter or digit (they become folder and file names "
                         "inside study.out)")


def _check_keys(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def main(argv: list[str] | None = None) -> int:
    """``reid-lab upgrade --config experiments/<name>.yaml [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="reid-lab upgrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study YAML (experiments/<name>.yaml)")
    parser.add_argument("--out", default=None, help="report folder (overrides study.out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = StudyConfig.load(args.config)
        if args.out:
            config.out = Path(args.out)
        study = Study(config)
        study.validate()  # every stage's classes, options and plugins, before anything trains
    except (OSError, ValueError) as err:
        print(f"reid-lab upgrade: {err}", file=sys.stderr)
        return 2
    try:
        study.run()
    except FolderInUse as err:
        print(f"reid-lab upgrade: {err}", file=sys.stderr)
        return 2
    return 0


def _drop_training_state(checkpoint: str | Path) -> None:
    """Rewrite a checkpoint without optimiser and scheduler state (weights, hyper-parameters and records stay)."""
    ckpt = read_checkpoint(checkpoint)
    if "optimizer_states" in ckpt or "lr_schedulers" in ckpt:
        ckpt.pop("optimizer_states", None)
        ckpt.pop("lr_schedulers", None)
        atomic_torch_save(ckpt, checkpoint)


def _disk_usage(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
