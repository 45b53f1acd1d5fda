"""The study configs under experiments/ (the demo's among them) validate before anything trains: every stage's
model class exists, its `model.init_args` are arguments of that class, the scenario's model overrides too, and
every compatible-loss plugin builds. A typo in a key (e.g. `last_activaton`) would otherwise surface only after
the stages before it had trained."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from reid_lab.studies.study import Study, StudyConfig

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted(p for p in (REPO / "experiments").glob("*.yaml") if "study" in (yaml.safe_load(p.read_text()) or {}))


def test_there_are_study_configs_to_check() -> None:
    assert REPO / "experiments" / "synthetic_upgrade.yaml" in STUDIES


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_config_validates_and_its_model_arguments_exist(path: Path) -> None:
    study = Study(StudyConfig.load(path))
    study.validate()
    for stage in ("old", "new"):
        spec = getattr(study.config, stage)
        cfg = study.compose(list(spec.get("configs") or []), dict(spec.get("overrides") or {}))
        module_name, _, class_name = cfg["model"]["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(cfg["model"].get("init_args") or {}) - allowed
        assert not unknown, f"{path.name} study.{stage}: unknown model arguments {sorted(unknown)}"


def test_a_misspelled_model_argument_is_caught() -> None:
    # The check above can fail: the same composition with a misspelled key reports it.
    study = Study(StudyConfig.load(REPO / "experiments" / "synthetic_upgrade.yaml"))
    cfg = study.compose(list(study.config.old.get("configs") or []), {"model.init_args.last_activaton": False})
    from reid_lab.modules import ReIDModule

    allowed = set(inspect.signature(ReIDModule.__init__).parameters)
    assert set(cfg["model"]["init_args"]) - allowed == {"last_activaton"}
