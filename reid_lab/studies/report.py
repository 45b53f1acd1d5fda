"""Upgrade study report: JSON, Markdown tables and PNG plots (optionally logged to Weights & Biases).

One call, :func:`write_report`, turns the results of an upgrade study into

* ``report.json`` — every number (compatibility matrix cells, backfilling curves, study rows);
* ``report.md`` — the compatibility matrix for mAP and R1 and the study table
  ``method | self-test | cross-test (new→old) | criterion pass | update gain | AUC mAP per ordering | mean NFR``;
  the update gain is printed with its inputs, ``gain (M(new, old) − M(old, old) / M(new*, new*) − M(old, old))``,
  and withheld (``n/a``) when the denominator is under one point;
* ``compatibility_matrix.png`` (heatmap), ``backfill_<metric>.png`` (one line per method/ordering,
  old self-test as a horizontal reference) and ``flips.png`` (NFR vs β).

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
The study quantities follow BCT (Shen et al., CVPR 2020: criterion, update gain) and FastFill
(Jaeckle et al., ICLR 2023: area under the backfilling curve).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reid_lab.atomic import atomic_write_bytes
from reid_lab.metrics.backfill import BackfillCurve
from reid_lab.metrics.compatibility import CompatibilityMatrix, compatibility_criterion, update_gain

__all__ = ["study_rows", "write_report"]

_CURVE_METRICS = ("mAP", "R1", "mINP")


# ------------------------------------------------------------------------------------------------ file output


def _json_ready(value: Any) -> Any:
    """Plain JSON types; NaN/inf become ``None`` so the file is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ------------------------------------------------------------------------------------------------ study table


def _curve_auc(curve: BackfillCurve, metric: str) -> float:
    """FastFill's AUC: the mean of the metric over an equally spaced β grid from 0 to 1 (the only definition)."""
    return curve.auc(metric)


def study_rows(
    matrix: CompatibilityMatrix | None,
    summary_rows: Sequence[Mapping[str, Any]] | None,
    curves: Mapping[str, Mapping[str, BackfillCurve]] | None,
    metric: str = "mAP",
) -> list[dict[str, Any]]:
    """Resolve the rows of the study table.

    Each input row needs ``"method"``. It may name versions of ``matrix`` — ``"new"``, ``"old"``
    and optionally ``"independent"`` — from which the missing numbers are computed:
    ``self_test = M(new, new)``, ``cross_test = M(new, old)``, ``old_self_test = M(old, old)``,
    ``criterion = M(new, old) > M(old, old)`` and ``update_gain`` (BCT, CVPR 2020). Numbers given
    explicitly in the row win. For a method with curves, ``auc[ordering]`` is the FastFill AUC of
    ``metric`` and ``mean_nfr[ordering]`` the mean top-1 NFR over the β grid (percent). Without
    ``summary_rows`` one row per method of ``curves`` is made.

    Returns:
        A list of dicts with keys ``method, self_test, cross_test, old_self_test, criterion,
        update_gain, auc, mean_nfr`` (plus any extra keys of the input row).
    """
    if summary_rows is None:
        summary_rows = [{"method": method} for method in (curves or {})]
    rows = []
    for index, given in enumerate(summary_rows):
        if "method" not in given:
            raise ValueError(f"summary_rows[{index}] needs a 'method' key, got keys {sorted(given)}")
        row: dict[str, Any] = {
            "self_test": None,
            "cross_test": None,
            "old_self_test": None,
            "criterion": None,
            "update_gain": None,
        }
        new, old, independent = given.get("new"), given.get("old"), given.get("independent")
        if matrix is not None and new is not None and old is not None:
            row["self_test"] = matrix.cell(new, new, metric) if matrix.has(new, new) else None
            row["cross_test"] = matrix.cell(new, old, metric) if matrix.has(new, old) else None
            row["old_self_test"] = matrix.cell(old, old, metric) if matrix.has(old, old) else None
            if matrix.has(new, old) and matrix.has(old, old):
                row["criterion"] = compatibility_criterion(matrix, new, old, metric)
            if (
                independent is not None
                and matrix.has(independent, independent)
                and row["criterion"] is not None
            ):
                row["update_gain"] = update_gain(matrix, new, old, independent, metric)
                old_self = matrix.cell(old, old, metric)
                row["update_gain_inputs"] = {  # reported with the ratio: a tiny denominator explodes it
                    "cross_minus_old": matrix.cell(new, old, metric) - old_self,
                    "independent_minus_old": matrix.cell(independent, independent, metric) - old_self,
                }
        row.update(given)
        method_curves = (curves or {}).get(given["method"], {})
        row["auc"] = {name: _curve_auc(curve, metric) for name, curve in method_curves.items()}
        row["mean_nfr"] = {
            name: float(np.mean(curve.values["NFR"]))
            for name, curve in method_curves.items()
            if "NFR" in curve.values
        }
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "✓" if value else "✗"
    if isinstance(value, (float, int, np.floating, np.integer)):
        return "—" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


