"""Upgrade study report: JSON, Markdown tables and PNG plots (optionally logged to Weights & Biases).

One call, :func:`write_report`, renders one :class:`~reid_lab.studies.results.StudyResults` record into

* ``report.json`` — the record itself (compatibility matrix cells, backfilling curves, the study rows with
  their claim decisions and update gains, protocol, split sizes, claim rule); ``report.html``, the notebooks
  and ``reid-lab visualize`` read it back with :meth:`StudyResults.from_dict`;
* ``report.md`` — the protocol, the compatibility matrix for mAP and R1 and the study table
  ``method | self-test | cross-test | old self-test | claim | update gain | AUC per ordering | mean NFR``
  under a line stating the claim rule (margin and chance level);
* ``compatibility_matrix.png`` (heatmap), ``backfill_<metric>.png`` (one line per method/ordering,
  old self-test as a horizontal reference) and ``flips.png`` (NFR vs β);
* with a wandb logger: the same table cells, the matrix, the plots, and the run summary
  (``study/<method>/<quantity>``).

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
The study quantities follow BCT (Shen et al., CVPR 2020: criterion, update gain) and FastFill
(Jaeckle et al., ICLR 2023: area under the backfilling curve); see :mod:`reid_lab.studies.results`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reid_lab.atomic import atomic_write_bytes
from reid_lab.metrics.backfill import BackfillCurve
from reid_lab.metrics.compatibility import CompatibilityMatrix
from reid_lab.studies.results import (
    ClaimRule,
    StudyResults,
    build_results,
    json_ready,
    table_cells,
    table_header,
)

__all__ = ["report_markdown", "study_markdown", "study_rows", "write_report"]

_CURVE_METRICS = ("mAP", "R1", "mINP")


# ------------------------------------------------------------------------------------------------ study table


def study_rows(
    matrix: CompatibilityMatrix | None,
    summary_rows: Sequence[Mapping[str, Any]] | None,
    curves: Mapping[str, Mapping[str, BackfillCurve]] | None,
    metric: str = "mAP",
    rule: ClaimRule | None = None,
) -> list[dict[str, Any]]:
    """The study table's rows as plain dicts (the ``study`` list of ``report.json``), from
    :func:`reid_lab.studies.results.build_results`: ``method, self_test, cross_test, old_self_test, claim,
    update_gain, auc, mean_nfr, new, old, independent, note, extra``."""
    return [m.to_dict() for m in build_results(matrix, summary_rows, curves, metric=metric, rule=rule).methods]


def study_markdown(results: StudyResults) -> str:
    """The study table in Markdown, preceded by the claim rule it applies."""
    header = table_header(results)
    lines = [results.rule.describe(results.metric) + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(results)]
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


def _log_to_wandb(logger: Any, files: Mapping[str, Path], results: StudyResults, prefix: str) -> None:
    run = getattr(logger, "experiment", logger)  # Lightning WandbLogger -> its wandb Run
    if not callable(getattr(run, "log", None)):
        raise TypeError(
            f"logger must be a wandb Run or a logger with .experiment (a Run), got {type(logger).__name__}"
        )
    import wandb

    payload: dict[str, Any] = {}
    matrix = results.matrix
    if matrix is not None:
        columns = ["query", "gallery", "R1", "R5", "R10", "mAP", "mINP"]
        data = [[q, g] + [json_ready(v.get(k)) for k in columns[2:]] for (q, g), v in matrix.cells.items()]
        payload[f"{prefix}/tables/compatibility_matrix"] = wandb.Table(columns=columns, data=data)
    if results.methods:  # the same cells as report.md and report.html
        payload[f"{prefix}/tables/study"] = wandb.Table(columns=table_header(results), data=table_cells(results))
    for key, path in files.items():
        if path.suffix == ".png":
            payload[f"{prefix}/plots/{key}"] = wandb.Image(str(path))
    # the backfill and flip curves as wandb line plots too (zoomable, comparable across runs), same values
    lines = [(f"{m} / {o}", c) for m, by in results.curves.items() for o, c in by.items()]
    for name in (*_CURVE_METRICS, "NFR"):
        drawn = [(label, c) for label, c in lines if name in c.values]
        if drawn:
            payload[f"{prefix}/curves/{name}"] = wandb.plot.line_series(
                xs=[list(c.ratios) for _, c in drawn], ys=[list(c.metric(name)) for _, c in drawn],
                keys=[label for label, _ in drawn], title=f"backfilling: {name} vs backfill ratio β",
                xname="backfill ratio β")
    run.log(payload)
    summary = getattr(run, "summary", None)
    if summary is not None and callable(getattr(summary, "update", None)):
        summary.update(json_ready(results.summary_scalars()))


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
    rule: ClaimRule | None = None,
    split_sizes: Mapping[str, int] | None = None,
    results: StudyResults | None = None,
) -> dict[str, Path]:
    """Write the report of an upgrade study (JSON, Markdown, PNG plots), atomically.

    Every number comes from one :class:`~reid_lab.studies.results.StudyResults`: ``results`` when given,
    else the record :func:`~reid_lab.studies.results.build_results` makes of the other arguments.

    Args:
        out_dir: output folder, created if missing.
        matrix: compatibility matrix of the study versions.
        curves: ``{method: {ordering: BackfillCurve}}`` backfilling curves.
        summary_rows: study rows, see :func:`~reid_lab.studies.results.build_results` (e.g.
            ``{"method": "bct", "new": "bct", "old": "old", "independent": "indep"}``).
        title: report title (Markdown heading and JSON field).
        logger: optional wandb ``Run`` or Lightning ``WandbLogger``; tables, images and the run summary
            (``study/<method>/<quantity>``) are logged to it. A logger without ``log`` raises ``TypeError``.
        metric: metric of the study table and of the AUC column.
        log_prefix: key prefix for the wandb log.
        protocol: how the study chose and measured, recorded in the JSON and as a Markdown section.
        rule: the claim rule (margin, chance level); default: the margin alone.
        split_sizes: sizes of the evaluated splits (``query``, ``gallery``, ...), recorded with the protocol.
        results: the record itself (the other number arguments are then ignored).

    Returns:
        ``{"json", "markdown", "compatibility_matrix", "backfill_<metric>", "flips"}`` → paths of
        the files written (plots only when their data exists).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if results is None:
        results = build_results(matrix, summary_rows, curves, title=title, metric=metric, rule=rule,
                                protocol=protocol, split_sizes=split_sizes)
    matrix, curves = results.matrix, results.curves
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

    text = json.dumps(results.to_dict(), indent=2, allow_nan=False)
    files["json"] = atomic_write_bytes(out / "report.json", text.encode("utf-8"))
    files["markdown"] = atomic_write_bytes(out / "report.md", report_markdown(results, files).encode("utf-8"))
    if logger is not None:
        _log_to_wandb(logger, files, results, log_prefix)
    return files


