"""Pre-flight image check on real corrupted files: every bad image named before training, or skipped and reported."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback
from PIL import Image

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.datasets import load_dataset
from reid_lab.data.preflight import CACHE_NAME, REPORT_NAME, BadImagesError, check_image, check_images
from reid_lab.modules.reid import ReIDModule

# the session's tiny_synthetic tree may already hold a cache / report written by other tests
FOREIGN_CACHE = shutil.ignore_patterns(CACHE_NAME, REPORT_NAME)


def _jpeg(height: int = 64, width: int = 32) -> bytes:
    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])  # fractions of the file kept; -2: all but the end marker
def test_truncated_jpeg_is_caught_where_verify_is_not(tmp_path, keep):
    data = _jpeg()
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    good.write_bytes(data)
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    assert check_image(str(good)) is None
    with Image.open(cut) as image:
        image.verify()  # PIL's header check alone passes a truncated JPEG
    assert "truncated" in check_image(str(cut))


def test_empty_and_non_image_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 64), (10, 200, 30)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-30])
    assert check_image(str(tmp_path / "empty.jpg")) == "empty file (0 bytes)"
    assert "cannot identify image file" in check_image(str(tmp_path / "text.jpg"))
    assert check_image(str(tmp_path / "cut.png")) is not None
    assert check_image(str(tmp_path / "missing.jpg")).startswith("cannot stat")


@pytest.fixture
def corrupted(tiny_synthetic, tmp_path):
    """A copy of the tiny synthetic set with a zero-byte gallery image, a truncated train JPEG, a text query."""
    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root, ignore=FOREIGN_CACHE)  # a fresh tree: no cache from other tests
    splits = load_dataset("synthetic", root)
    gallery, train, query = splits.gallery[3].path, splits.train[5].path, splits.query[1].path
    open(gallery, "wb").close()
    data = open(train, "rb").read()
    open(train, "wb").write(data[: len(data) // 2])
    open(query, "w").write("<html>not found</html>")
    return root, {gallery, train, query}


def _dm(root, **kw):
    return ReIDDataModule(dataset="synthetic", root=str(root), image_size=(64, 32), batch_size=8, num_instances=2,
                          eval_batch_size=64, num_workers=0, **kw)


class StepCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def _trainer(tmp_path, counter, **kw):
    return L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=[counter], default_root_dir=str(tmp_path), **kw)


def test_fit_names_every_bad_image_before_training(corrupted, tmp_path):
    root, bad = corrupted
    dm = _dm(root)
    module = ReIDModule(backbone="resnet18", num_classes=dm.num_classes)
    counter = StepCounter()
    with pytest.raises(BadImagesError) as error:
        _trainer(tmp_path, counter).fit(module, dm)
    assert counter.batches == 0  # nothing trained
    message = str(error.value)
    assert "3 image(s) of the train, query, gallery split(s)" in message and "skip_bad_images" in message
    for path in bad:
        assert path in message
    assert set(error.value.bad) == bad
    report = json.loads((root / REPORT_NAME).read_text())
    assert {entry["path"] for entry in report["bad_images"]} == bad


def test_test_stage_checks_query_and_gallery_only(corrupted):
    root, bad = corrupted
    with pytest.raises(BadImagesError) as error:
        _dm(root).setup("test")
    assert set(error.value.bad) == bad - {load_dataset("synthetic", root).train[5].path}


@pytest.mark.slow
def test_skip_bad_images_trains_without_them_and_reports(corrupted, tmp_path, caplog):
    root, bad = corrupted
    dm = _dm(root, skip_bad_images=True)
    num_classes = dm.num_classes
    module = ReIDModule(backbone="resnet18", num_classes=num_classes)
    counter = StepCounter()
    with caplog.at_level(logging.WARNING, logger="reid_lab.data"):
        trainer = _trainer(tmp_path, counter)
        trainer.fit(module, dm)  # reads every remaining train, query and gallery image
    assert counter.batches == 2 and "val/i2i/mAP" in trainer.callback_metrics
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipping 3 unreadable image(s)" in warning and all(path in warning for path in bad)
    assert str(root / REPORT_NAME) in warning
    report = json.loads((root / REPORT_NAME).read_text())
    assert {entry["path"] for entry in report["bad_images"]} == bad
    read = {r.path for r in dm.train_records} | {r.path for r in dm.eval_records()[0]}
    splits = load_dataset("synthetic", root)
    assert read == {r.path for r in splits.train + splits.query + splits.gallery} - bad
    assert dm.num_classes == num_classes  # labels keep their numbering


def test_cache_is_keyed_by_file_stat(tiny_synthetic, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root, ignore=FOREIGN_CACHE)  # a fresh tree: no cache from other tests
    paths = [r.path for split in load_dataset("synthetic", root).__dict__.values() if isinstance(split, list)
             for r in split]
    assert check_images(paths, root) == ({}, None)
    cache = json.loads((root / CACHE_NAME).read_text())
    assert set(cache["good"]) == {os.path.abspath(p) for p in paths}
    # Spoil an image without changing its size or mtime: the cache (rightly keyed by stat) trusts it ...
    victim = paths[0]
    stat = os.stat(victim)
    data = open(victim, "rb").read()
    open(victim, "wb").write(b"\0" * len(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert check_images(paths, root) == ({}, None)
    # ... and a changed mtime makes it check the file again.
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    bad, report = check_images(paths, root)
    assert list(bad) == [os.path.abspath(victim)] and report == root / REPORT_NAME
    # Fixed: the report goes away.
    open(victim, "wb").write(data)
    assert check_images(paths, root) == ({}, None) and not report.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_cache_goes_to_the_user_cache_when_the_dataset_is_read_only(tiny_synthetic, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root, ignore=FOREIGN_CACHE)  # a fresh tree: no cache from other tests
    monkeypatch.setenv("REID_LAB_CACHE", str(tmp_path / "cache"))
    os.chmod(root, 0o555)
    try:
        paths = [r.path for r in load_dataset("synthetic", root).query]
        assert check_images(paths, root) == ({}, None)
    finally:
        os.chmod(root, 0o755)
    assert not (root / CACHE_NAME).exists()
    assert len(list((tmp_path / "cache" / "preflight").glob(f"data-*/{CACHE_NAME}"))) == 1