MIN_GAIN_DENOMINATOR = 1.0  # metric points: below this the independent model hardly improves on the old one


def _gain(row: Mapping[str, Any]) -> str:
    """``gain (Δcross / Δindependent)``; the ratio is withheld when Δindependent is under
    :data:`MIN_GAIN_DENOMINATOR` points (it would be an extreme number that says nothing)."""
    inputs = row.get("update_gain_inputs")
    if not inputs:
        return _fmt(row.get("update_gain"), digits=3)
    num, den = inputs["cross_minus_old"], inputs["independent_minus_old"]
    if abs(den) < MIN_GAIN_DENOMINATOR:
        return f"n/a ({num:+.2f} / {den:+.2f})"
    return f"{_fmt(row.get('update_gain'), digits=3)} ({num:+.2f} / {den:+.2f})"


def _orderings(rows: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for name in row.get(key, {}):
            if name not in seen:
                seen.append(name)
    return seen


def _study_markdown(rows: Sequence[Mapping[str, Any]], metric: str) -> str:
    auc_orderings, nfr_orderings = _orderings(rows, "auc"), _orderings(rows, "mean_nfr")
    header = ["method", "self-test", "cross-test (new→old)", "criterion pass", "update gain"]
    header += [f"AUC {metric} ({name or 'order'})" for name in auc_orderings]
    header += [f"mean NFR ({name or 'order'})" for name in nfr_orderings]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            str(row["method"]),
            _fmt(row.get("self_test")),
            _fmt(row.get("cross_test")),
            _fmt(row.get("criterion")),
            _gain(row),
        ]
        cells += [_fmt(row["auc"].get(name)) for name in auc_orderings]
        cells += [_fmt(row["mean_nfr"].get(name)) for name in nfr_orderings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(width: float = 6.0, height: float = 4.0) -> Any:
    # matplotlib.figure.Figure renders with Agg on savefig and touches no pyplot global state
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _heatmap_png(matrix: CompatibilityMatrix, metric: str) -> bytes:
    values = matrix.to_array(metric)
    size = len(matrix.versions)
    fig = _new_figure(1.5 + 1.1 * size, 1.0 + 0.9 * size)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis")
    fig.colorbar(image, ax=ax, label=f"{metric} (%)")
    ax.set_xticks(range(size), labels=list(matrix.versions), rotation=45, ha="right")
    ax.set_yticks(range(size), labels=list(matrix.versions))
    ax.set_xlabel("gallery model")
    ax.set_ylabel("query model")
    finite = values[np.isfinite(values)]
    middle = float(finite.mean()) if finite.size else 0.0
    for i, query in enumerate(matrix.versions):
        for j, gallery in enumerate(matrix.versions):
            if np.isfinite(values[i, j]):
                colour = "black" if values[i, j] > middle else "white"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=colour)
            else:  # n/a: dimensions differ; —: not computed
                text = "n/a" if (query, gallery) in matrix.not_comparable else "—"
                ax.text(j, i, text, ha="center", va="center", color="grey")
    ax.set_title(f"Compatibility matrix ({metric})")
    return _figure_png(fig)


def _curve_label(method: str, ordering: str) -> str:
    return f"{method} / {ordering}" if ordering else method


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "x")


