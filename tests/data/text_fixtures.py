"""Fabricated text-to-person datasets in the exact on-disk layouts (tiny JSON + tiny images written here)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_image(path: Path, colour: tuple[int, int, int] = (120, 30, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), colour).save(path)


def make_cuhkpedes(parent: Path) -> Path:
    """``parent/CUHK-PEDES/{reid_raw.json, imgs/...}``: ids 1-based, train / val / test, processed_tokens."""
    root = parent / "CUHK-PEDES"
    entries = []
    plan = [("train", 5, 2), ("train", 9, 2), ("train", 12, 3), ("val", 20, 2), ("test", 30, 2), ("test", 31, 2)]
    for split, pid, count in plan:
        for k in range(count):
            rel = f"CUHK01/{pid:04d}{k:03d}.png" if split != "test" else f"test_query/p{pid}_s{k}.jpg"
            write_image(root / "imgs" / rel, (pid * 7 % 255, k * 40, 90))
            captions = [f"person {pid} image {k} wears a red coat.", f"a pedestrian number {pid} in view {k}."]
            entries.append({"split": split, "captions": captions, "file_path": rel,
                            "processed_tokens": [c.lower().split() for c in captions], "id": pid})
    (root / "reid_raw.json").write_text(json.dumps(entries))
    return root


def make_icfgpedes(parent: Path) -> Path:
    """``parent/ICFG-PEDES/{ICFG-PEDES.json, imgs/{train,test}/<pid>/<MSMT17 name>}``, one caption per image."""
    root = parent / "ICFG-PEDES"
    entries = []
    for split, pid, cams in [("train", 0, (1, 5)), ("train", 3, (2, 2)), ("test", 3102, (7, 15))]:
        for k, cam in enumerate(cams):
            rel = f"{split}/{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"
            write_image(root / "imgs" / rel)
            entries.append({"id": pid, "file_path": rel, "captions": [f"icfg person {pid} shot {k}."],
                            "split": split, "processed_tokens": [["icfg"]]})
    (root / "ICFG-PEDES.json").write_text(json.dumps(entries))
    return root


def make_rstpreid(parent: Path) -> Path:
    """``parent/RSTPReid/{data_captions.json, imgs/<pid>_c<cam>_<n>.jpg}``, two captions per image."""
    root = parent / "RSTPReid"
    entries = []
    for split, pid, cams in [("train", 0, (14, 3)), ("train", 1, (1, 1)), ("val", 3701, (2, 9)),
                             ("test", 3901, (5, 11))]:
        for k, cam in enumerate(cams):
            rel = f"{pid:04d}_c{cam}_{k:04d}.jpg"
            write_image(root / "imgs" / rel)
            entries.append({"id": pid, "img_path": rel, "captions": [f"rstp {pid} a {k}.", f"rstp {pid} b {k}."],
                            "split": split})
    (root / "data_captions.json").write_text(json.dumps(entries))
    return root
