"""Mean ± standard deviation over seeds of an upgrade study's table (``report.json``).

Methods named ``<name>_seed<k>`` are grouped by ``<name>``; each row gives the self-test and cross-test mAP,
the cross-test minus the old self-test, how many seeds earn the compatibility claim (the study's own rule, read
from each row's ``claim``), the backfill AUC and the mean negative-flip rate under every ordering the study ran,
as mean ± sample standard deviation over the seeds (n = number of seeds). The old model's self-test is printed
above the table.

    python experiments/seed_summary.py reports/synthetic_bct_vs_ract
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SEEDED = re.compile(r"^(?P<name>.+)_seed(?P<seed>\d+)$")


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """``{method name without its seed suffix: [row of each seed]}``, in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        match = SEEDED.match(row["method"])
        groups[match["name"] if match else row["method"]].append(row)
    return dict(groups)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per method group: ``{"method", "n", column: (mean, std)}``."""
    out = []
    for name, group in group_rows(rows).items():
        summary = {"method": name, "n": len(group)}
        summary["self_test"] = mean_std([r["self_test"] for r in group])
        crosses = [r.get("cross_test") for r in group]
        if all(c is not None for c in crosses):
            summary["cross_test"] = mean_std(crosses)
            if all(r.get("old_self_test") is not None for r in group):
                summary["cross_minus_old"] = mean_std([r["cross_test"] - r["old_self_test"] for r in group])
        claims = [r["claim"]["holds"] for r in group if isinstance(r.get("claim"), dict)]
        if claims:
            summary["claims"] = f"{sum(claims)}/{len(claims)}"
        for key in ("auc", "mean_nfr"):
            for ordering in group[0].get(key) or {}:
                summary[f"{key}/{ordering}"] = mean_std([r[key][ordering] for r in group])
        out.append(summary)
    return out


def markdown(summaries: list[dict]) -> str:
    columns: list[str] = []
    for s in summaries:  # every column any method has, in first-seen order
        columns += [k for k in s if k not in ("method", "n") and k not in columns]
    lines = ["| method | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for s in summaries:
        cells = [("–" if c not in s else s[c] if isinstance(s[c], str) else f"{s[c][0]:.1f} ± {s[c][1]:.1f}")
                 for c in columns]
        lines.append(f"| {s['method']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_out", type=Path, help="the study's out folder (holding report.json)")
    args = parser.parse_args(argv)
    report = args.study_out / "report.json"
    if not report.is_file():
        print(f"seed_summary: {report} does not exist (run the study first)", file=sys.stderr)
        return 2
    rows = [r for r in json.loads(report.read_text())["study"] if "self_test" in r]
    olds = sorted({round(r["old_self_test"], 2) for r in rows if r.get("old_self_test") is not None})
    if olds:
        print(f"old model self-test (mAP): {', '.join(f'{o:.2f}' for o in olds)}\n")
    print(markdown(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
