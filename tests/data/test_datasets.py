"""Dataset parsers against tiny fabricated trees in the real layouts, with hand-written expectations."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from reid_lab.data.datasets import DATASETS, list_datasets, load_dataset
from reid_lab.data.datasets.cuhk03np import load_cuhk03np
from reid_lab.data.datasets.dukemtmc import load_dukemtmc
from reid_lab.data.datasets.folder import load_folder
from reid_lab.data.datasets.market1501 import load_market1501
from reid_lab.data.datasets.msmt17 import load_msmt17
from reid_lab.data.datasets.synthetic import load_synthetic
from reid_lab.data.datasets.veri776 import load_veri776
from reid_lab.data.records import DatasetFormatError


def _encode(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 8), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGE_BYTES = {".jpg": _encode("JPEG"), ".jpeg": _encode("JPEG"), ".png": _encode("PNG")}


def write_files(folder: Path, names: list[str]) -> None:
    """Write each file of ``names`` (relative to ``folder``): a tiny image, or text for a non-image."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(IMAGE_BYTES.get(path.suffix.lower(), b"not an image"))


def triples(records, base: Path | None = None) -> list[tuple[str, int, int]]:
    """``(file name, pid, camid)`` of each record, or the path relative to ``base``."""
    return [
        (Path(r.path).relative_to(base).as_posix() if base else os.path.basename(r.path), r.pid, r.camid)
        for r in records
    ]


# --------------------------------------------------------------------------------------- Market-1501

MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000551_01.jpg",
        "0007_c3s1_000100_01.jpg",
        "0010_c6s1_000200_02.jpg",
        "Thumbs.db",
    ],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c4s2_000100_00.jpg"],
    "bounding_box_test": [
        "-1_c3s1_000000_01.jpg",  # junk
        "0000_c1s1_000000_01.jpg",  # distractor
        "0001_c2s1_000301_01.jpg",
        "0003_c5s3_000400_01.jpg",
        "Thumbs.db",
    ],
}


def make_market_tree(dataset_dir: Path, files: dict[str, list[str]] = MARKET_FILES) -> Path:
    for split, names in files.items():
        (dataset_dir / split).mkdir(parents=True, exist_ok=True)
        write_files(dataset_dir / split, names)
    return dataset_dir


