"""Upgrade scenarios: split one training set into the old model's and the new model's training sets.

The four settings of UniBCT (Zhang et al., IJCAI 2022, "Towards Universal Backward-Compatible Representation
Learning"), see ``shared/reference/compatible-learning.md`` §1.3:

================  ===============================  ===============================
kind              old vs new training images       old vs new identities
================  ===============================  ===============================
extended_data     old ⊂ new (new = all images)     same identities
extended_class    old ⊂ new (new = all images)     old ⊂ new
open_data         disjoint                         same identities
open_class        disjoint                         disjoint
================  ===============================  ===============================

An architecture or dimension change is any of these with different ``old_model`` / ``new_model`` overrides
in the :class:`ScenarioConfig`.

Rules (all splits are deterministic functions of the records, the kind, the fractions and the seed):

* Input order does not matter: records are sorted by path first, and every returned list is sorted by path.
* Identities are permuted with ``random.Random(f"{seed}")``; the images of identity ``pid`` are permuted with
  ``random.Random(f"{seed}:{pid}")``, so one identity's split does not depend on the others. String seeds
  are hashed with SHA-512 by :mod:`random`, so splits do not depend on ``PYTHONHASHSEED`` or the platform.
  Because the kind is not part of the seed, ``extended_data`` and ``open_data`` with the same fraction and
  seed pick the same old images.
* Counts are ``fraction × n`` rounded half up (``floor(f·n + 0.5)``), then clamped so that every step of a
  split is well defined:

  - extended_data: each identity keeps ``clamp(round(f·n), 1, n)`` images on the old side (at least one,
    so the old side covers every identity; an identity with one image has it on both sides).
  - extended_class / open_class: the old side has ``clamp(round(f·N), 1, N - 1)`` of the ``N`` identities,
    so both sides have at least one identity (and extended_class gains at least one new identity).
  - open_data: each identity with ``n ≥ 2`` images gives ``clamp(round(f·n), 1, n - 1)`` images to the old
    side and the rest to the new side. **Identities with a single image are dropped from both sides**
    (kept in :attr:`UpgradeSplit.dropped`): open-data promises the same identities on both sides with
    disjoint images, which one image cannot satisfy, and a one-image identity on one side only would
    silently turn the split into a partly open-class one.

Chains (:func:`chain_splits`, e.g. BCT's φ1 → φ2 → φ3) use cumulative fractions ``f_1 < f_2 < … ≤ 1`` with
the same permutations: step ``i`` of the extended kinds is the first ``round(f_i·n)`` items (nested sets),
step ``i`` of the open kinds is the items between cut points ``i - 1`` and ``i`` (disjoint sets). A two-step
chain ``[f, 1.0]`` is exactly :func:`split_training_set` with ``old_fraction=f``.

Pids are kept as they come: the parsers relabel train pids to ``0 .. N-1`` over the whole training set, and
those serve as the raw ids shared by both sides. The data module relabels each subset again
(``train_subset``); :func:`label_map` gives the correspondence between the two relabelled class sets.

Splits are saved (:func:`save_split`) as ``old.json`` / ``new.json`` in the data module's ``train_subset``
format plus ``split.json``, so a study can always be reproduced (OpenCompatible issue #4: the splits of the
public code could not be reproduced).

Example:
    >>> from reid_lab.data.records import ImageRecord
    >>> records = [ImageRecord(f"{pid}_{i}.jpg", pid, 0) for pid in range(4) for i in range(2)]
    >>> split = split_training_set(records, "open_class", old_fraction=0.5, seed=0)
    >>> split.summary()["old_ids"], split.summary()["new_ids"], split.summary()["shared_ids"]
    (2, 2, 0)
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from reid_lab.atomic import atomic_write_json
from reid_lab.data.records import ImageRecord

__all__ = [
    "MODEL_OVERRIDE_KEYS",
    "SCENARIO_KINDS",
    "ScenarioConfig",
    "UpgradeSplit",
    "chain_splits",
    "label_map",
    "load_scenario",
    "load_split",
    "save_split",
    "split_training_set",
]

ScenarioKind = Literal["extended_data", "extended_class", "open_data", "open_class"]
SCENARIO_KINDS: tuple[str, ...] = ("extended_data", "extended_class", "open_data", "open_class")
_NESTED_KINDS = ("extended_data", "extended_class")
_PER_IMAGE_KINDS = ("extended_data", "open_data")
_SPLIT_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- validation


def _check_kind(kind: Any) -> str:
    if kind not in SCENARIO_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SCENARIO_KINDS)}; got {kind!r}")
    return kind


def _check_fraction(value: Any, name: str, *, allow_one: bool) -> float:
    upper = "1]" if allow_one else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, {upper}; got {value!r}")
    value = float(value)
    if not (0.0 < value < 1.0 or (allow_one and value == 1.0)):
        raise ValueError(f"{name} must be in (0, {upper}; got {value!r}")
    return value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    return seed


def _check_records(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    records = list(records)
    if not records:
        raise ValueError("records is empty; expected the training images of a dataset")
    checked = []
    for index, record in enumerate(records):
        if not isinstance(record, tuple) or len(record) != 3:
            raise ValueError(f"records[{index}] must be an ImageRecord(path, pid, camid); got {record!r}")
        record = ImageRecord(*record)
        if isinstance(record.pid, bool) or not isinstance(record.pid, int):
            raise ValueError(f"records[{index}].pid must be an integer; got {record.pid!r}")
        checked.append(record)
    checked.sort(key=lambda r: r.path)
    for previous, current in zip(checked, checked[1:]):
        if previous.path == current.path:
            raise ValueError(
                f"records name the image {current.path!r} twice; paths must be unique because subset files "
                "select images by path"
            )
    return checked


# ---------------------------------------------------------------------------------------------- splitting


def _round_half_up(fraction: float, n: int) -> int:
    # The epsilon keeps products such as 0.35 * 10 = 3.4999999999999996 on the side a reader expects.
    return math.floor(fraction * n + 0.5 + 1e-9)


def _cut_points(fractions: Sequence[float], n: int, *, strict: bool) -> list[int]:
    """Cumulative counts ``c_1 ≤ … ≤ c_S`` out of ``n`` items, one per fraction.

    ``strict``: every step gets at least one item (``c_i > c_{i-1}``, ``c_1 ≥ 1``); needs ``n ≥ S``.
    Otherwise ``c_1 ≥ 1`` and the counts never decrease (nested per-identity image sets).
    """
    steps = len(fractions)
    cuts: list[int] = []
    previous = 0
    for i, fraction in enumerate(fractions, start=1):
        count = _round_half_up(fraction, n)
        if strict:
            count = min(max(count, previous + 1), n - (steps - i))
        else:
            count = min(max(count, previous, 1), n)
        cuts.append(count)
        previous = count
    return cuts


def _group_by_pid(records: list[ImageRecord]) -> dict[int, list[ImageRecord]]:
    groups: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in records:  # already sorted by path, so every group is sorted by path too
        groups[record.pid].append(record)
    return dict(groups)


def _chain(
    records: list[ImageRecord], kind: str, fractions: list[float], seed: int
) -> tuple[list[list[ImageRecord]], list[ImageRecord]]:
    """The steps of a chain and the dropped records (open_data identities with too few images)."""
    groups = _group_by_pid(records)
    steps: list[list[ImageRecord]] = [[] for _ in fractions]
    dropped: list[ImageRecord] = []
    nested = kind in _NESTED_KINDS
    if kind in _PER_IMAGE_KINDS:
        for pid in sorted(groups):
            images = list(groups[pid])
            if not nested and len(images) < len(fractions):
                dropped.extend(images)
                continue
            random.Random(f"{seed}:{pid}").shuffle(images)
            cuts = _cut_points(fractions, len(images), strict=not nested)
            for i, cut in enumerate(cuts):
                start = 0 if nested or i == 0 else cuts[i - 1]
                steps[i].extend(images[start:cut])
    else:
        pids = sorted(groups)
        if len(pids) < len(fractions):
            raise ValueError(
                f"{kind} with {len(fractions)} steps needs at least {len(fractions)} identities; "
                f"the records have {len(pids)}"
            )
        random.Random(f"{seed}").shuffle(pids)
        cuts = _cut_points(fractions, len(pids), strict=True)
        for i, cut in enumerate(cuts):
            start = 0 if nested or i == 0 else cuts[i - 1]
            for pid in pids[start:cut]:
                steps[i].extend(groups[pid])
    return [sorted(step, key=lambda r: r.path) for step in steps], sorted(dropped, key=lambda r: r.path)


def _check_fractions(fractions: Any) -> list[float]:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) < 2:
        raise ValueError(f"fractions must be a list of at least two numbers in (0, 1]; got {fractions!r}")
    checked = [_check_fraction(f, f"fractions[{i}]", allow_one=True) for i, f in enumerate(fractions)]
    for i in range(1, len(checked)):
        if checked[i] <= checked[i - 1]:
            raise ValueError(f"fractions must be strictly increasing; got {list(fractions)!r}")
    return checked


def chain_splits(
    records: Sequence[ImageRecord], kind: ScenarioKind, fractions: Sequence[float], seed: int = 0
) -> list[list[ImageRecord]]:
    """The training sets of a chain of upgrades φ1 → φ2 → … (one list of records per step).

    Args:
        records: the full training set (pids relabelled over the whole set, as the parsers return it).
        kind: ``extended_data``, ``extended_class``, ``open_data`` or ``open_class``.
        fractions: cumulative fractions, strictly increasing in ``(0, 1]``, one per step (at least two).
        seed: seed of the identity and image permutations.

    Returns:
        One list per step, each sorted by path. Extended kinds give nested sets (step ``i`` ⊂ step ``i+1``);
        open kinds give pairwise disjoint sets (open_data drops identities with fewer images than steps).

    Example:
        >>> from reid_lab.data.records import ImageRecord
        >>> records = [ImageRecord(f"{pid}_{i}.jpg", pid, 0) for pid in range(6) for i in range(3)]
        >>> steps = chain_splits(records, "extended_class", [0.33, 0.66, 1.0], seed=0)
        >>> [len({r.pid for r in step}) for step in steps]
        [2, 4, 6]
    """
    kind = _check_kind(kind)
    steps, _ = _chain(_check_records(records), kind, _check_fractions(fractions), _check_seed(seed))
    return steps


@dataclass(frozen=True)
class UpgradeSplit:
    """The old and new training sets of one upgrade scenario.

    Attributes:
        old: training images of φ_old, sorted by path (pids as in the full training set).
        new: training images of φ_new, sorted by path.
        kind: ``extended_data``, ``extended_class``, ``open_data`` or ``open_class``.
        old_fraction: the fraction of images (per identity) or identities given to the old side.
        seed: seed of the permutations.
        dropped: images on neither side (open_data: identities with a single image), sorted by path.
    """

    old: list[ImageRecord]
    new: list[ImageRecord]
    kind: str
    old_fraction: float
    seed: int
    dropped: list[ImageRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts of the split: ids and images per side, shared ids and images, dropped images.

        Returns:
            A dict with ``kind``, ``old_fraction``, ``seed``, ``old_ids``, ``old_images``, ``new_ids``,
            ``new_images``, ``shared_ids``, ``shared_images`` and ``dropped_images``.
        """
        old_pids, new_pids = {r.pid for r in self.old}, {r.pid for r in self.new}
        shared_images = {r.path for r in self.old} & {r.path for r in self.new}
        return {
            "kind": self.kind,
            "old_fraction": self.old_fraction,
            "seed": self.seed,
            "old_ids": len(old_pids),
            "old_images": len(self.old),
            "new_ids": len(new_pids),
            "new_images": len(self.new),
            "shared_ids": len(old_pids & new_pids),
            "shared_images": len(shared_images),
            "dropped_images": len(self.dropped),
        }


