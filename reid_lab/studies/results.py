"""One study, one record: every number an upgrade study reports, decided once.

A study computes a :class:`StudyResults` (the compatibility matrix, one :class:`MethodResult` per method with
its self-test, cross-test, claim decision, update gain, backfill AUCs and negative-flip rates, the protocol,
the split sizes and the claim rule with its chance level) and every page is a rendering of that record: the
console lines, ``report.md``, ``report.html``, the wandb tables and the wandb run summary. No renderer
decides anything: whether a claim holds and whether an update gain is shown are fields of the record.

The quantities:

* **cross-test** ``M(φ_new, φ_old)``: new queries against the old gallery; **self-test** ``M(φ_new, φ_new)``;
  **old self-test** ``M(φ_old, φ_old)`` (BCT, Shen et al. CVPR 2020). For FCT / FastFill the cross-test
  searches the transformed old gallery ``h(φ_old)`` with the base model's queries.
* **claim** (:class:`ClaimRule`): BCT's empirical criterion ``M(new, old) > M(old, old)``, required to hold
  by a margin (``claim_margin`` points) *and* clearly above chance, the mean over random rankings of the same
  queries and gallery: ``M(new, old) > chance + max(margin, 3 σ_chance)``. The study table's claim column is
  this rule, everywhere.
* **update gain** (BCT): ``(M(new, old) − M(old, old)) / (M(new*, new*) − M(old, old))`` with ``new*`` the
  independently trained model; withheld (``None``, rendered ``n/a``) when the denominator is under
  :data:`MIN_GAIN_DENOMINATOR` points, where it would be an extreme ratio of two small differences. Its two
  inputs are always kept.
* **AUC** (FastFill, Jaeckle et al. ICLR 2023): mean of the metric over the equally spaced backfill grid;
  **mean NFR**: mean top-1 negative-flip rate over the grid, percent of queries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from reid_lab.metrics.backfill import BackfillCurve
from reid_lab.metrics.compatibility import CompatibilityMatrix
from reid_lab.studies.claims import DEFAULT_CLAIM_MARGIN

__all__ = ["ClaimDecision", "ClaimRule", "MethodResult", "StudyResults", "UpdateGain", "build_results",
           "MIN_GAIN_DENOMINATOR"]

MIN_GAIN_DENOMINATOR = 1.0  # metric points: below this the independent model hardly improves on the old one


@dataclass(frozen=True)
class ClaimDecision:
    """Whether a cross-test earns a compatibility claim, with every input of the decision."""

    holds: bool
    cross: float
    reference: float  # the old self-test
    margin: float
    chance: float | None
    chance_std: float
    chance_margin: float
    reason: str  # one line: why it holds or not

    @property
    def short(self) -> str:
        """``yes`` or ``no (margin)`` / ``no (chance)``: the study table's cell."""
        if self.holds:
            return "yes"
        return "no (margin)" if self.cross <= self.reference + self.margin else "no (chance)"


@dataclass(frozen=True)
class ClaimRule:
    """The claim rule of a study: ``cross > reference + margin`` and ``cross > chance + chance_margin``.

    ``chance`` is the metric of random rankings of the study's own queries and gallery
    (:func:`reid_lab.studies.claims.chance_level`); ``chance_margin = max(margin, 3 · chance_std)``. Without a
    measured chance level only the margin applies, and the rule says so.
    """

    margin: float = DEFAULT_CLAIM_MARGIN
    chance: float | None = None
    chance_std: float = 0.0

    @property
    def chance_margin(self) -> float:
        return max(self.margin, 3 * self.chance_std)

    def describe(self, metric: str = "mAP") -> str:
        text = f"claim: cross-test {metric} > old self-test + {self.margin:.2f}"
        if self.chance is None:
            return text + " (chance level not measured)"
        return (text + f" and > chance {self.chance:.2f} ± {self.chance_std:.2f} + {self.chance_margin:.2f} "
                       f"(mean ± std over random rankings of the same queries and gallery)")

    def decide(self, cross: float, reference: float) -> ClaimDecision:
        above_old = cross > reference + self.margin
        above_chance = self.chance is None or cross > self.chance + self.chance_margin
        chance_text = ("chance not measured" if self.chance is None
                       else f"chance {self.chance:.2f} ± {self.chance_std:.2f}")
        if not above_old:
            reason = (f"cross-test {cross:.2f} is not above the old self-test {reference:.2f} by the margin "
                      f"{self.margin:.2f}")
        elif not above_chance:
            reason = (f"cross-test {cross:.2f} is within {self.chance_margin:.2f} of {chance_text}")
        else:
            reason = (f"cross-test {cross:.2f} > old self-test {reference:.2f} + {self.margin:.2f}, {chance_text}")
        return ClaimDecision(holds=above_old and above_chance, cross=float(cross), reference=float(reference),
                             margin=self.margin, chance=self.chance, chance_std=self.chance_std,
                             chance_margin=self.chance_margin, reason=reason)