@pytest.mark.parametrize("sub_folder", [".", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15"])
def test_market1501_splits_and_root_styles(tmp_path, sub_folder, caplog):
    dataset_dir = make_market_tree(tmp_path / sub_folder)
    with caplog.at_level(logging.WARNING):
        splits = load_market1501(tmp_path)
    assert splits.name == "market1501"
    assert splits.meta["root"] == str(dataset_dir.resolve())
    assert triples(splits.train) == [
        ("0002_c1s1_000451_03.jpg", 0, 0),
        ("0002_c2s1_000551_01.jpg", 0, 1),
        ("0007_c3s1_000100_01.jpg", 1, 2),
        ("0010_c6s1_000200_02.jpg", 2, 5),
    ]
    assert triples(splits.query) == [("0001_c1s1_001051_00.jpg", 1, 0), ("0003_c4s2_000100_00.jpg", 3, 3)]
    # junk (-1) dropped, distractor (0) kept with its raw pid
    assert triples(splits.gallery) == [
        ("0000_c1s1_000000_01.jpg", 0, 0),
        ("0001_c2s1_000301_01.jpg", 1, 1),
        ("0003_c5s3_000400_01.jpg", 3, 4),
    ]
    assert all(os.path.isfile(r.path) for r in splits.gallery)
    thumbs_warnings = [r.getMessage() for r in caplog.records if "Thumbs.db" in r.getMessage()]
    assert len(thumbs_warnings) == 2 and all("skipped 1 " in m for m in thumbs_warnings)


def test_market1501_missing_folder_lists_paths_tried(tmp_path):
    make_market_tree(tmp_path / "Market-1501-v15.09.15")
    (tmp_path / "Market-1501-v15.09.15" / "query").rename(tmp_path / "Market-1501-v15.09.15" / "queries")
    with pytest.raises(DatasetFormatError) as error:
        load_market1501(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "Market-1501-v15.09.15") in message
    assert str(tmp_path / "market1501" / "Market-1501-v15.09.15") in message
    assert "bounding_box_train, query, bounding_box_test" in message


def test_market1501_missing_folder_names_what_is_missing(tmp_path):
    dataset_dir = make_market_tree(tmp_path / "Market-1501-v15.09.15")
    (dataset_dir / "bounding_box_test").rename(dataset_dir / "bounding_box_test.old")
    with pytest.raises(DatasetFormatError) as error:
        load_market1501(tmp_path)
    lines = str(error.value).splitlines()
    # The folder that exists names the one entry it lacks; the candidates that do not exist say so.
    assert f"  - {dataset_dir}: exists, but is missing bounding_box_test" in lines
    assert f"  - {tmp_path / 'market1501' / 'Market-1501-v15.09.15'}: does not exist" in lines


@pytest.mark.parametrize(
    ("loader", "folder", "files", "bad_name"),
    [
        (load_market1501, "bounding_box_train", MARKET_FILES, "0021_c2s1_049428_01 (copy).jpg"),
        (load_market1501, "query", MARKET_FILES, "0001_c1s1_001051_00.jpg.jpg"),
        (load_synthetic, "bounding_box_test", MARKET_FILES, "0003_c5s3_000400_01-1.jpg"),
    ],
)
def test_market_names_with_trailing_junk_are_rejected(tmp_path, loader, folder, files, bad_name):
    make_market_tree(tmp_path, {**files, folder: [*files[folder], bad_name]})
    with pytest.raises(DatasetFormatError, match="does not match the expected format") as error:
        loader(tmp_path)
    assert str(tmp_path / folder / bad_name) in str(error.value)


def test_market1501_mismatched_file_name_is_named(tmp_path):
    files = {**MARKET_FILES, "bounding_box_train": [*MARKET_FILES["bounding_box_train"], "person_7.jpg"]}
    make_market_tree(tmp_path, files)
    with pytest.raises(DatasetFormatError) as error:
        load_market1501(tmp_path)
    assert str(tmp_path / "bounding_box_train" / "person_7.jpg") in str(error.value)
    assert "0002_c1s1_000451_03.jpg" in str(error.value)  # the example of the expected format


@pytest.mark.parametrize(
    ("bad_name", "expected"), [("0001_c7s1_000100_00.jpg", "camera 7"), ("1502_c1s1_000100_00.jpg", "pid 1502")]
)
def test_market1501_out_of_range(tmp_path, bad_name, expected):
    make_market_tree(tmp_path, {**MARKET_FILES, "query": [*MARKET_FILES["query"], bad_name]})
    with pytest.raises(DatasetFormatError, match=expected) as error:
        load_market1501(tmp_path)
    assert bad_name in str(error.value)


@pytest.mark.parametrize("query_files", [[], ["-1_c1s1_000100_00.jpg"], ["Thumbs.db"]])
def test_market1501_empty_query_split(tmp_path, query_files):
    make_market_tree(tmp_path, {**MARKET_FILES, "query": query_files})
    with pytest.raises(DatasetFormatError) as error:
        load_market1501(tmp_path)
    assert str(tmp_path / "query") in str(error.value)


# ------------------------------------------------------------------------------------------ Duke

DUKE_FILES = {
    "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c8_f0046999.jpg", "0005_c1_f0000100.jpg"],
    "query": ["0003_c7_f0010000.jpg"],
    "bounding_box_test": ["0003_c6_f0010200.jpg", "0009_c5_f0000001.jpg", "-1_c1_f0000001.jpg", "Thumbs.db"],
}


def test_dukemtmc_torchreid_root(tmp_path):
    make_market_tree(tmp_path / "dukemtmc-reid" / "DukeMTMC-reID", DUKE_FILES)
    splits = load_dukemtmc(tmp_path)
    assert triples(splits.train) == [
        ("0001_c2_f0046182.jpg", 0, 1),
        ("0001_c8_f0046999.jpg", 0, 7),
        ("0005_c1_f0000100.jpg", 1, 0),
    ]
    assert triples(splits.query) == [("0003_c7_f0010000.jpg", 3, 6)]
    assert triples(splits.gallery) == [("0003_c6_f0010200.jpg", 3, 5), ("0009_c5_f0000001.jpg", 9, 4)]


def test_dukemtmc_camera_9_rejected(tmp_path):
    make_market_tree(tmp_path / "DukeMTMC-reID", {**DUKE_FILES, "query": ["0003_c9_f0010000.jpg"]})
    with pytest.raises(DatasetFormatError, match=r"camera 9 out of range.*0003_c9_f0010000\.jpg"):
        load_dukemtmc(tmp_path)


# -------------------------------------------------------------------------------------- CUHK03-NP

CUHK_DETECTED = {
    "bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png", "0004_c1_2.png"],
    "query": ["0002_c1_1.png"],
    "bounding_box_test": ["0002_c2_6.png", "0003_c2_7.png"],
}
CUHK_LABELED = {**CUHK_DETECTED, "bounding_box_train": [*CUHK_DETECTED["bounding_box_train"], "0006_c2_1.png"]}


