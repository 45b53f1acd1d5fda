"""experiments/seed_summary.py: grouping by seed suffix and the mean / sample std, checked by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("seed_summary", REPO / "experiments" / "seed_summary.py")
seed_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_summary)


def _row(method, self_test, cross, auc, nfr):
    return {"method": method, "self_test": self_test, "cross_test": cross, "auc": {"random": auc},
            "mean_nfr": {"random": nfr}}


def test_claims_are_counted_and_the_margin_to_the_old_model_is_averaged(tmp_path, capsys):
    rows = [dict(_row("bct_seed0", 60.0, 29.0, 45.0, 8.0), old_self_test=27.5, claim={"holds": True}),
            dict(_row("bct_seed1", 61.0, 28.0, 45.0, 8.0), old_self_test=27.5, claim={"holds": False}),
            dict(_row("independent", 55.0, None, 30.0, 12.0), old_self_test=27.5, claim=None)]
    summaries = {s["method"]: s for s in seed_summary.summarize(rows)}
    assert summaries["bct"]["claims"] == "1/2"
    assert summaries["bct"]["cross_minus_old"] == pytest.approx((1.0, 0.7071068))  # 1.5 and 0.5
    assert "cross_test" not in summaries["independent"] and "claims" not in summaries["independent"]
    (tmp_path / "report.json").write_text(json.dumps({"study": rows}))
    assert seed_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "old model self-test (mAP): 27.50" in out
    assert "| bct | 2 | 60.5 ± 0.7 | 28.5 ± 0.7 | 1.0 ± 0.7 | 1/2 |" in out
    assert "| independent | 1 | 55.0 ± 0.0 | – | – | – |" in out


def test_seeds_are_grouped_and_summarised(tmp_path, capsys):
    rows = [_row("bct_seed0", 60.0, 40.0, 45.0, 8.0), _row("ract_seed0", 62.0, 41.0, 46.0, 7.0),
            _row("bct_seed1", 64.0, 42.0, 47.0, 6.0), _row("old_only", 50.0, 30.0, 35.0, 9.0)]
    summaries = {s["method"]: s for s in seed_summary.summarize(rows)}
    assert list(summaries) == ["bct", "ract", "old_only"]
    bct = summaries["bct"]
    assert bct["n"] == 2
    assert bct["self_test"] == pytest.approx((62.0, 2.8284271))  # mean 62, sample std sqrt(8)
    assert bct["mean_nfr/random"] == pytest.approx((7.0, 1.4142136))
    assert summaries["ract"]["cross_test"] == (41.0, 0.0)
    (tmp_path / "report.json").write_text(json.dumps({"study": rows}))
    assert seed_summary.main([str(tmp_path)]) == 0
    assert "| bct | 2 | 62.0 ± 2.8 |" in capsys.readouterr().out
    assert seed_summary.main([str(tmp_path / "missing")]) == 2
