"""`reid-lab report`: the study page holds the study's numbers and its flipped queries, and renders in a real
headless Chromium without console errors, with every image loaded and nothing fetched from outside the file."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from reid_lab.cli import main as cli_main
from reid_lab.embedding.features import FeatureSet
from reid_lab.studies.html_report import write_html_report
from reid_lab.studies.report import write_report
from tests.browser import render
from tests.studies.test_report import _curve, _matrix

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def _study(tmp_path):
    """A study folder as `reid-lab upgrade` leaves it: report, plots, features of old and bct, a stage config.

    Features: 3 identities x 3 cameras; camera 0 is the query. In the old space every query is nearest its own
    gallery images. bct's query of identity 1 lies on identity 2's old gallery: exactly one negative flip.
    """
    study = tmp_path / "study"
    curves = {"bct": {"random": _curve("random", [45.0, 50.0, 55.0], [0.0, 2.0, 0.0]),
                      "uncertainty": _curve("uncertainty", [45.0, 52.0, 55.0], [0.0, 4.0, 0.0])}}
    rows = [{"method": "bct", "new": "bct", "old": "old", "independent": "indep"}]
    write_report(study, matrix=_matrix(), curves=curves, summary_rows=rows, title="Upgrade study: tiny",
                 protocol={"selection": "best validation cross-test mAP"})
    paths, pids, cams, flags = [], [], [], []
    for pid in range(3):
        for cam in range(3):
            p = tmp_path / "images" / f"{pid:04d}_c{cam}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 48), COLOURS[pid]).save(p)
            paths.append(str(p))
            pids.append(pid)
            cams.append(cam)
            flags.append(cam == 0)
    old = torch.eye(3)[torch.tensor(pids)] + 0.01 * torch.arange(9).float()[:, None]
    new = old.clone()
    new[3] = torch.tensor([0.0, 0.1, 1.0])  # identity 1's query (row 3, camera 0) points at identity 2
    for name, feats in (("old", old), ("bct", new)):
        FeatureSet(feats, torch.tensor(pids), torch.tensor(cams), torch.tensor(flags), paths,
                   {"space_id": name}).save(study / "features" / f"{name}.pt")
    (study / "train" / "old").mkdir(parents=True)
    (study / "train" / "old" / "config.yaml").write_text("model:\n  init_args:\n    backbone: mobilenet_v2\n")
    (study / "timings.json").write_text(json.dumps({"train/old": 12.5}))
    return study


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    study = _study(tmp_path_factory.mktemp("html"))
    return study, write_html_report(study)


def test_page_holds_the_study_numbers_flips_and_configs(page):
    study, path = page
    html = path.read_text()
    report = json.loads((study / "report.json").read_text())
    row = report["study"][0]
    for value in (row["self_test"], row["cross_test"], row["auc"]["random"], row["mean_nfr"]["uncertainty"]):
        assert f"<td>{value:.2f}</td>" in html
    assert "bct: 1 of 3 queries flip (33.3 %)" in html
    assert "backbone: mobilenet_v2" in html and "best validation cross-test mAP" in html
    assert "train/old" in html
    # self-contained: every picture is a data URI, nothing points at a file or the network
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)


def test_report_cli_rewrites_the_page(page, capsys):
    study, path = page
    path.unlink()
    assert cli_main(["report", "--study", str(study)]) == 0
    assert path.is_file() and "self-contained" in capsys.readouterr().out


@pytest.mark.slow
def test_page_renders_in_headless_chromium(page, tmp_path):
    _, path = page
    seen = render(path, screenshot=tmp_path / "shot.png")
    assert seen["console_errors"] == [] and seen["page_errors"] == [] and seen["failed_requests"] == []
    assert all(url.startswith(("file:", "data:")) for url in seen["requests"])
    images = seen["images"]
    # heatmap + 3 curve plots (mAP, R1, mINP) + flips plot, and one flipped query ranked by two systems
    # (the query + all 6 gallery images: top-k 10 is clipped to the gallery)
    assert len(images) == 5 + 2 * (1 + 6)
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images)
    assert "Negatively flipped queries" in seen["text"]
    with Image.open(tmp_path / "shot.png") as shot:
        assert shot.width == 1300 and shot.height > 900  # full page, longer than one screen


def test_flips_are_counted_against_the_gallery_each_cross_test_searched(tmp_path):
    """A FastFill row's queries search the transformed old gallery h(φ_old), not the raw one; a dimension change's
    queries go through its adapter (the feature file ``<method>.in_old_space.pt``). Built so that the raw old
    gallery and h(φ_old) give different counts: h swaps identity 0's and identity 2's gallery features, so all
    three queries flip against it, while bct's queries flip once against the raw gallery."""
    from reid_lab.studies.html_report import flipped_queries_html

    study = _study(tmp_path)
    old = FeatureSet.load(study / "features" / "old.pt")
    gallery = old.features[~old.is_query]
    h = gallery[[4, 5, 2, 3, 0, 1]]  # gallery rows are (id 0: c1, c2), (id 1: ...), (id 2: ...)
    torch.save({"gallery": h, "log_var": None}, study / "features" / "ff.transformed_gallery.pt")
    bct = FeatureSet.load(study / "features" / "bct.pt")
    wide = FeatureSet(torch.cat([bct.features, torch.ones(9, 1)], dim=1), bct.pids, bct.camids, bct.is_query,
                      bct.items, {"space_id": "wide"})
    wide.save(study / "features" / "wide.pt")  # 4-d: its own space
    bct.save(study / "features" / "wide.in_old_space.pt")  # 3-d: through its adapter, the old space
    rows = [{"method": "bct", "new": "bct", "old": "old"}, {"method": "ff", "new": "bct", "old": "old"},
            {"method": "wide", "new": "wide", "old": "old"}]
    html = flipped_queries_html(study, rows, per_method=5, top_k=5)
    assert "bct: 1 of 3 queries flip (33.3 %) when its queries search the old gallery<" in html
    assert "ff: 3 of 3 queries flip (100.0 %) when its queries search the transformed old gallery h(φ_old)" in html
    assert "bct -&gt; h(old)" in html or "bct -> h(old)" in html
    assert "wide: 1 of 3 queries flip (33.3 %) when its queries search the old gallery through its adapter" in html