@dataclass(frozen=True)
class UpdateGain:
    """BCT's update gain with its inputs; ``value`` is ``None`` when withheld (tiny denominator)."""

    value: float | None
    cross_minus_old: float
    independent_minus_old: float

    @classmethod
    def of(cls, cross: float, old_self: float, independent_self: float) -> UpdateGain:
        num, den = cross - old_self, independent_self - old_self
        value = num / den if abs(den) >= MIN_GAIN_DENOMINATOR else None
        return cls(value=value, cross_minus_old=float(num), independent_minus_old=float(den))

    @property
    def text(self) -> str:
        """``0.250 (+5.00 / +20.00)`` or, withheld, ``n/a (+4.00 / +0.20)``."""
        ratio = "n/a" if self.value is None else f"{self.value:.3f}"
        return f"{ratio} ({self.cross_minus_old:+.2f} / {self.independent_minus_old:+.2f})"


@dataclass
class MethodResult:
    """One row of the study: a method's numbers (percent) and decisions."""

    method: str
    self_test: float | None = None
    cross_test: float | None = None
    old_self_test: float | None = None
    claim: ClaimDecision | None = None
    update_gain: UpdateGain | None = None
    auc: dict[str, float] = field(default_factory=dict)
    mean_nfr: dict[str, float] = field(default_factory=dict)
    new: str | None = None  # the version whose queries the cross-test uses
    old: str | None = None  # the version whose gallery it searches
    independent: str | None = None  # the independently trained new model (update gain)
    note: str = ""  # e.g. "cross-test through the learned adapter (dimension change)"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. AC / AM of a multi-step chain

    @property
    def claim_holds(self) -> bool | None:
        return None if self.claim is None else self.claim.holds

    def to_dict(self) -> dict[str, Any]:
        """Flat: the fields, with ``extra``'s quantities (``AC``, ``AM``) as keys of their own."""
        out = asdict(self)
        out["claim"] = asdict(self.claim) if self.claim is not None else None
        out["update_gain"] = asdict(self.update_gain) if self.update_gain is not None else None
        out.update(out.pop("extra"))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodResult:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        claim, gain = known.pop("claim", None), known.pop("update_gain", None)
        return cls(**known, claim=ClaimDecision(**claim) if claim else None,
                   update_gain=UpdateGain(**gain) if gain else None,
                   extra={k: v for k, v in data.items() if k not in names and k != "extra"})