def split_training_set(
    records: Sequence[ImageRecord], kind: ScenarioKind, old_fraction: float = 0.5, seed: int = 0
) -> UpgradeSplit:
    """Split a training set into the old and new training sets of an upgrade scenario.

    Args:
        records: the full training set (pids relabelled over the whole set, as the parsers return it).
        kind: ``extended_data`` (old = ``old_fraction`` of every identity's images, new = all),
            ``extended_class`` (old = all images of ``old_fraction`` of the identities, new = all),
            ``open_data`` (each identity's images split into disjoint old / new parts; single-image
            identities dropped) or ``open_class`` (old = ``old_fraction`` of the identities, new = the rest).
        old_fraction: in ``(0, 1)``; counts are rounded half up and clamped as the module docstring says.
        seed: seed of the identity and image permutations.

    Returns:
        The :class:`UpgradeSplit`; the same for any order of ``records``.

    Raises:
        ValueError: on an unknown kind, a fraction outside ``(0, 1)``, empty records, duplicate paths, or too
            few identities for a class split (two are needed).
    """
    kind = _check_kind(kind)
    old_fraction = _check_fraction(old_fraction, "old_fraction", allow_one=False)
    seed = _check_seed(seed)
    (old, new), dropped = _chain(_check_records(records), kind, [old_fraction, 1.0], seed)
    return UpgradeSplit(old=old, new=new, kind=kind, old_fraction=old_fraction, seed=seed, dropped=dropped)


