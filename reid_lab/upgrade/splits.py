"""Upgrade splits: divide one training set into the old model's and the new model's training sets.

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

Splits are saved by :mod:`reid_lab.upgrade.split_files`; the scenario config that names a split is in
:mod:`reid_lab.upgrade.scenario`.

Example:
    >>> from reid_lab.data.records import ImageRecord
    >>> records = [ImageRecord(f"{pid}_{i}.jpg", pid, 0) for pid in range(4) for i in range(2)]
    >>> split = split_training_set(records, "open_class", old_fraction=0.5, seed=0)
    >>> split.summary()["old_ids"], split.summary()["new_ids"], split.summary()["shared_ids"]
    (2, 2, 0)
"""

from __future__ import annotations

import math
import numbers
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from reid_lab.data.records import ImageRecord

__all__ = [
    "SCENARIO_KINDS",
    "UpgradeSplit",
    "chain_splits",
    "check_kind",
    "label_map",
    "split_training_set",
]

ScenarioKind = Literal["extended_data", "extended_class", "open_data", "open_class"]
SCENARIO_KINDS: tuple[str, ...] = ("extended_data", "extended_class", "open_data", "open_class")
_NESTED_KINDS = ("extended_data", "extended_class")
_PER_IMAGE_KINDS = ("extended_data", "open_data")
SPLIT_FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------- validation


def check_kind(kind: Any) -> str:
    if kind not in SCENARIO_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SCENARIO_KINDS)}; got {kind!r}")
    return kind


def check_fraction(value: Any, name: str, *, allow_one: bool) -> float:
    upper = "1]" if allow_one else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, {upper}; got {value!r}")
    value = float(value)
    if not (0.0 < value < 1.0 or (allow_one and value == 1.0)):
        raise ValueError(f"{name} must be in (0, {upper}; got {value!r}")
    return value


def check_seed(seed: Any) -> int:
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


def check_fractions(fractions: Any) -> list[float]:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) < 2:
        raise ValueError(f"fractions must be a list of at least two numbers in (0, 1]; got {fractions!r}")
    checked = [check_fraction(f, f"fractions[{i}]", allow_one=True) for i, f in enumerate(fractions)]
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
    kind = check_kind(kind)
    steps, _ = _chain(_check_records(records), kind, check_fractions(fractions), check_seed(seed))
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
    kind = check_kind(kind)
    old_fraction = check_fraction(old_fraction, "old_fraction", allow_one=False)
    seed = check_seed(seed)
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


