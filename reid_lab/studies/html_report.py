"""``reid-lab report``: one self-contained HTML page per upgrade study, readable offline.

    reid-lab report --study reports/synthetic_upgrade            # writes reports/synthetic_upgrade/report.html

The page gathers what a study wrote (``reid-lab upgrade`` calls this at its end too):

* the protocol (how checkpoints were chosen and what was measured) and the study table of the study's one
  results record (:mod:`reid_lab.studies.results`: self-test, cross-test, claim under the stated rule, update
  gain, backfill AUC and mean negative-flip rate per ordering), cell for cell as ``report.md`` prints it;
* the compatibility matrix as a heatmap and as numbers; the backfill and flip curves;
* negatively flipped queries as images: for each method, the queries the old system answered right at rank 1
  and the new model's queries searching the old gallery (the hot-refresh start) answer wrong, ranked side by
  side (:mod:`reid_lab.studies.ranked_lists`);
* the resolved config of every trained stage, and the stage times.

Every picture is embedded as a ``data:`` URI: the file can be mailed or archived on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from reid_lab.atomic import atomic_write_text
from reid_lab.embedding.features import FeatureSet
from reid_lab.studies.pictures import PAGE_STYLE, escape, file_uri, legend_html
from reid_lab.studies.ranked_lists import as_feature_sets, compare_systems
from reid_lab.studies.ranked_render import list_html, new_thumbs
from reid_lab.studies.results import StudyResults, table_cells, table_header

CURVE_FILES = ("compatibility_matrix.png", "backfill_mAP.png", "backfill_R1.png", "backfill_mINP.png", "flips.png")


def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return "–" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}f}"
    return "–" if value is None else escape(value)


def study_table(results: StudyResults) -> str:
    """The study table: the cells of ``report.md`` and the wandb table (:func:`table_cells`), as HTML."""
    head = table_header(results)
    out = [f"<p>{escape(results.rule.describe(results.metric))}.</p>",
           "<table><tr>" + "".join(f'<th class="{"name" if i == 0 else ""}">{escape(h)}</th>'
                                   for i, h in enumerate(head)) + "</tr>"]
    for cells in table_cells(results):
        out.append(f'<tr><td class="name">{escape(cells[0])}</td>'
                   + "".join(f"<td>{escape(c)}</td>" for c in cells[1:]) + "</tr>")
    out.append("</table>")
    notes = [f"<li><b>{escape(m.method)}</b>: {escape(m.note)}</li>" for m in results.methods if m.note]
    if notes:
        out.append("<ul>" + "".join(notes) + "</ul>")
    return "\n".join(out)


def matrix_table(matrix: dict[str, Any], metric: str = "mAP") -> str:
    """The compatibility matrix (rows: query model, columns: gallery model)."""
    versions = list(matrix.get("versions") or [])
    cells = {(c["query"], c["gallery"]): c for c in matrix.get("cells") or []}
    out = [f"<table><tr><th class='name'>{escape(metric)} query ↓ / gallery →</th>"
           + "".join(f"<th>{escape(v)}</th>" for v in versions) + "</tr>"]
    for q in versions:
        row = "".join(f"<td>{_number((cells.get((q, g)) or {}).get(metric))}</td>" for g in versions)
        out.append(f"<tr><td class='name'><b>{escape(q)}</b></td>{row}</tr>")
    out.append("</table>")
    return "\n".join(out)


def flipped_queries_html(study: Path, rows: list[dict[str, Any]], per_method: int, top_k: int) -> str:
    """For each method with feature files: its negatively flipped queries at the hot-refresh start, as images."""
    parts = []
    thumbs, uris = new_thumbs(), {}
    cache: dict[str, tuple[FeatureSet, FeatureSet]] = {}

    def load(version: str) -> tuple[FeatureSet, FeatureSet] | None:
        if version not in cache:
            path = study / "features" / f"{version}.pt"
            if not path.is_file():
                return None
            cache[version] = as_feature_sets(FeatureSet.load(path))
        return cache[version]

    for r in rows:
        old, new = r.get("old"), r.get("new")
        if not old or not new or old == new:
            continue
        old_fs, new_fs = load(old), load(new)
        if old_fs is None or new_fs is None:
            continue
        # the gallery of the method's cross-test, as the matrix scored it
        gallery, label, where = old_fs[1], old, "the old gallery"
        transformed = study / "features" / f"{r['method']}.transformed_gallery.pt"
        if r["method"] != new:  # FCT / FastFill: the base model's queries against its transformed old gallery
            if not transformed.is_file():
                continue
            h = torch.load(transformed, weights_only=True)["gallery"]  # FCT / FastFill: h(φ_old), old gallery order
            gallery = dataclasses.replace(old_fs[1], features=h)
            label, where = f"h({old})", "the transformed old gallery h(φ_old)"
        elif new_fs[0].features.shape[1] != old_fs[1].features.shape[1]:
            adapted = load(f"{new}.in_old_space")  # a dimension change: its queries through its adapter
            if adapted is None:
                continue
            new_fs = adapted
            where = "the old gallery through its adapter"
        ref, cross = f"{old} -> {old}", f"{new} -> {label}"
        comparisons = compare_systems({ref: old_fs, cross: (new_fs[0], gallery)}, ref, top_k)
        flipped = [c for c in comparisons if c.flipped]
        total = len(comparisons)
        parts.append(f"<h3>{escape(r['method'])}: {len(flipped)} of {total} queries flip "
                     f"({100 * len(flipped) / max(1, total):.1f} %) when its queries search {escape(where)}</h3>")
        for c in flipped[:per_method]:
            parts.append(f'<div class="query"><b>query {c.query}</b>')
            parts.extend(list_html(name, lst, thumbs, uris) for name, lst in c.lists.items())
            parts.append("</div>")
    return "\n".join(parts)


def configs_html(study: Path) -> str:
    parts = []
    for config in sorted((study / "train").glob("*/config.yaml")):
        parts.append(f"<details><summary>{escape(config.parent.name)}</summary>"
                     f"<pre>{escape(config.read_text())}</pre></details>")
    return "\n".join(parts) or "<p>no stage configs found under train/</p>"


def write_html_report(study: str | Path, flips_per_method: int = 5, top_k: int = 10) -> Path:
    """Write ``<study>/report.html`` from the study's ``report.json``, plots, features and stage configs."""
    study = Path(study)
    report_path = study / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} does not exist: run the study first (reid-lab upgrade --config ...)")
    report = json.loads(report_path.read_text())
    results = StudyResults.from_dict(report)
    title = results.title or f"Upgrade study: {study.name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{PAGE_STYLE}</style></head><body><h1>{escape(title)}</h1>"]
    items = [f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in results.protocol.items()]
    if results.split_sizes:
        items.append("<li><b>split sizes</b>: " + escape(", ".join(f"{k} {v}" for k, v in
                                                                  results.split_sizes.items())) + "</li>")
    if items:
        parts.append("<h2>Protocol</h2><ul>" + "".join(items) + "</ul>")
    rows = report.get("study") or []
    if results.methods:
        parts.append(f"<h2>Study ({escape(results.metric)}, percent)</h2>")
        parts.append("<p>cross-test: the new model's queries against the old model's gallery; claim: the rule "
                     "below (BCT's criterion, Shen et al. CVPR'20, by a margin and clear of chance); update gain: "
                     "(cross − old) / (independent − old) with its two differences, n/a under a 1-point "
                     "denominator; AUC: mean over the backfill-ratio grid; NFR: negative flips in percent of "
                     "queries, mean over the grid.</p>")
        parts.append(study_table(results))
    matrix = report.get("compatibility_matrix")
    if matrix:
        parts.append("<h2>Compatibility matrix</h2>" + matrix_table(matrix, "mAP") + matrix_table(matrix, "R1"))
    figures = [name for name in CURVE_FILES if (study / name).is_file()]
    if figures:
        parts.append("<h2>Plots</h2>")
        parts.extend(f'<figure><img src="{file_uri(study / name)}" alt="{escape(name)}">'
                     f"<figcaption>{escape(name)}</figcaption></figure>" for name in figures)
    flips = flipped_queries_html(study, rows, flips_per_method, top_k)
    if flips:
        parts.append("<h2>Negatively flipped queries</h2>" + legend_html() + flips)
    timings = study / "timings.json"
    if timings.is_file():
        t = json.loads(timings.read_text())
        parts.append("<h2>Stage times</h2><table>" + "".join(
            f"<tr><td class='name'>{escape(k)}</td><td>{_number(v, 1)} s</td></tr>" for k, v in t.items())
            + "</table>")
    parts.append("<h2>Resolved configs</h2>" + configs_html(study))
    parts.append("</body></html>")
    return atomic_write_text(study / "report.html", "\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-lab report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="the study's output folder (its `out:`)")
    parser.add_argument("--flips", type=int, default=5, help="flipped queries shown per method")
    parser.add_argument("--top-k", type=int, default=10, help="gallery items per ranked list")
    args = parser.parse_args(argv)
    path = write_html_report(args.study, args.flips, args.top_k)
    print(f"[report] {path} ({path.stat().st_size / 2**20:.1f} MiB, self-contained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
