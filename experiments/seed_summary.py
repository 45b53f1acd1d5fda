"""Mean ± standard deviation over seeds of an upgrade study's table (``report.json``).

Methods named ``<name>_seed<k>`` are grouped by ``<name>``; each row gives the self-test and cross-test mAP,
the backfill AUC and the mean negative-flip rate under every ordering the study ran, as mean ± sample standard
deviation over the seeds (n = number of seeds).

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
        summary["cross_test"] = mean_std([r["cross_test"] for r in group])
        for key in ("auc", "mean_nfr"):
            for ordering in group[0].get(key, {}):
                summary[f"{key}/{ordering}"] = mean_std([r[key][ordering] for r in group])
        out.append(summary)
    return out


def markdown(summaries: list[dict]) -> str:
    columns = [k for k in summaries[0] if k not in ("method", "n")]
    lines = ["| method | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for s in summaries:
        cells = [f"{s[c][0]:.1f} ± {s[c][1]:.1f}" if c in s else "–" for c in columns]
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
    print(markdown(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
