"""One study record, five renderings: the console lines, report.md, report.html, the wandb study table and the
wandb run summary all show the record's numbers and decisions, checked number by number against the record's
fields (not against each other).

The record reproduces the cases the numbers issue found: a claim that passes the margin but not the distance
from chance ("criterion pass ✓" with chance at 8.09 ± 0.19 before), an update gain over a denominator of 0.34
points (withheld in report.md, printed as -3.059 in report.html and wandb before), and FastFill's row, whose
gain used the same 0.34 denominator without being withheld.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from reid_lab.metrics.compatibility import CompatibilityMatrix
from reid_lab.studies.html_report import write_html_report
from reid_lab.studies.report import write_report
from reid_lab.studies.results import ClaimRule, StudyResults, build_results, console_lines
from tests.studies.test_report import _curve
from tests.wandb_records import is_complete, run_summary


def _cells(value: float) -> dict[str, float]:
    return {"R1": value + 10, "R5": value + 20, "R10": value + 25, "mAP": value, "mINP": value / 2}


def _record() -> StudyResults:
    cells = {
        ("old", "old"): _cells(8.00),
        ("independent", "independent"): _cells(8.34),  # 0.34 above old: every update gain is withheld
        ("independent", "old"): _cells(6.96),
        ("bct", "bct"): _cells(8.50),
        ("bct", "old"): _cells(8.67),  # above old, not by the 1-point margin
        ("ract", "ract"): _cells(11.0),
        ("ract", "old"): _cells(9.50),  # above old + margin, within 1.5 of chance 8.60
        ("fastfill", "fastfill"): _cells(12.40),  # base queries against h(old gallery)
    }
    matrix = CompatibilityMatrix(("old", "independent", "bct", "ract", "fastfill"), cells, {})
    rows = [{"method": m, "new": m, "old": "old", "independent": "independent"} for m in ("independent", "bct", "ract")]
    rows.append({"method": "fastfill", "new": "ract", "old": "old", "independent": "independent",
                 "self_cell": ("ract", "ract"), "cross_cell": ("fastfill", "fastfill"),
                 "old_self_cell": ("old", "old"), "note": "cross-test: ract's queries against h(φ_old)"})
    curves = {m: {"random": _curve("random", [v, v + 1, v + 2], [3.0, 2.0, 1.0])}
              for m, v in (("independent", 7.0), ("bct", 8.0), ("ract", 9.0), ("fastfill", 10.0))}
    return build_results(matrix, rows, curves, title="Upgrade study: renderings", rule=ClaimRule(1.0, 8.60, 0.50),
                         protocol={"evaluation": "test query / gallery"}, split_sizes={"test queries": 30})


def test_the_record_decides_claims_and_gains_by_the_rule():
    record = _record()
    # hand-computed: chance margin max(1, 3 * 0.5) = 1.5; threshold max(8 + 1, 8.6 + 1.5) = 10.1
    assert [record.method(m).claim.holds for m in ("independent", "bct", "ract", "fastfill")] == [
        False, False, False, True]
    assert record.method("bct").claim.short == "no (margin)" and record.method("ract").claim.short == "no (chance)"
    for m in record.methods:  # a 0.34-point denominator: no ratio anywhere, inputs kept
        assert m.update_gain.value is None
        assert m.update_gain.independent_minus_old == pytest.approx(0.34)
    assert record.method("fastfill").update_gain.cross_minus_old == pytest.approx(4.40)
    assert record.method("fastfill").self_test == 11.0  # its base model's self-test


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None


def _number(text: str) -> float | None:
    return None if text in ("—", "–", "") else float(text)


def _check_row(header: list[str], cells: list[str], record: StudyResults, where: str) -> None:
    """The cells of one rendered row equal the record's fields for that method."""
    m = record.method(cells[0])
    by = dict(zip(header, cells))
    for column, value in (("self-test", m.self_test), ("cross-test (new→old)", m.cross_test),
                          ("old self-test", m.old_self_test)):
        assert _number(by[column]) == pytest.approx(value, abs=0.005), (where, m.method, column)
    assert by["claim"].startswith("yes" if m.claim.holds else "no"), (where, m.method)
    gain = re.fullmatch(r"(n/a|-?[\d.]+) \(([+-][\d.]+) / ([+-][\d.]+)\)", by["update gain"])
    assert gain, (where, by["update gain"])
    assert (gain[1] == "n/a") == (m.update_gain.value is None), (where, m.method)
    assert float(gain[2]) == pytest.approx(m.update_gain.cross_minus_old, abs=0.005)
    assert float(gain[3]) == pytest.approx(m.update_gain.independent_minus_old, abs=0.005)
    assert _number(by["AUC mAP (random)"]) == pytest.approx(m.auc["random"], abs=0.005)
    assert _number(by["mean NFR % (random)"]) == pytest.approx(m.mean_nfr["random"], abs=0.005)