def make_cuhk_tree(cuhk_dir: Path) -> None:
    make_market_tree(cuhk_dir / "detected", CUHK_DETECTED)
    make_market_tree(cuhk_dir / "labeled", CUHK_LABELED)


@pytest.mark.parametrize("root", [".", "cuhk03-np"])
def test_cuhk03np_detected_vs_labeled(tmp_path, root):
    make_cuhk_tree(tmp_path / "cuhk03-np")
    detected = load_cuhk03np(tmp_path / root)
    labeled = load_dataset("cuhk03np", tmp_path / root, variant="labeled")
    assert detected.meta["variant"] == "detected" and labeled.meta["variant"] == "labeled"
    assert detected.meta["root"] == str((tmp_path / "cuhk03-np" / "detected").resolve())
    assert triples(detected.train) == [("0001_c1_1.png", 0, 0), ("0001_c2_6.png", 0, 1), ("0004_c1_2.png", 1, 0)]
    assert triples(labeled.train)[-1] == ("0006_c2_1.png", 2, 1)
    assert (len(detected.train), len(labeled.train)) == (3, 4)
    assert triples(detected.query) == [("0002_c1_1.png", 2, 0)]
    assert triples(detected.gallery) == [("0002_c2_6.png", 2, 1), ("0003_c2_7.png", 3, 1)]


def test_cuhk03np_variant_folder_as_root(tmp_path):
    make_cuhk_tree(tmp_path / "cuhk03-np")
    assert len(load_cuhk03np(tmp_path / "cuhk03-np" / "labeled", variant="labeled").train) == 4
    with pytest.raises(DatasetFormatError, match="'labeled' variant"):
        load_cuhk03np(tmp_path / "cuhk03-np" / "labeled", variant="detected")
    with pytest.raises(ValueError, match="variant"):
        load_cuhk03np(tmp_path, variant="both")