def label_map(old_records: Sequence[ImageRecord], new_records: Sequence[ImageRecord]) -> Tensor:
    """For each class of the new training set, its class index in the old training set, or -1.

    Both sets are relabelled like :func:`~reid_lab.data.records.relabel` (and the data module's
    ``train_subset``): class ``k`` of a set is its ``k``-th smallest pid. Both must carry pids of the same
    training set (as returned by :func:`split_training_set`). BCT's classifier synthesis (Shen et al., CVPR
    2020) uses the map to pick the old classifier's row of each new class and to synthesise rows for the -1s.

    Args:
        old_records: training images of φ_old.
        new_records: training images of φ_new.

    Returns:
        ``(num_new_classes,)`` int64 tensor.

    Example:
        >>> from reid_lab.data.records import ImageRecord
        >>> old = [ImageRecord("a", 3, 0), ImageRecord("b", 7, 0)]
        >>> new = [ImageRecord("c", 1, 0), ImageRecord("d", 7, 0), ImageRecord("e", 3, 0)]
        >>> label_map(old, new).tolist()
        [-1, 0, 1]
    """
    old_index = {pid: label for label, pid in enumerate(sorted({r.pid for r in old_records}))}
    new_pids = sorted({r.pid for r in new_records})
    return torch.tensor([old_index.get(pid, -1) for pid in new_pids], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- files


def _side_payload(split: UpgradeSplit, side: str, records: list[ImageRecord]) -> dict[str, Any]:
    return {
        "paths": [r.path for r in records],
        "pids": [r.pid for r in records],
        "camids": [r.camid for r in records],
        "side": side,
        "kind": split.kind,
        "old_fraction": split.old_fraction,
        "seed": split.seed,
        "num_ids": len({r.pid for r in records}),
        "num_images": len(records),
    }


def _split_payloads(split: UpgradeSplit) -> dict[str, dict[str, Any]]:
    summary = split.summary()
    return {
        "old": _side_payload(split, "old", split.old),
        "new": _side_payload(split, "new", split.new),
        "split": {
            "format_version": _SPLIT_FORMAT_VERSION,
            **summary,
            "files": {"old": "old.json", "new": "new.json"},
            "dropped": {
                "paths": [r.path for r in split.dropped],
                "pids": [r.pid for r in split.dropped],
                "camids": [r.camid for r in split.dropped],
            },
        },
    }


def save_split(split: UpgradeSplit, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write ``old.json``, ``new.json`` and ``split.json`` into ``out_dir`` (atomically, one file at a time).

    ``old.json`` / ``new.json`` are ``train_subset`` files of :class:`~reid_lab.data.datamodule.ReIDDataModule`:
    ``{"paths": [...], "pids": [...], "camids": [...], "side", "kind", "old_fraction", "seed", "num_ids",
    "num_images"}``. ``split.json`` holds the parameters, :meth:`UpgradeSplit.summary` and the dropped images;
    it is written last, so its presence marks a complete split.

    Saving the identical split again changes nothing. Saving a different split into a folder that holds one
    raises, unless ``overwrite=True``, so a study's split cannot change under it.

    Args:
        split: the split to save.
        out_dir: folder to write into (created if missing).
        overwrite: replace a different split already saved there.

    Returns:
        ``{"old": path, "new": path, "split": path}``.

    Raises:
        FileExistsError: ``out_dir`` holds a different split and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payloads = _split_payloads(split)
    paths = {name: out_dir / f"{name}.json" for name in payloads}
    stale = []
    for name, path in paths.items():
        if path.exists():
            try:
                existing = json.loads(path.read_text())
            except json.JSONDecodeError:
                existing = None
            if existing != payloads[name]:
                stale.append(name)
        else:
            stale.append(name)
    conflicts = [name for name in stale if paths[name].exists()]
    if conflicts and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a different upgrade split ({', '.join(f'{n}.json' for n in conflicts)} "
            f"differ from kind={split.kind!r}, old_fraction={split.old_fraction}, seed={split.seed}); "
            "use another folder or pass overwrite=True"
        )
    if stale and paths["split"].exists():
        # Remove the completion marker first: a crash mid-way must not leave a complete-looking mixed split.
        paths["split"].unlink()
        stale = sorted(set(stale) | {"split"}, key=list(payloads).index)
    for name in stale:
        atomic_write_json(paths[name], payloads[name])
    return paths


def _records_from(payload: Mapping[str, Any], where: str) -> list[ImageRecord]:
    try:
        paths, pids, camids = payload["paths"], payload["pids"], payload["camids"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: expected an object with 'paths', 'pids' and 'camids' lists") from err
    if not (isinstance(paths, list) and isinstance(pids, list) and isinstance(camids, list)):
        raise ValueError(f"{where}: 'paths', 'pids' and 'camids' must be lists")
    if not len(paths) == len(pids) == len(camids):
        raise ValueError(
            f"{where}: 'paths', 'pids' and 'camids' have different lengths ({len(paths)}, {len(pids)}, "
            f"{len(camids)})"
        )
    return [ImageRecord(str(p), int(i), int(c)) for p, i, c in zip(paths, pids, camids)]


def load_split(out_dir: str | os.PathLike) -> UpgradeSplit:
    """Read a split written by :func:`save_split`.

    Args:
        out_dir: the folder holding ``old.json``, ``new.json`` and ``split.json``.

    Returns:
        The :class:`UpgradeSplit` (equal to the one saved).

    Raises:
        FileNotFoundError: a file is missing (``split.json`` missing means the save did not finish).
        ValueError: a file is not valid JSON, or its counts disagree with its contents.
    """
    out_dir = Path(out_dir)
    payloads: dict[str, Any] = {}
    for name in ("split", "old", "new"):
        path = out_dir / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; expected a split written by save_split()")
        try:
            payloads[name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    meta = payloads["split"]
    if not isinstance(meta, dict):
        raise ValueError(f"{out_dir / 'split.json'}: expected a JSON object")
    for key in ("kind", "old_fraction", "seed", "dropped"):
        if key not in meta:
            raise ValueError(f"{out_dir / 'split.json'}: missing key {key!r}")
    split = UpgradeSplit(
        old=_records_from(payloads["old"], str(out_dir / "old.json")),
        new=_records_from(payloads["new"], str(out_dir / "new.json")),
        kind=_check_kind(meta["kind"]),
        old_fraction=_check_fraction(meta["old_fraction"], "old_fraction", allow_one=False),
        seed=_check_seed(meta["seed"]),
        dropped=_records_from(meta["dropped"], f"{out_dir / 'split.json'} 'dropped'"),
    )
    expected = _split_payloads(split)
    for name in ("old", "new", "split"):
        if payloads[name] != expected[name]:
            differing = sorted(
                k for k in set(payloads[name]) | set(expected[name])
                if payloads[name].get(k) != expected[name].get(k)
            )
            raise ValueError(
                f"{out_dir / (name + '.json')} disagrees with the rest of the split in {', '.join(differing)}; "
                "the folder was edited or mixed with another split"
            )
    return split


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ScenarioConfig:
    """An upgrade scenario as written in ``configs/scenario/*.yaml`` (under a top-level ``scenario:`` key).

    Attributes:
        kind: ``extended_data``, ``extended_class``, ``open_data`` or ``open_class``.
        old_fraction: share of the old side, in ``(0, 1)`` (for chains: ``fractions[0]``).
        seed: seed of the split.
        old_model: init-argument overrides of :class:`~reid_lab.modules.ReIDModule` for φ_old
            (e.g. ``{"backbone": "resnet18"}``).
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


# Init arguments of ReIDModule (all but num_classes, which the data module sets) a scenario may override.
# Kept as data rather than read from the signature so that validating a config does not import Lightning.
MODEL_OVERRIDE_KEYS: tuple[str, ...] = (
    "backbone", "last_stride", "pooling", "embedding_dim", "neck_feat", "weights", "timm_kwargs", "losses",
    "optimizer", "lr", "weight_decay", "momentum", "center_lr", "scheduler", "milestones", "gamma",
    "warmup_epochs", "warmup_factor", "distance", "flip_test", "max_rank", "space_id", "upgrade",
)


def _check_model(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"scenario.{key} must be a mapping of model arguments; got {value!r}")
    unknown = sorted(set(value) - set(MODEL_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(
            f"scenario.{key} has unknown model argument(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(MODEL_OVERRIDE_KEYS)}"
        )
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
        kind = _check_kind(body["kind"])
        fractions = None if body.get("fractions") is None else _check_fractions(body["fractions"])
        default_fraction = fractions[0] if fractions is not None else 0.5
        old_fraction = _check_fraction(body.get("old_fraction", default_fraction), "old_fraction", allow_one=False)
        if fractions is not None and old_fraction != fractions[0]:
            raise ValueError(f"old_fraction ({old_fraction}) must equal fractions[0] ({fractions[0]}) in a chain")
        seed = _check_seed(body.get("seed", 0))
        old_model = _check_model(body.get("old_model"), "old_model")
        new_model = _check_model(body.get("new_model"), "new_model")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return ScenarioConfig(
        kind=kind, old_fraction=old_fraction, seed=seed, old_model=old_model, new_model=new_model,
        fractions=fractions,
    )