@dataclass
class StudyResults:
    """Everything a study reports (module docstring); pages render it, they never recompute it."""

    title: str
    metric: str = "mAP"
    rule: ClaimRule = field(default_factory=ClaimRule)
    protocol: dict[str, str] = field(default_factory=dict)
    split_sizes: dict[str, int] = field(default_factory=dict)
    matrix: CompatibilityMatrix | None = None
    curves: dict[str, dict[str, BackfillCurve]] = field(default_factory=dict)
    methods: list[MethodResult] = field(default_factory=list)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(f"no method {name!r} in the study; methods: {[m.method for m in self.methods]}")

    @property
    def orderings(self) -> list[str]:
        """Backfill orderings in the study's order (the AUC / NFR columns)."""
        return list(dict.fromkeys(o for m in self.methods for o in [*m.auc, *m.mean_nfr]))

    def to_dict(self) -> dict[str, Any]:
        return json_ready({
            "title": self.title, "metric": self.metric, "rule": asdict(self.rule),
            "rule_text": self.rule.describe(self.metric), "protocol": dict(self.protocol),
            "split_sizes": dict(self.split_sizes),
            "compatibility_matrix": self.matrix.to_dict() if self.matrix is not None else None,
            "curves": {m: {o: c.to_dict() for o, c in by.items()} for m, by in self.curves.items()},
            "study": [m.to_dict() for m in self.methods],
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyResults:
        matrix = data.get("compatibility_matrix")
        return cls(
            title=str(data.get("title", "")), metric=str(data.get("metric", "mAP")),
            rule=ClaimRule(**(data.get("rule") or {})), protocol=dict(data.get("protocol") or {}),
            split_sizes=dict(data.get("split_sizes") or {}),
            matrix=CompatibilityMatrix.from_dict(matrix) if matrix else None,
            curves={m: {o: BackfillCurve.from_dict(c) for o, c in by.items()}
                    for m, by in (data.get("curves") or {}).items()},
            methods=[MethodResult.from_dict(m) for m in data.get("study") or []],
        )

    def summary_scalars(self) -> dict[str, float | str | None]:
        """Flat ``study/<method>/<quantity>`` scalars (wandb run summary: sortable and chartable)."""
        out: dict[str, Any] = {}
        for m in self.methods:
            key = f"study/{m.method}"
            for name in ("self_test", "cross_test", "old_self_test"):
                if getattr(m, name) is not None:
                    out[f"{key}/{name}"] = getattr(m, name)
            if m.claim is not None:
                out[f"{key}/claim"] = int(m.claim.holds)
            if m.update_gain is not None:
                out[f"{key}/update_gain"] = m.update_gain.value
                out[f"{key}/update_gain_cross_minus_old"] = m.update_gain.cross_minus_old
                out[f"{key}/update_gain_independent_minus_old"] = m.update_gain.independent_minus_old
            for ordering, value in m.auc.items():
                out[f"{key}/auc_{ordering}"] = value
            for ordering, value in m.mean_nfr.items():
                out[f"{key}/mean_nfr_{ordering}"] = value
            for name, value in m.extra.items():
                if isinstance(value, (int, float)):
                    out[f"{key}/{name}"] = value
        if self.rule.chance is not None:
            out["study/chance"] = self.rule.chance
            out["study/chance_std"] = self.rule.chance_std
        out["study/claim_margin"] = self.rule.margin
        return out


def build_results(
    matrix: CompatibilityMatrix | None,
    summary_rows: Sequence[Mapping[str, Any]] | None,
    curves: Mapping[str, Mapping[str, BackfillCurve]] | None,
    *,
    title: str = "Compatible upgrade report",
    metric: str = "mAP",
    rule: ClaimRule | None = None,
    protocol: Mapping[str, str] | None = None,
    split_sizes: Mapping[str, int] | None = None,
) -> StudyResults:
    """Decide every number of the study table once.

    Each row needs ``"method"``. It names versions of ``matrix``: ``"new"`` and ``"old"`` (the cross-test is
    the cell ``(new, old)``, the self-test ``(new, new)``, the old self-test ``(old, old)``) and optionally
    ``"independent"`` (update gain). A row may name other cells as ``"self_cell"`` / ``"cross_cell"`` /
    ``"old_self_cell"`` (``(query version, gallery version)``): FCT / FastFill's cross-test is
    ``(method, method)``, its base model's queries against the transformed old gallery. Numbers given in the
    row (``self_test``, ``cross_test``, ``old_self_test``) win over the matrix; ``note`` and any other numeric
    key (``AC``, ``AM``) are kept. Without rows one row per method of ``curves`` is made.
    """
    rule = rule or ClaimRule()
    if summary_rows is None:
        summary_rows = [{"method": method} for method in (curves or {})]
    methods = []
    for index, given in enumerate(summary_rows):
        if "method" not in given:
            raise ValueError(f"summary_rows[{index}] needs a 'method' key, got keys {sorted(given)}")
        new, old, independent = given.get("new"), given.get("old"), given.get("independent")
        cells = {
            "self_test": given.get("self_cell") or ((new, new) if new else None),
            "cross_test": given.get("cross_cell") or ((new, old) if new and old else None),
            "old_self_test": given.get("old_self_cell") or ((old, old) if old else None),
        }
        values: dict[str, float | None] = {}
        for name, cell in cells.items():
            if name in given:
                values[name] = None if given[name] is None else float(given[name])
            elif matrix is not None and cell is not None and matrix.has(*cell):
                values[name] = matrix.cell(*cell, metric)
            else:
                values[name] = None
        result = MethodResult(method=str(given["method"]), **values, new=new, old=old, independent=independent,
                              note=str(given.get("note", "")))
        if result.cross_test is not None and result.old_self_test is not None:
            result.claim = rule.decide(result.cross_test, result.old_self_test)
            if independent is not None and matrix is not None and matrix.has(independent, independent):
                result.update_gain = UpdateGain.of(result.cross_test, result.old_self_test,
                                                   matrix.cell(independent, independent, metric))
        method_curves = (curves or {}).get(result.method, {})
        result.auc = {name: curve.auc(metric) for name, curve in method_curves.items()}
        result.mean_nfr = {name: float(np.mean(curve.values["NFR"])) for name, curve in method_curves.items()
                           if "NFR" in curve.values}
        result.extra = {k: v for k, v in given.items() if k in ("AC", "AM")}
        methods.append(result)
    return StudyResults(title=title, metric=metric, rule=rule, protocol=dict(protocol or {}),
                        split_sizes=dict(split_sizes or {}), matrix=matrix,
                        curves={m: dict(by) for m, by in (curves or {}).items()}, methods=methods)


# ------------------------------------------------------------------------------------------ formatting


def fmt(value: Any, digits: int = 2) -> str:
    """One number as every page prints it: ``—`` for missing or non-finite values."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, int, np.floating, np.integer)):
        return "—" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def claim_cell(result: MethodResult) -> str:
    return "—" if result.claim is None else result.claim.short


def gain_cell(result: MethodResult) -> str:
    return "—" if result.update_gain is None else result.update_gain.text


def table_header(results: StudyResults) -> list[str]:
    """The study table's columns, shared by report.md, report.html and the wandb table."""
    head = ["method", "self-test", "cross-test (new→old)", "old self-test", "claim", "update gain"]
    head += [f"AUC {results.metric} ({o})" for o in _orderings(results, "auc")]
    head += [f"mean NFR % ({o})" for o in _orderings(results, "mean_nfr")]
    extra = list(dict.fromkeys(k for m in results.methods for k in m.extra))
    return head + extra


def table_cells(results: StudyResults) -> list[list[str]]:
    """The study table's cells as text (same order as :func:`table_header`)."""
    auc, nfr = _orderings(results, "auc"), _orderings(results, "mean_nfr")
    extra = list(dict.fromkeys(k for m in results.methods for k in m.extra))
    rows = []
    for m in results.methods:
        cells = [m.method, fmt(m.self_test), fmt(m.cross_test), fmt(m.old_self_test), claim_cell(m), gain_cell(m)]
        cells += [fmt(m.auc.get(o)) for o in auc] + [fmt(m.mean_nfr.get(o)) for o in nfr]
        cells += [fmt(m.extra.get(k)) for k in extra]
        rows.append(cells)
    return rows


def console_lines(results: StudyResults) -> list[str]:
    """One ``[claims]`` line per method with a cross-test: the decision and why."""
    lines = []
    for m in results.methods:
        if m.claim is None:
            continue
        verdict = "claim" if m.claim.holds else "no claim"
        gain = f"; update gain {m.update_gain.text}" if m.update_gain is not None else ""
        note = f"; {m.note}" if m.note else ""
        lines.append(f"[claims] {m.method} on {m.old or 'old'}: {verdict} ({m.claim.reason}){gain}{note}")
    return lines


def _orderings(results: StudyResults, key: str) -> list[str]:
    return list(dict.fromkeys(o for m in results.methods for o in getattr(m, key)))


def json_ready(value: Any) -> Any:
    """Plain JSON types; NaN / inf become ``None`` so the file is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value

