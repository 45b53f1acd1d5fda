"""EmbeddingCheckpoint: keys that name their protocol, file names that separate key and value, and no checkpoint
chosen on test data unless asked for (real Trainer fits of a ResNet-18 ReIDModule over the tiny synthetic set)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.pair_datamodule import PairDataModule
from reid_lab.data.text_datamodule import TextImageDataModule
from reid_lab.modules.checkpointing import (
    CheckpointName,
    EmbeddingCheckpoint,
    checkpoint_filename,
    current_key,
    parse_checkpoint_name,
)
from reid_lab.modules.reid import ReIDModule
from tests.data.text_fixtures import make_cuhkpedes, make_icfgpedes


def test_a_checkpoint_name_separates_key_and_value_and_reads_back(tmp_path):
    callback = EmbeddingCheckpoint(dirpath=str(tmp_path), filename=checkpoint_filename("val/i2i/mAP"))
    path = callback.format_checkpoint_name({"epoch_number": torch.tensor(3), "val/i2i/mAP": torch.tensor(56.3912)})
    assert path == str(tmp_path / "epoch003-val_i2i_mAP=56.39.ckpt")
    assert parse_checkpoint_name("epoch003-val_i2i_mAP=56.39.ckpt") == CheckpointName(3, "val_i2i_mAP", 56.39)
    # Lightning's version suffix for a name already taken; a P@1 key keeps its '@'
    assert parse_checkpoint_name("epoch012-val_pairs_P@1=21.44-v1.ckpt") == CheckpointName(12, "val_pairs_P@1", 21.44)
    # the old names ran key and value together (R1 = 0.66 read as "R10.66"): not read as a selected checkpoint
    assert parse_checkpoint_name("epoch000-R10.66.ckpt") is None
    assert parse_checkpoint_name("last.ckpt") is None


@pytest.mark.parametrize(("old", "tag", "new"), [
    ("val/mAP", "i2i", "val/i2i/mAP"),
    ("val/R1", "t2i", "val/t2i/R1"),
    ("test/mINP", "i2i", "test/i2i/mINP"),
    ("val/cross/mAP", "i2i", "val/cross/i2i/mAP"),
    ("val/cross/R5", "t2i", "val/cross/t2i/R5"),
    ("val/P@1", "t2i", "val/pairs/P@1"),
    ("val/i2i/mAP", "i2i", "val/i2i/mAP"),  # already current
    ("train/loss", "i2i", "train/loss"),  # not a metric key
])
def test_legacy_keys_map_to_the_keys_that_name_their_protocol(old, tag, new):
    assert current_key(old, tag) == new


def test_every_data_module_says_whether_it_validates_on_test_data(tiny_synthetic, tmp_path):
    reid = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic))
    assert reid.validation_source().is_test
    assert reid.validation_source().description == "the test query / gallery of synthetic"
    held = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), val_fraction=0.3)
    # round(0.3 * 6 training identities) = 2 identities held out
    assert not held.validation_source().is_test
    assert held.validation_source().description.startswith("2 held-out training identities of synthetic")
    # caption data: a dataset's own val split is not test data; without one (ICFG-PEDES) validation is the test split
    make_cuhkpedes(tmp_path)
    make_icfgpedes(tmp_path)
    assert not TextImageDataModule(dataset="cuhkpedes", root=str(tmp_path)).validation_source().is_test
    assert TextImageDataModule(dataset="cuhkpedes", root=str(tmp_path), val_split="test").validation_source().is_test
    icfg = TextImageDataModule(dataset="icfgpedes", root=str(tmp_path)).validation_source()
    assert icfg.is_test and icfg.description.startswith("the test split of")
    # instruction pairs: validation falls back to the test pairs unless a val file is given
    assert PairDataModule(train_pairs="train.jsonl", test_pairs="test.jsonl").validation_source().is_test
    assert not PairDataModule(train_pairs="train.jsonl", val_pairs="val.jsonl",
                              test_pairs="test.jsonl").validation_source().is_test


def _fit(root, tmp_path, callbacks, *, val_fraction=0.0, checkpointing=True):
    L.seed_everything(0)
    dm = ReIDDataModule(dataset="synthetic", root=str(root), image_size=(64, 32), batch_size=8, num_instances=2,
                        eval_batch_size=64, num_workers=0, val_fraction=val_fraction)
    module = ReIDModule(backbone="resnet18", num_classes=dm.num_classes, scheduler="none", warmup_epochs=0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    return trainer


def _files(tmp_path):
    return sorted(p.name for p in (tmp_path / "ckpt").iterdir())


@pytest.mark.slow
def test_validation_on_the_test_split_keeps_the_last_epoch_only(tiny_synthetic, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no select_on_test warning without select_on_test
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
        trainer = _fit(tiny_synthetic, tmp_path, [EmbeddingCheckpoint(dirpath=str(tmp_path / "ckpt"))])
    assert "val/i2i/mAP" in trainer.callback_metrics  # validated: there was something to select on
    assert _files(tmp_path) == ["last.ckpt"] and trainer.checkpoint_callback.best_model_path == ""
    out = capsys.readouterr().out
    assert ("validation (val/i2i/*): the test query / gallery of synthetic (the field's convention" in out
            and "checkpoint: last epoch only (last.ckpt), none selected on test data" in out)


@pytest.mark.slow
def test_select_on_test_keeps_the_best_on_test_data_with_a_warning(tiny_synthetic, tmp_path, capsys):
    callback = EmbeddingCheckpoint(dirpath=str(tmp_path / "ckpt"), select_on_test=True)
    with pytest.warns(UserWarning, match=r"select_on_test=True\) chooses the best checkpoint by val/i2i/mAP on the "
                                         r"test query / gallery of synthetic.*optimistic"):
        trainer = _fit(tiny_synthetic, tmp_path, [callback])
    value = float(trainer.callback_metrics["val/i2i/mAP"])
    assert _files(tmp_path) == [f"epoch001-val_i2i_mAP={value:.2f}.ckpt", "last.ckpt"]
    assert "checkpoint: best val/i2i/mAP ON THE TEST SPLIT (select_on_test: true)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_legacy_monitor_key_selects_on_the_key_that_replaced_it(tiny_synthetic, tmp_path, capsys):
    callback = EmbeddingCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/mAP")
    with pytest.warns(FutureWarning, match=r"'val/mAP' is a legacy key.*'val/i2i/mAP'"):
        trainer = _fit(tiny_synthetic, tmp_path, [callback], val_fraction=0.3)
    assert callback.monitor == "val/i2i/mAP"
    value = float(trainer.callback_metrics["val/i2i/mAP"])
    assert _files(tmp_path) == [f"epoch001-val_i2i_mAP={value:.2f}.ckpt", "last.ckpt"]
    assert "checkpoint: best val/i2i/mAP (selected on held-out data)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_without_the_checkpoint_callback_still_says_what_it_validates_on(tiny_synthetic, tmp_path, capsys):
    _fit(tiny_synthetic, tmp_path, [], val_fraction=0.3, checkpointing=False)
    out = capsys.readouterr().out
    assert "validation (val/i2i/*): 2 held-out training identities of synthetic (val_fraction 0.3, seed 0)" in out
    assert "[epoch 1/1] val/i2i: R1" in out
