"""Upgrade scenario configs (``configs/scenario/*.yaml``): the kind of split, its fractions and seed, and the
model arguments that differ between φ_old and φ_new (an architecture or dimension change)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from reid_lab.data.records import ImageRecord
from reid_lab.upgrade.splits import (
    SCENARIO_KINDS,
    UpgradeSplit,
    chain_splits,
    check_fraction,
    check_fractions,
    check_kind,
    check_seed,
    split_training_set,
)

__all__ = ["ScenarioConfig", "load_scenario"]


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ScenarioConfig:
    """An upgrade scenario as written in ``configs/scenario/*.yaml`` (under a top-level ``scenario:`` key).

    Attributes:
        kind: ``extended_data``, ``extended_class``, ``open_data`` or ``open_class``.
        old_fraction: share of the old side, in ``(0, 1)`` (for chains: ``fractions[0]``).
        seed: seed of the split.
        old_model: init-argument overrides of the model class for φ_old (e.g. ``{"backbone": "resnet18"}``);
            the study runner checks the names against the configured module class's signature before
            anything trains.
        new_model: overrides for φ_new (and every later step of a chain), e.g. ``{"backbone": "resnet50"}``.
        fractions: for a chain φ1 → φ2 → …, the cumulative fractions of :func:`chain_splits`; ``None`` for a
            single old → new upgrade.
    """

    kind: str
    old_fraction: float = 0.5
    seed: int = 0
    old_model: dict[str, Any] = field(default_factory=dict)
    new_model: dict[str, Any] = field(default_factory=dict)
    fractions: list[float] | None = None

    def split(self, records: Sequence[ImageRecord]) -> UpgradeSplit:
        """The old / new split of ``records`` (for a chain: the first step against all of ``records``)."""
        return split_training_set(records, self.kind, self.old_fraction, self.seed)  # type: ignore[arg-type]

    def chain(self, records: Sequence[ImageRecord]) -> list[list[ImageRecord]]:
        """The steps of the chain (``[old_fraction, 1.0]`` when ``fractions`` is not set)."""
        fractions = self.fractions if self.fractions is not None else [self.old_fraction, 1.0]
        return chain_splits(records, self.kind, fractions, self.seed)  # type: ignore[arg-type]


def _check_model(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"scenario.{key} must be a mapping of model arguments; got {value!r}")
    if "backbone" in value and not (isinstance(value["backbone"], str) and value["backbone"]):
        raise ValueError(f"scenario.{key}.backbone must be a backbone name; got {value['backbone']!r}")
    if "embedding_dim" in value:
        dim = value["embedding_dim"]
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
            raise ValueError(f"scenario.{key}.embedding_dim must be a positive integer or null; got {dim!r}")
    return dict(value)


def load_scenario(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> ScenarioConfig:
    """Read and validate an upgrade scenario.

    Args:
        path_or_dict: a YAML file with a top-level ``scenario:`` mapping (other top-level sections are left to
            the upgrade runner), or that file's content as a dict, or the ``scenario`` mapping itself.

    Returns:
        The validated :class:`ScenarioConfig`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a missing ``scenario`` section or ``kind``, an unknown key (the message lists the allowed
            ones), or a bad value (the message names the key and the expected value).
    """
    where = "scenario"
    if isinstance(path_or_dict, Mapping):
        document: Any = path_or_dict
    else:
        import yaml

        path = Path(path_or_dict)
        if not path.exists():
            raise FileNotFoundError(f"scenario file {path} does not exist")
        try:
            document = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"scenario file {path} is not valid YAML: {err}") from err
        where = f"{path}: scenario"
        if not isinstance(document, Mapping) or "scenario" not in document:
            raise ValueError(f"scenario file {path}: expected a top-level 'scenario:' mapping")
    body = document["scenario"] if "scenario" in document else document
    if not isinstance(body, Mapping):
        raise ValueError(f"{where} must be a mapping; got {body!r}")
    allowed = [f.name for f in fields(ScenarioConfig)]
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(allowed)}"
        )
    if "kind" not in body:
        raise ValueError(f"{where} is missing 'kind' (one of {', '.join(SCENARIO_KINDS)})")
    try:
        kind = check_kind(body["kind"])
        fractions = None if body.get("fractions") is None else check_fractions(body["fractions"])
        default_fraction = fractions[0] if fractions is not None else 0.5
        old_fraction = check_fraction(body.get("old_fraction", default_fraction), "old_fraction", allow_one=False)
        if fractions is not None and old_fraction != fractions[0]:
            raise ValueError(f"old_fraction ({old_fraction}) must equal fractions[0] ({fractions[0]}) in a chain")
        seed = check_seed(body.get("seed", 0))
        old_model = _check_model(body.get("old_model"), "old_model")
        new_model = _check_model(body.get("new_model"), "new_model")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return ScenarioConfig(
        kind=kind, old_fraction=old_fraction, seed=seed, old_model=old_model, new_model=new_model,
        fractions=fractions,
    )

