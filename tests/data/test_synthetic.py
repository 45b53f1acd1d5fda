"""The synthetic ReID generator: Market-1501 layout, captions, determinism, caching, atomicity, validation."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_lab.data.datasets import load_dataset
from reid_lab.data.synthetic import generate_synthetic, main
from reid_lab.data.synthetic.attributes import Colour, PersonAttributes
from reid_lab.data.synthetic.cameras import ViewConditions
from reid_lab.data.synthetic.captions import describe, tokenize
from reid_lab.studies.raw_pixels import raw_pixel_baseline

MARKET_NAME = re.compile(r"^([-\d]+)_c(\d)s1_(\d{6})_(\d{2})\.jpg$")
SMALL = dict(
    num_ids=8, num_cameras=3, seed=3, image_size=(32, 16), images_per_id=(4, 6), num_distractors=5, num_junk=3
)
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")


def _parse(root: Path) -> dict[str, list[tuple[int, int, str]]]:
    """``{folder: [(pid, cam, name), ...]}`` parsed with the Market-1501 regex."""
    parsed = {}
    for folder in FOLDERS:
        rows = []
        for path in sorted((root / folder).iterdir()):
            match = MARKET_NAME.match(path.name)
            assert match, f"{folder}/{path.name} is not a Market-1501 name"
            rows.append((int(match.group(1)), int(match.group(2)), path.name))
        parsed[folder] = rows
    return parsed


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "small"
    return root, generate_synthetic(root, **SMALL)


def test_market_layout_and_names(small_set):
    root, manifest = small_set
    parsed = _parse(root)
    assert {cam for rows in parsed.values() for _, cam, _ in rows} <= {1, 2, 3}
    persons = {pid for rows in parsed.values() for pid, _, _ in rows if pid > 0}
    assert persons == set(range(1, 9))
    counts = manifest["counts"]
    assert counts["train_images"] == len(parsed["bounding_box_train"])
    assert counts["query_images"] == len(parsed["query"])
    assert counts["gallery_images"] == len(parsed["bounding_box_test"])
    assert counts["images"] == sum(len(rows) for rows in parsed.values())
    assert not list(root.parent.glob("small.partial-*")), "the partial folder was left behind"
    assert json.loads((root / "manifest.json").read_text()) == manifest


def test_train_and_test_ids_are_disjoint_halves(small_set):
    parsed = _parse(small_set[0])
    train = {pid for pid, _, _ in parsed["bounding_box_train"]}
    test = {pid for folder in ("query", "bounding_box_test") for pid, _, _ in parsed[folder] if pid > 0}
    assert train == {1, 2, 3, 4}  # first 8 * 0.5 identities
    assert test == {5, 6, 7, 8}


def test_every_query_has_a_cross_camera_positive(small_set):
    parsed = _parse(small_set[0])
    gallery_cams = defaultdict(set)
    for pid, cam, _ in parsed["bounding_box_test"]:
        gallery_cams[pid].add(cam)
    query_cams = defaultdict(list)
    for pid, cam, _ in parsed["query"]:
        query_cams[pid].append(cam)
        assert gallery_cams[pid] - {cam}, (
            f"query {pid} in camera {cam} has no gallery positive in another camera"
        )
    for pid, cams in query_cams.items():  # Market: one query per camera the identity was seen in
        assert sorted(cams) == sorted(set(cams))
        assert set(cams) == gallery_cams[pid]


def test_junk_and_distractors_only_in_the_gallery(small_set):
    parsed = _parse(small_set[0])
    gallery = [pid for pid, _, _ in parsed["bounding_box_test"]]
    assert gallery.count(0) == 5
    assert gallery.count(-1) == 3
    for folder in ("bounding_box_train", "query"):
        assert all(pid > 0 for pid, _, _ in parsed[folder])
    assert any(name.startswith("-1_c") for _, _, name in parsed["bounding_box_test"])
    assert any(name.startswith("0000_c") for _, _, name in parsed["bounding_box_test"])


def test_captions_follow_cuhk_pedes_format(small_set):
    root, manifest = small_set
    records = json.loads((root / "reid_raw.json").read_text())
    attributes = {a["id"]: a for a in json.loads((root / "attributes.json").read_text())}
    person_images = manifest["counts"]["images"] - 5 - 3  # junk and distractors carry no caption
    assert len(records) == person_images
    assert manifest["counts"]["captions"] == 2 * person_images
    for record in records:
        assert set(record) == {"split", "captions", "file_path", "id", "processed_tokens"}
        folder, name = record["file_path"].split("/")
        assert (root / record["file_path"]).is_file()
        assert record["id"] == int(name.split("_")[0]) >= 1
        assert record["split"] == ("train" if folder == "bounding_box_train" else "test")
        assert len(record["captions"]) == 2 and record["captions"][0] != record["captions"][1]
        assert record["processed_tokens"] == [tokenize(c) for c in record["captions"]]
        upper = attributes[record["id"]]["upper"]["name"]
        for tokens in record["processed_tokens"]:
            assert upper in tokens, f"{record['file_path']}: caption does not name the {upper} upper clothing"


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A tall person, wearing a RED t-shirt.") == [
        "a",
        "tall",
        "person",
        "wearing",
        "a",
        "red",
        "t",
        "shirt",
    ]


def _attrs(**changes) -> PersonAttributes:
    grey = Colour("grey", (128, 128, 128))
    base = PersonAttributes(
        build_width="average",
        build_height="average",
        skin=Colour("light", (230, 200, 170)),
        hair=Colour("black", (20, 20, 20)),
        hair_length="short",
        upper=Colour("yellow", (225, 195, 55)),
        sleeves="short",
        pattern="logo",
        pattern_colour=Colour("red", (200, 35, 35)),
        lower=grey,
        lower_type="trousers",
        shoes=Colour("white", (235, 235, 235)),
        bag="backpack",
        bag_colour=Colour("blue", (40, 70, 170)),
        hat=False,
        hat_colour=grey,
    )
    return replace(base, **changes)


def _view(**changes) -> ViewConditions:
    base = ViewConditions(
        viewpoint="front",
        mirrored=False,
        scale=0.85,
        dx=0.0,
        dy=0.0,
        stride=0.0,
        brightness=1.0,
        gradient=0.0,
        blur=0.0,
        occluder="none",
        occlusion=0.0,
        background_people=0,
    )
    return replace(base, **changes)


@pytest.mark.parametrize("seed", range(3))
def test_captions_say_only_what_the_view_shows(seed):
    rng = np.random.default_rng(seed)
    front = " ".join(describe(_attrs(), _view(viewpoint="front"), rng))
    back = " ".join(describe(_attrs(), _view(viewpoint="back"), rng))
    assert "red logo" in front and "straps of a backpack" in front
    assert "logo" not in back and "blue backpack" in back
    hidden = " ".join(describe(_attrs(), _view(occluder="bottom", occlusion=0.45), rng))
    assert "white" not in hidden and "grey" not in hidden  # neither shoes nor trousers are visible


def test_same_seed_gives_identical_bytes_whatever_the_workers(small_set, tmp_path):
    root, _ = small_set
    again = tmp_path / "again"
    generate_synthetic(again, **SMALL, workers=2)
    assert _files(again) == _files(root)
    other = tmp_path / "other"
    generate_synthetic(other, **{**SMALL, "seed": 4})
    other_images = {k: v for k, v in _files(other).items() if k.endswith(".jpg")}
    assert set(other_images.values()).isdisjoint(v for k, v in _files(root).items() if k.endswith(".jpg"))


def test_second_call_reuses_the_set_and_other_parameters_are_refused(tmp_path):
    root = tmp_path / "cached"
    first = generate_synthetic(root, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_synthetic(root, **SMALL) == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(FileExistsError, match="other parameters"):
        generate_synthetic(root, **{**SMALL, "num_ids": 6})
    replaced = generate_synthetic(root, **{**SMALL, "num_ids": 6}, force=True)
    assert replaced["parameters"]["num_ids"] == 6
    assert {pid for pid, _, _ in _parse(root)["bounding_box_train"]} == {1, 2, 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached"]


def test_stale_partial_folder_is_removed_and_foreign_folder_refused(tmp_path):
    stale = tmp_path / "set.partial-999999999"  # above any pid_max: its writer is gone
    (stale / "query").mkdir(parents=True)
    generate_synthetic(tmp_path / "set", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        generate_synthetic(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_cameras": 0}, "num_cameras .* got 0"),
        ({"num_cameras": 10}, "num_cameras .* got 10"),
        ({"num_cameras": 1}, "num_cameras .* got 1"),
        ({"num_ids": 1}, "num_ids .* got 1"),
        ({"images_per_id": (3, 5)}, r"images_per_id .* got \(3, 5\)"),
        ({"train_fraction": 1.0}, "train_fraction .* got 1.0"),
        ({"image_size": (8, 4)}, r"image_size .* got \(8, 4\)"),
        ({"num_junk": -1}, "num_junk .* got -1"),
    ],
)
def test_bad_parameters_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "bad", **{**SMALL, **changes})
    assert not (tmp_path / "bad").exists()


def test_cli_writes_a_set_and_reports_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--out",
        str(out),
        "--ids",
        "4",
        "--cameras",
        "2",
        "--images-per-id",
        "4",
        "4",
        "--size",
        "32",
        "16",
    ]
    assert main(argv + ["--distractors", "1", "--junk", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 train / 2 test" in printed and "images/s" in printed
    assert json.loads((out / "manifest.json").read_text())["parameters"]["images_per_id"] == [4, 4]
    assert main(argv + ["--distractors", "1", "--junk", "1"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "x"), "--cameras", "10"]) == 2
    assert "num_cameras" in capsys.readouterr().err


def test_raw_pixel_baseline_equals_a_direct_pixel_evaluation(small_set):
    # Independent check: cosine distance of flattened pixels computed here with numpy, one query at a time.
    root, _ = small_set
    splits = load_dataset("synthetic", root)

    def pix(recs):
        return np.stack([np.asarray(Image.open(r.path).convert("RGB"), dtype=np.float64).ravel() for r in recs])

    q, g = pix(splits.query), pix(splits.gallery)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    aps = []
    for i, qr in enumerate(splits.query):
        order = np.argsort(-(g @ q[i]), kind="stable")
        keep = [j for j in order if not (splits.gallery[j].pid == qr.pid and splits.gallery[j].camid == qr.camid)]
        hits = np.array([splits.gallery[j].pid == qr.pid for j in keep])
        if hits.any():
            ranks = np.flatnonzero(hits) + 1
            aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    assert raw_pixel_baseline(root)["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-3)


def test_manifest_is_written_last(small_set):
    root, _ = small_set
    newest = max(os.path.getmtime(p) for p in root.rglob("*") if p.is_file())
    assert os.path.getmtime(root / "manifest.json") == newest