def test_console_markdown_html_and_wandb_render_the_same_record(tmp_path):
    wandb = pytest.importorskip("wandb")
    record = _record()
    run = wandb.init(project="reid_lab_test", dir=str(tmp_path), mode="offline")
    try:
        write_report(tmp_path / "study", results=record, logger=run)
    finally:
        run.finish()
    wandb.teardown()  # the service has written every file of the run before we read them back

    # console
    lines = {line.split()[1]: line for line in console_lines(record)}
    for m in record.methods:
        assert (": claim (" in lines[m.method]) == m.claim.holds, lines[m.method]
        assert m.claim.reason in lines[m.method]

    # report.md: the rule above the table, then one row per method
    text = (tmp_path / "study" / "report.md").read_text()
    assert "> old self-test + 1.00 and > chance 8.60 ± 0.50 + 1.50" in text
    study_part = text[text.index("## Upgrade study"):]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in study_part.splitlines()
             if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert len(body) == 4
    for cells in body:
        _check_row(header, cells, record, "report.md")

    # report.html, read back from report.json through the record
    page = write_html_report(tmp_path / "study").read_text()
    assert "chance 8.60 ± 0.50" in page
    parser = _Tables()
    parser.feed(page)
    study_table = next(t for t in parser.tables if t[0][0] == "method")
    assert len(study_table) == 5
    for cells in study_table[1:]:
        _check_row(study_table[0], cells, record, "report.html")

    # wandb: the study table and the run summary
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (table_file,) = (run_dir / "files" / "media" / "table" / "upgrade" / "tables").glob("study_*.table.json")
    logged = json.loads(table_file.read_text())
    assert len(logged["data"]) == 4
    for cells in logged["data"]:
        _check_row(logged["columns"], cells, record, "wandb table")
    # the backfill curves as line plots: (β, method / ordering, value) rows equal the record's curves
    (curve_file,) = (run_dir / "files" / "media" / "table" / "upgrade" / "curves").glob("mAP_table_*.table.json")
    points = {(line, beta): value for beta, line, value in json.loads(curve_file.read_text())["data"]}
    assert points == {(f"{m} / {o}", beta): value for m, by in record.curves.items() for o, c in by.items()
                      for beta, value in zip(c.ratios, c.metric("mAP"))}
    log = next(run_dir.glob("run-*.wandb"))
    assert is_complete(log)
    summary = run_summary(log)
    for m in record.methods:
        assert summary[f"study/{m.method}/cross_test"] == pytest.approx(m.cross_test)
        assert summary[f"study/{m.method}/claim"] == int(m.claim.holds)
        assert summary.get(f"study/{m.method}/update_gain") is None
        assert summary[f"study/{m.method}/update_gain_independent_minus_old"] == pytest.approx(0.34)
        assert summary[f"study/{m.method}/auc_random"] == pytest.approx(m.auc["random"])
    assert summary["study/chance"] == 8.60 and summary["study/claim_margin"] == 1.0


def test_the_json_record_round_trips(tmp_path):
    record = _record()
    write_report(tmp_path, results=record)
    data = json.loads((tmp_path / "report.json").read_text())
    again = StudyResults.from_dict(data)
    assert again.to_dict() == data
    assert again.method("ract").claim == record.method("ract").claim
    assert again.rule == record.rule and again.split_sizes == {"test queries": 30}