def report_markdown(results: StudyResults, files: Mapping[str, Path] | None = None) -> str:
    """``report.md``: protocol, split sizes, compatibility matrix, study table (with the claim rule), plots."""
    sections = [f"# {results.title}"]
    if results.protocol or results.split_sizes:
        items = [f"- **{k}**: {v}" for k, v in results.protocol.items()]
        if results.split_sizes:
            items.append("- **split sizes**: " + ", ".join(f"{k} {v}" for k, v in results.split_sizes.items()))
        sections.append("## Protocol\n\n" + "\n".join(items))
    if results.matrix is not None:
        sections.append("## Compatibility matrix\n\nRows: query model, columns: gallery model (percent).")
        sections.append(results.matrix.to_markdown("mAP"))
        sections.append(results.matrix.to_markdown("R1"))
    if results.methods:
        sections.append(f"## Upgrade study ({results.metric}, percent)")
        sections.append(study_markdown(results))
        notes = [f"- {m.method}: {m.note}" for m in results.methods if m.note]
        if notes:
            sections.append("\n".join(notes))
        if results.curves:
            sections.append(f"AUC: the mean of {results.metric} over the equally spaced backfill-ratio grid from 0 "
                            "to 1 (FastFill's estimate of the expected metric over the backfilling process).")
    plots = [path for path in (files or {}).values() if path.suffix == ".png"]
    if plots:
        sections.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots))
    return "\n\n".join(sections) + "\n"
