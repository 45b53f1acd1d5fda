"""Small data fails early and clearly: a PK batch the training set cannot fill is refused in one line before any
run folder exists; ``limit_val_batches`` ranks a prefix that holds queries and gallery in proportion."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from reid_lab.cli import main
from reid_lab.data import ReIDDataModule
from reid_lab.data.sampler import (
    TooFewIdentities,
    interleave_in_proportion,
    proportional_query_gallery_batches,
)

REPO = Path(__file__).resolve().parents[2]


def _overrides(root: Path, tmp: Path) -> list[str]:
    return ["--config", str(REPO / "configs/experiments/synthetic_bot_r18.yaml"), f"--data.init_args.root={root}",
            "--data.init_args.image_size=[64,32]", "--data.init_args.num_workers=0", "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", f"--trainer.default_root_dir={tmp}"]


def test_interleave_keeps_each_order_and_every_prefix_in_proportion():
    assert interleave_in_proportion(["q0", "q1"], ["g0", "g1", "g2", "g3"]) == ["g0", "q0", "g1", "g2", "q1", "g3"]
    batches = proportional_query_gallery_batches(30, 90, batch_size=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(120)) and all(len(b) <= 8 for b in batches)
    assert [i for i in flat if i < 30] == list(range(30)) and [i for i in flat if i >= 30] == list(range(30, 120))
    for n in range(1, len(flat) + 1):  # any prefix: a quarter queries, give or take one
        assert abs(sum(i < 30 for i in flat[:n]) - n / 4) <= 1


@pytest.mark.slow
def test_fit_refuses_a_pk_batch_the_training_set_cannot_fill_before_any_run_folder(tiny_synthetic, tmp_path,
                                                                                 monkeypatch, cli_argv, capsys):
    """The tiny set has 6 training identities; batch_size 64 / num_instances 4 needs 16. Before: Lightning
    started, made a wandb run and a config file, and failed at the first batch with a traceback."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *_overrides(tiny_synthetic, tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for words in ("64 / 4 = 16 identities", "has 6", "--data.init_args.batch_size", "--data.init_args.num_instances"):
        assert words in err
    assert list(tmp_path.iterdir()) == []  # no runs/, no wandb run, no run_configs/


def test_a_data_module_names_the_pk_options_it_cannot_fill(tiny_synthetic):
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), batch_size=32, num_instances=4)
    with pytest.raises(TooFewIdentities, match=r"32 / 4 = 8 identities per batch, the synthetic training set "
                                               r".* has 6: lower --x.batch_size to at most 24"):
        dm.check_pk_sampling(option_prefix="--x.")
    ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), batch_size=24, num_instances=4).check_pk_sampling()
    ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), batch_size=64, num_instances=0).check_pk_sampling()


def test_a_limited_evaluation_loader_starts_with_queries_and_gallery(tiny_synthetic):
    """Before: the loader yielded every query first, so one batch held no gallery item."""
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), eval_batch_size=8,
                        num_workers=0)
    records, is_query = dm.eval_records()
    full = [i for b in dm.test_dataloader().batch_sampler for i in b]
    assert full == list(range(len(records)))  # without a limit: the order as before
    dm.trainer = L.Trainer(limit_val_batches=1, limit_test_batches=0.25, logger=False, accelerator="cpu")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader.batch_sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(records)))
        first = [is_query[i] for i in batches[0]]
        assert any(first) and not all(first)
        first_batch = next(iter(loader))
        assert first_batch["is_query"].any() and not first_batch["is_query"].all()


@pytest.mark.slow
def test_validate_with_limit_val_batches_ranks_a_prefix(tiny_synthetic, tmp_path, monkeypatch, cli_argv, capsys):
    """`--trainer.limit_val_batches 1`, Lightning's debugging flag: before, every validation ended in
    `RetrievalMetric needs both query and gallery items, got N query and 0 gallery items`."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    args = ["validate", *_overrides(tiny_synthetic, tmp_path), "--ckpt_path", "random",
            "--data.init_args.eval_batch_size=8", "--trainer.limit_val_batches=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val/i2i/mAP" in out