def test_cuhk03np_jpg_is_not_an_image_of_the_dataset(tmp_path, caplog):
    make_cuhk_tree(tmp_path / "cuhk03-np")
    write_files(tmp_path / "cuhk03-np" / "detected" / "query", ["0002_c1_9.jpg"])
    with caplog.at_level(logging.WARNING):
        splits = load_cuhk03np(tmp_path)
    assert len(splits.query) == 1
    assert any("skipped 1" in r.getMessage() and "0002_c1_9.jpg" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------- VeRi

VERI_FILES = {
    "image_train": ["0002_c002_00030600_0.jpg", "0002_c020_00030620_1.jpg", "0005_c011_00000100_0.jpg"],
    "image_query": ["0006_c003_00084165_0.jpg"],
    "image_test": ["0006_c004_00084300_0.jpg", "0776_c001_00000001_0.jpg"],
}


def test_veri776_camera_parsing(tmp_path):
    make_market_tree(tmp_path / "VeRi", VERI_FILES)
    write_files(tmp_path / "VeRi", ["name_train.txt", "train_label.xml"])
    splits = load_veri776(tmp_path)
    assert triples(splits.train) == [
        ("0002_c002_00030600_0.jpg", 0, 1),
        ("0002_c020_00030620_1.jpg", 0, 19),
        ("0005_c011_00000100_0.jpg", 1, 10),
    ]
    assert triples(splits.query) == [("0006_c003_00084165_0.jpg", 6, 2)]
    assert triples(splits.gallery) == [("0006_c004_00084300_0.jpg", 6, 3), ("0776_c001_00000001_0.jpg", 776, 0)]


@pytest.mark.parametrize("bad_name", ["0006_c021_00084300_0.jpg", "0006_c21_00084300_0.jpg"])
def test_veri776_bad_camera(tmp_path, bad_name):
    make_market_tree(tmp_path, {**VERI_FILES, "image_test": [bad_name]})
    with pytest.raises(DatasetFormatError) as error:
        load_veri776(tmp_path)
    assert bad_name in str(error.value)


# --------------------------------------------------------------------------------------- MSMT17

MSMT_LISTS = {
    "list_train.txt": [
        "0000/0000_000_01_0303morning_0015_0.jpg 0",
        "0000/0000_001_05_0303noon_0020_1.jpg 0",
        "0001/0001_000_15_0303afternoon_0100_0.jpg 1",
    ],
    "list_val.txt": ["0001/0001_002_02_0303noon_0200_0.jpg 1"],
    "list_query.txt": ["0000/0000_000_03_0113morning_0001_0.jpg 0"],
    "list_gallery.txt": [
        "0000/0000_001_04_0113noon_0010_0.jpg 0",
        "0002/0002_000_10_0113afternoon_0300_1.jpg 2",
    ],
}


def make_msmt_tree(dataset_dir: Path, version: str, lists: dict[str, list[str]] = MSMT_LISTS) -> None:
    train_dir, test_dir = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}[version]
    for list_name, lines in lists.items():
        image_dir = train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir
        write_files(dataset_dir / image_dir, [line.split()[0] for line in MSMT_LISTS[list_name]])
        dataset_dir.joinpath(list_name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("version", "sub_folder"), [("V1", "MSMT17_V1"), ("V2", "msmt17/MSMT17_V2"), ("V2", ".")]
)
def test_msmt17_lists(tmp_path, version, sub_folder):
    make_msmt_tree(tmp_path / sub_folder, version)
    splits = load_msmt17(tmp_path)
    train_dir, test_dir = ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    base = (tmp_path / sub_folder).resolve()
    assert splits.meta["version"] == version and splits.meta["root"] == str(base)
    # camid = 3rd "_" token minus 1; train pids relabelled, test pids raw
    assert triples(splits.train, base) == [
        (f"{train_dir}/0000/0000_000_01_0303morning_0015_0.jpg", 0, 0),
        (f"{train_dir}/0000/0000_001_05_0303noon_0020_1.jpg", 0, 4),
        (f"{train_dir}/0001/0001_000_15_0303afternoon_0100_0.jpg", 1, 14),
    ]
    assert triples(splits.query, base) == [(f"{test_dir}/0000/0000_000_03_0113morning_0001_0.jpg", 0, 2)]
    assert triples(splits.gallery, base) == [
        (f"{test_dir}/0000/0000_001_04_0113noon_0010_0.jpg", 0, 3),
        (f"{test_dir}/0002/0002_000_10_0113afternoon_0300_1.jpg", 2, 9),
    ]