def _curve_styles(curves: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Line style of each ``(method, ordering)`` curve: the colour names the method, the line style and marker
    the ordering, so a 4-method x 4-ordering study never repeats a look (matplotlib's cycle has 10 colours)."""
    orderings = list(dict.fromkeys(o for by_ordering in curves.values() for o in by_ordering))
    styles = {}
    for m, (method, by_ordering) in enumerate(curves.items()):
        for ordering in by_ordering:
            o = orderings.index(ordering)
            styles[method, ordering] = {
                "color": f"C{m % 10}",
                "linestyle": _LINESTYLES[o % len(_LINESTYLES)],
                "marker": _MARKERS[o % len(_MARKERS)],
            }
    return styles


def _curves_png(curves: Mapping[str, Mapping[str, BackfillCurve]], metric: str) -> bytes:
    fig = _new_figure()
    ax = fig.add_subplot()
    references: dict[float, None] = {}
    styles = _curve_styles(curves)
    for method, by_ordering in curves.items():
        for ordering, curve in by_ordering.items():
            ax.plot(
                curve.ratios,
                curve.metric(metric),
                markersize=3,
                label=_curve_label(method, ordering),
                **styles[method, ordering],
            )
            if curve.old_self_test is not None and metric in curve.old_self_test:
                references[round(float(curve.old_self_test[metric]), 6)] = None
    for index, level in enumerate(references):
        ax.axhline(
            level, color="black", linestyle="--", linewidth=1, label="old self-test" if index == 0 else None
        )
    ax.set_xlabel("backfill ratio β")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"Backfilling curves ({metric})")
    ax.grid(alpha=0.3)
    # outside the axes: with a dozen curves an inside legend hides some of them (bbox_inches="tight" keeps it)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _figure_png(fig)


def _flips_png(curves: Mapping[str, Mapping[str, BackfillCurve]]) -> bytes:
    fig = _new_figure()
    ax = fig.add_subplot()
    styles = _curve_styles(curves)
    for method, by_ordering in curves.items():
        for ordering, curve in by_ordering.items():
            if "NFR" in curve.values:
                ax.plot(
                    curve.ratios,
                    curve.metric("NFR"),
                    markersize=3,
                    label=_curve_label(method, ordering),
                    **styles[method, ordering],
                )
    ax.set_xlabel("backfill ratio β")
    ax.set_ylabel("negative flip rate NFR (%)")
    ax.set_title("Negative flips vs old system (top-1)")
    ax.grid(alpha=0.3)
    # outside the axes: with a dozen curves an inside legend hides some of them (bbox_inches="tight" keeps it)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _figure_png(fig)


# ------------------------------------------------------------------------------------------------ wandb


def _log_to_wandb(
    logger: Any,
    files: Mapping[str, Path],
    matrix: CompatibilityMatrix | None,
    rows: Sequence[Mapping[str, Any]],
    prefix: str,
) -> None:
    run = getattr(logger, "experiment", logger)  # Lightning WandbLogger -> its wandb Run
    if not callable(getattr(run, "log", None)):
        raise TypeError(
            f"logger must be a wandb Run or a logger with .experiment (a Run), got {type(logger).__name__}"
        )
    import wandb

    payload: dict[str, Any] = {}
    if matrix is not None:
        columns = ["query", "gallery", "R1", "R5", "R10", "mAP", "mINP"]
        data = [[q, g] + [_json_ready(v.get(k)) for k in columns[2:]] for (q, g), v in matrix.cells.items()]
        payload[f"{prefix}/tables/compatibility_matrix"] = wandb.Table(columns=columns, data=data)
    if rows:
        scalars = ["method", "self_test", "cross_test", "old_self_test", "criterion", "update_gain"]
        auc_orderings, nfr_orderings = _orderings(rows, "auc"), _orderings(rows, "mean_nfr")
        columns = scalars + [f"auc_{o}" for o in auc_orderings] + [f"mean_nfr_{o}" for o in nfr_orderings]
        data = [
            [_json_ready(row.get(c)) for c in scalars]
            + [_json_ready(row["auc"].get(o)) for o in auc_orderings]
            + [_json_ready(row["mean_nfr"].get(o)) for o in nfr_orderings]
            for row in rows
        ]
        payload[f"{prefix}/tables/study"] = wandb.Table(columns=columns, data=data)
    for key, path in files.items():
        if path.suffix == ".png":
            payload[f"{prefix}/plots/{key}"] = wandb.Image(str(path))
    run.log(payload)


# ------------------------------------------------------------------------------------------------ entry point


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    matrix: CompatibilityMatrix | None = None,
    curves: Mapping[str, Mapping[str, BackfillCurve]] | None = None,
    summary_rows: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Compatible upgrade report",
    logger: Any = None,
    metric: str = "mAP",
    log_prefix: str = "upgrade",
    protocol: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write the report of an upgrade study (JSON, Markdown, PNG plots), atomically.

    Args:
        out_dir: output folder, created if missing.
        matrix: compatibility matrix of the study versions.
        curves: ``{method: {ordering: BackfillCurve}}`` backfilling curves.
        summary_rows: study rows, see :func:`study_rows` (e.g.
            ``{"method": "bct", "new": "bct", "old": "old", "independent": "indep"}``).
        title: report title (Markdown heading and JSON field).
        logger: optional wandb ``Run`` or Lightning ``WandbLogger``; tables and images are logged
            to it. Skipped only when ``None``; a logger without ``log`` raises ``TypeError``.
        metric: metric of the study table and of the AUC column.
        log_prefix: key prefix for the wandb log.
        protocol: how the study chose and measured (e.g. ``{"evaluation": ..., "validation": ...,
            "selection": ...}``), recorded in the JSON and as a Markdown section.

    Returns:
        ``{"json", "markdown", "compatibility_matrix", "backfill_<metric>", "flips"}`` → paths of
        the files written (plots only when their data exists).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = study_rows(matrix, summary_rows, curves, metric) if (summary_rows is not None or curves) else []
    files: dict[str, Path] = {}

    # plots first, so a plotting error leaves no half-finished report.json/.md pair
    if matrix is not None and matrix.cells:
        files["compatibility_matrix"] = atomic_write_bytes(
            out / "compatibility_matrix.png", _heatmap_png(matrix, "mAP")
        )
    if curves:
        all_curves = [c for by_ordering in curves.values() for c in by_ordering.values()]
        for name in _CURVE_METRICS:
            if all(name in c.values for c in all_curves):
                files[f"backfill_{name}"] = atomic_write_bytes(
                    out / f"backfill_{name}.png", _curves_png(curves, name)
                )
        if any("NFR" in c.values for c in all_curves):
            files["flips"] = atomic_write_bytes(out / "flips.png", _flips_png(curves))

    report = {
        "title": title,
        "metric": metric,
        "compatibility_matrix": matrix.to_dict() if matrix is not None else None,
        "curves": {m: {o: c.to_dict() for o, c in by.items()} for m, by in (curves or {}).items()},
        "study": rows,
        "protocol": dict(protocol or {}),
    }
    text = json.dumps(_json_ready(report), indent=2, allow_nan=False)
    files["json"] = atomic_write_bytes(out / "report.json", text.encode("utf-8"))

    sections = [f"# {title}"]
    if protocol:
        sections.append("## Protocol\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in protocol.items()))
    if matrix is not None:
        sections.append("## Compatibility matrix\n\nRows: query model, columns: gallery model (percent).")
        sections.append(matrix.to_markdown("mAP"))
        sections.append(matrix.to_markdown("R1"))
    if rows:
        sections.append(f"## Upgrade study ({metric}, percent)")
        sections.append(_study_markdown(rows, metric))
        if curves:
            sections.append(f"AUC: the mean of {metric} over the equally spaced backfill-ratio grid from 0 to 1 "
                            "(FastFill's estimate of the expected metric over the backfilling process).")
    plots = [path for key, path in files.items() if path.suffix == ".png"]
    if plots:
        sections.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots))
    files["markdown"] = atomic_write_bytes(out / "report.md", ("\n\n".join(sections) + "\n").encode("utf-8"))

    if logger is not None:
        _log_to_wandb(logger, files, matrix, rows, log_prefix)
    return files
