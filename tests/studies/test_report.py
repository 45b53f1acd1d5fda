from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from reid_lab.metrics.backfill import BackfillCurve
from reid_lab.metrics.compatibility import CompatibilityMatrix
from reid_lab.studies.report import study_rows, write_report

RATIOS = (0.0, 0.5, 1.0)
OLD_SELF = {"R1": 70.0, "R5": 85.0, "R10": 90.0, "mAP": 40.0, "mINP": 10.0}


def _cells(map_value: float) -> dict[str, float]:
    return {
        "R1": map_value + 30,
        "R5": map_value + 40,
        "R10": map_value + 45,
        "mAP": map_value,
        "mINP": map_value / 4,
    }


def _matrix() -> CompatibilityMatrix:
    cells = {
        ("old", "old"): _cells(40.0),
        ("bct", "old"): _cells(45.0),
        ("bct", "bct"): _cells(55.0),
        ("old", "bct"): _cells(38.0),
        ("indep", "indep"): _cells(60.0),
        ("indep", "old"): _cells(1.5),
    }
    not_comparable = {("wide", "old"): "dimension 512 != 128"}
    return CompatibilityMatrix(("old", "bct", "indep", "wide"), cells, not_comparable)


def _curve(ordering: str, values: list[float], nfr: list[float]) -> BackfillCurve:
    return BackfillCurve(
        ratios=RATIOS,
        num_refreshed=(0, 5, 10),
        values={
            "R1": [v + 30 for v in values],
            "mAP": values,
            "mINP": [v / 4 for v in values],
            "NFR": nfr,
            "PFR": [1.0, 2.0, 3.0],
        },
        ordering=ordering,
        old_self_test=OLD_SELF,
        negative_flip_queries=(np.array([], dtype=np.int64), np.array([2]), np.array([1, 4])),
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    curves = {
        "bct": {
            "random": _curve("random", [45.0, 50.0, 55.0], [0.0, 2.0, 4.0]),
            "uncertainty": _curve("uncertainty", [45.0, 53.0, 55.0], [0.0, 1.0, 4.0]),
        },
    }
    rows = [{"method": "bct", "new": "bct", "old": "old", "independent": "indep"}]
    (tmp_path / "report.json").write_text("stale")  # replaced atomically
    files = write_report(
        tmp_path, matrix=_matrix(), curves=curves, summary_rows=rows, title="Market half-ID upgrade"
    )
    return tmp_path, files, curves


def test_all_files_written_and_no_temp_files_left(report):
    out, files, _ = report
    assert set(files) == {
        "json",
        "markdown",
        "compatibility_matrix",
        "backfill_mAP",
        "backfill_R1",
        "backfill_mINP",
        "flips",
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())
    for key, path in files.items():
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
                assert image.format == "PNG" and image.size[0] > 100, key


def test_json_round_trips(report):
    _, files, curves = report
    data = json.loads(files["json"].read_text())
    assert data["title"] == "Market half-ID upgrade"
    assert CompatibilityMatrix.from_dict(data["compatibility_matrix"]) == _matrix()
    again = BackfillCurve.from_dict(data["curves"]["bct"]["random"])
    assert again.values == curves["bct"]["random"].values
    assert [q.tolist() for q in again.negative_flip_queries] == [[], [2], [1, 4]]
    (row,) = data["study"]
    assert row["claim"]["holds"] is True and row["claim"]["margin"] == 1.0 and row["claim"]["chance"] is None
    assert row["update_gain"] == {"value": pytest.approx((45 - 40) / (60 - 40)), "cross_minus_old": 5.0,
                                  "independent_minus_old": 20.0}
    from reid_lab.studies.results import StudyResults

    assert StudyResults.from_dict(data).to_dict() == data  # the record round-trips exactly
    assert row["auc"] == pytest.approx({"random": 50.0, "uncertainty": 51.0})
    assert row["mean_nfr"] == pytest.approx({"random": 2.0, "uncertainty": 5 / 3})


def test_markdown_has_tables_and_values(report):
    _, files, _ = report
    text = files["markdown"].read_text()
    assert text.startswith("# Market half-ID upgrade")
    assert "| mAP (%) query ↓ / gallery → | old | bct | indep | wide |" in text
    assert "| R1 (%) query ↓ / gallery → |" in text
    header = "| method | self-test | cross-test (new→old) | old self-test | claim | update gain | AUC mAP (random) |"
    assert header in text
    assert "| bct | 55.00 | 45.00 | 40.00 | yes | 0.250 (+5.00 / +20.00) | 50.00 | 51.00 | 2.00 | 1.67 |" in text
    assert "claim: cross-test mAP > old self-test + 1.00 (chance level not measured)" in text
    assert "n/a" in text  # wide vs old
    assert "![flips](flips.png)" in text


def test_study_rows_explicit_values_win_and_criterion_fails():
    rows = study_rows(
        _matrix(),
        [{"method": "indep", "new": "indep", "old": "old"}, {"method": "given", "cross_test": 1.0}],
        None,
    )
    assert rows[0]["claim"]["holds"] is False and rows[0]["update_gain"] is None
    assert rows[1]["cross_test"] == 1.0 and rows[1]["auc"] == {}
    with pytest.raises(ValueError, match="'method'"):
        study_rows(_matrix(), [{"new": "bct"}], None)


class _FakeRun:
    def __init__(self):
        self.logged = []

    def log(self, payload):
        self.logged.append(payload)


class _FakeLogger:
    def __init__(self):
        self.experiment = _FakeRun()


def test_wandb_logger_receives_tables_and_images(tmp_path):
    wandb = pytest.importorskip("wandb")
    logger = _FakeLogger()
    curves = {"bct": {"random": _curve("random", [45.0, 50.0, 55.0], [0.0, 2.0, 4.0])}}
    write_report(tmp_path, matrix=_matrix(), curves=curves, title="t", logger=logger)
    (payload,) = logger.experiment.logged
    assert isinstance(payload["upgrade/tables/compatibility_matrix"], wandb.Table)
    assert isinstance(payload["upgrade/tables/study"], wandb.Table)
    assert isinstance(payload["upgrade/plots/backfill_mAP"], wandb.Image)
    assert isinstance(payload["upgrade/plots/compatibility_matrix"], wandb.Image)
    with pytest.raises(TypeError, match="logger must be"):
        write_report(tmp_path, matrix=_matrix(), title="t", logger=object())


def test_matrix_only_report(tmp_path):
    files = write_report(tmp_path, matrix=_matrix(), title="only matrix")
    assert set(files) == {"json", "markdown", "compatibility_matrix"}
    assert "## Upgrade study" not in files["markdown"].read_text()


def test_curve_styles_never_repeat_in_a_4x4_study():
    from reid_lab.studies.report import _curve_styles

    orderings = ("random", "uncertainty", "sigma", "oracle")
    curves = {m: dict.fromkeys(orderings) for m in ("independent", "bct", "ract", "fastfill")}
    styles = _curve_styles(curves)
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(styles) == 16 and len(looks) == 16
    # one colour per method, one line style per ordering, in every method
    assert {styles["bct", o]["color"] for o in orderings} == {"C1"}
    assert {styles[m, "sigma"]["linestyle"] for m in curves} == {":"}


def test_an_update_gain_over_a_tiny_denominator_is_withheld_with_its_inputs():
    from reid_lab.metrics.compatibility import CompatibilityMatrix
    from reid_lab.studies.report import study_markdown
    from reid_lab.studies.results import build_results

    cells = {("old", "old"): _cells(40.0), ("bct", "old"): _cells(44.0), ("bct", "bct"): _cells(41.0),
             ("indep", "indep"): _cells(40.2)}
    matrix = CompatibilityMatrix(("old", "bct", "indep"), cells, set())
    results = build_results(matrix, [{"method": "bct", "new": "bct", "old": "old", "independent": "indep"}], None)
    gain = results.method("bct").update_gain
    # 4.0 / 0.2 = 20 would be an extreme ratio of two small differences: withheld in the record itself
    assert gain.value is None and (gain.cross_minus_old, gain.independent_minus_old) == pytest.approx((4.0, 0.2))
    assert "| n/a (+4.00 / +0.20) |" in study_markdown(results)
    assert results.summary_scalars()["study/bct/update_gain"] is None