def test_msmt17_include_val_and_explicit_version(tmp_path):
    make_msmt_tree(tmp_path / "MSMT17_V2", "V2")
    with_val = load_dataset("msmt17", tmp_path, version="V2", include_val=True)
    assert triples(with_val.train)[-1] == ("0001_002_02_0303noon_0200_0.jpg", 1, 1)
    assert len(with_val.train) == 4
    with pytest.raises(DatasetFormatError, match="MSMT17_V1"):
        load_msmt17(tmp_path, version="V1")


@pytest.mark.parametrize(
    "bad_line",
    ["0000/0000_001_05_0303noon_0020_1.jpg", "0000/0000_001_05_0303noon_0020_1.jpg zero", "0000/0000-001.jpg 0"],
)
def test_msmt17_malformed_line_names_list_and_line(tmp_path, bad_line):
    lines = [MSMT_LISTS["list_train.txt"][0], bad_line, MSMT_LISTS["list_train.txt"][2]]
    make_msmt_tree(tmp_path, "V1", {**MSMT_LISTS, "list_train.txt": lines})
    with pytest.raises(DatasetFormatError) as error:
        load_msmt17(tmp_path)
    assert f"{tmp_path.resolve() / 'list_train.txt'}, line 2" in str(error.value)
    assert "0000_000_01_0303morning_0015_0.jpg 0" in str(error.value)  # the expected format


def test_msmt17_camera_out_of_range(tmp_path):
    lines = [*MSMT_LISTS["list_query.txt"], "0000/0000_005_16_0113noon_0010_0.jpg 0"]
    make_msmt_tree(tmp_path, "V1", {**MSMT_LISTS, "list_query.txt": lines})
    with pytest.raises(DatasetFormatError, match=r"list_query\.txt, line 2: camera 16"):
        load_msmt17(tmp_path)


def test_msmt17_missing_listed_image(tmp_path):
    make_msmt_tree(tmp_path, "V1")
    missing = tmp_path / "test" / "0002" / "0002_000_10_0113afternoon_0300_1.jpg"
    missing.unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_msmt17(tmp_path)
    assert str(missing.resolve()) in str(error.value) and "list_gallery.txt, line 2" in str(error.value)


# ------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_a_market_tree_at_root(tmp_path):
    make_market_tree(tmp_path, {**MARKET_FILES, "query": ["0001_c9s1_001051_00.jpg"]})
    splits = load_dataset("synthetic", tmp_path)
    assert splits.name == "synthetic"
    assert triples(splits.query) == [("0001_c9s1_001051_00.jpg", 1, 8)]
    assert len(splits.train) == 4 and len(splits.gallery) == 3


def test_synthetic_missing_suggests_generator(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"reid-lab synth --out"):
        load_synthetic(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- folder


def make_identity_tree(root: Path, images_per_identity: dict[str, list[str]]) -> None:
    for identity, names in images_per_identity.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        write_files(root / identity, names)


def split_identities(splits) -> tuple[set[str], set[str]]:
    """Identity folder names of the train split and of the query + gallery splits."""
    def folders(records):
        return {Path(r.path).parent.name for r in records}

    return folders(splits.train), folders(splits.query) | folders(splits.gallery)


TWENTY_IDS = {f"id{i:02d}": ["a.jpg", "b.jpg", "c.png"] for i in range(20)}


def test_folder_unknown_cameras_unique_camids(tmp_path):
    make_identity_tree(tmp_path, {"alice": ["1.jpg", "2.jpg", "3.jpg"], "bob": ["x.png", "y.png"],
                                  "carol": ["only.jpg"], "dave": ["p.jpeg", "q.jpeg"]})
    splits = load_folder(tmp_path)
    assert splits.meta["identities"] == {"alice": 0, "bob": 1, "carol": 2, "dave": 3}
    assert splits.meta["cameras_known"] is False
    records = splits.train + splits.query + splits.gallery
    assert sorted(Path(r.path).relative_to(tmp_path.resolve()).as_posix() for r in records) == [
        "alice/1.jpg", "alice/2.jpg", "alice/3.jpg", "bob/x.png", "bob/y.png", "carol/only.jpg",
        "dave/p.jpeg", "dave/q.jpeg",
    ]
    assert len({r.camid for r in records}) == 8
    train_ids, test_ids = split_identities(splits)
    assert len(train_ids) == 2 and len(test_ids) == 2 and not train_ids & test_ids
    assert sorted(train_ids) == splits.meta["train_identities"]
    assert {r.pid for r in splits.train} == {0, 1}
    for r in splits.query + splits.gallery:  # raw pid = sorted index of the folder name
        assert r.pid == splits.meta["identities"][Path(r.path).parent.name]
    per_id_queries = {}
    for r in splits.query:
        per_id_queries[r.pid] = per_id_queries.get(r.pid, 0) + 1
    assert all(count == 1 for count in per_id_queries.values())
    assert 2 not in per_id_queries  # carol, a single image, never goes to query


def test_folder_single_image_test_identity_goes_to_gallery(tmp_path):
    images = {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg"], "c": ["1.jpg", "2.jpg"], "d": ["1.jpg"], "e": ["1.jpg", "2.jpg"]}
    make_identity_tree(tmp_path, images)
    for seed in range(6):
        splits = load_folder(tmp_path, seed=seed, train_fraction=0.4)
        for identity, pid in splits.meta["identities"].items():
            if identity in splits.meta["train_identities"]:
                continue
            n_query = sum(r.pid == pid for r in splits.query)
            n_gallery = sum(r.pid == pid for r in splits.gallery)
            assert (n_query, n_gallery) == ((1, 1) if len(images[identity]) == 2 else (0, 1))


def test_folder_seed_determinism(tmp_path, monkeypatch):
    make_identity_tree(tmp_path, TWENTY_IDS)
    first = load_folder(tmp_path, seed=3, train_fraction=0.6)
    assert len(split_identities(first)[0]) == 12
    # the split must not depend on the order the file system lists entries in
    real_scandir = os.scandir

    class ReversedScandir:
        def __init__(self, path):
            self.entries = list(reversed(list(real_scandir(path))))

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", ReversedScandir)
    again = load_folder(tmp_path, seed=3, train_fraction=0.6)
    monkeypatch.undo()
    assert (again.train, again.query, again.gallery) == (first.train, first.query, first.gallery)
    other = load_folder(tmp_path, seed=4, train_fraction=0.6)
    assert split_identities(other)[0] != split_identities(first)[0]


def test_folder_cameras_csv(tmp_path):
    images = {f"p{i}": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] for i in range(6)}
    make_identity_tree(tmp_path, images)
    cameras = {"a.jpg": 3, "b.jpg": 3, "c.jpg": 3, "d.jpg": 7}  # two cameras -> camids 0, 1
    lines = ["path,camid"] + [f"{p}/{name},{cameras[name]}" for p in images for name in images[p]]
    (tmp_path / "cameras.csv").write_text("\n".join(lines) + "\n")
    splits = load_folder(tmp_path, cameras_csv="cameras.csv", num_query_per_id=2)
    assert splits.meta["cameras_known"] is True and splits.meta["cameras"] == {"3": 0, "7": 1}
    for r in splits.train + splits.query + splits.gallery:
        assert r.camid == {3: 0, 7: 1}[cameras[os.path.basename(r.path)]]
    # two queries per test identity, taken from different cameras
    test_pids = {r.pid for r in splits.query}
    assert len(test_pids) == 3
    for pid in test_pids:
        assert sorted(r.camid for r in splits.query if r.pid == pid) == [0, 1]
        assert [r.camid for r in splits.gallery if r.pid == pid] == [0, 0]


def test_folder_camera_regex(tmp_path):
    make_identity_tree(tmp_path, {"x": ["x_c2_01.jpg", "x_c10_02.jpg"], "y": ["y_c1_01.jpg", "y_c2_9.jpg"]})
    for pattern in (r"_c(?P<cam>\d+)_", r"_c(\d+)_"):
        splits = load_folder(tmp_path, camera_regex=pattern)
        assert splits.meta["cameras"] == {"1": 0, "2": 1, "10": 2}  # numeric order
        camids = {os.path.basename(r.path): r.camid for r in splits.train + splits.query + splits.gallery}
        assert camids == {"x_c2_01.jpg": 1, "x_c10_02.jpg": 2, "y_c1_01.jpg": 0, "y_c2_9.jpg": 1}
    write_files(tmp_path / "y", ["y_cam3.jpg"])
    with pytest.raises(DatasetFormatError, match=r"y/y_cam3\.jpg"):
        load_folder(tmp_path, camera_regex=r"_c(\d+)_")


def test_folder_non_images_warned_hidden_ignored(tmp_path, caplog):
    make_identity_tree(tmp_path, {"a": ["1.jpg", "2.jpg", "notes.txt", ".DS_Store"], "b": ["1.jpg", "2.jpg"]})
    write_files(tmp_path, ["README.md", ".hidden"])
    with caplog.at_level(logging.WARNING):
        splits = load_folder(tmp_path)
    assert len(splits.train + splits.query + splits.gallery) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 2 " in m and "README.md" in m for m in messages), messages


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("file,camera\na/1.jpg,1\n", "header"),
        ("path,camid\na/1.jpg,1\na/2.jpg,1\nb/1.jpg,2\n", "b/2.jpg has no camera"),
        ("path,camid\na/1.jpg,1\na/2.jpg,1\nb/1.jpg,2\nb/2.jpg,2\nc/9.jpg,1\n", "c/9.jpg"),
        ("path,camid\na/1.jpg,1\na/2.jpg,\n", "line 3"),
        ("path,camid\na/1.jpg,1\na/1.jpg,2\n", "duplicate"),
    ],
)
def test_folder_bad_csv(tmp_path, csv_text, expected):
    make_identity_tree(tmp_path / "data", {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg", "2.jpg"]})
    (tmp_path / "cams.csv").write_text(csv_text)
    with pytest.raises(DatasetFormatError) as error:
        load_folder(tmp_path / "data", cameras_csv=str(tmp_path / "cams.csv"))
    assert expected in str(error.value) and "cams.csv" in str(error.value)


def test_folder_layout_errors(tmp_path):
    make_identity_tree(tmp_path, {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg", "2.jpg"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match=r"identity folder .*empty holds no image"):
        load_folder(tmp_path)
    (tmp_path / "empty").rmdir()
    write_files(tmp_path, ["loose.jpg"])
    with pytest.raises(DatasetFormatError, match=r"loose\.jpg lies directly in the root"):
        load_folder(tmp_path)
    with pytest.raises(DatasetFormatError, match=r"missing is not a folder"):
        load_folder(tmp_path / "missing")


def test_folder_verify_images(tmp_path):
    make_identity_tree(tmp_path, {"a": ["1.jpg", "2.jpg"], "b": ["1.jpg", "2.jpg"]})
    (tmp_path / "b" / "2.jpg").write_bytes(b"truncated")
    assert len(load_folder(tmp_path).gallery) == 1  # images are not opened by default
    with pytest.raises(DatasetFormatError, match=r"cannot read image .*b/2\.jpg"):
        load_folder(tmp_path, verify_images=True)


# -------------------------------------------------------------------------------------- registry


def test_registry_names_and_errors(tmp_path):
    assert list_datasets() == sorted(DATASETS) == [
        "cuhk03np", "dukemtmc", "folder", "market1501", "msmt17", "synthetic", "veri776",
    ]
    with pytest.raises(ValueError, match=r"unknown dataset 'market'.*market1501.*veri776"):
        load_dataset("market", tmp_path)
    with pytest.raises(TypeError, match=r"variant"):
        load_dataset("market1501", tmp_path, variant="labeled")
