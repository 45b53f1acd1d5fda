"""`reid-lab fit | validate | test | predict` through the real LightningCLI, Trainer and wandb (offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from reid_lab.cli import main
from reid_lab.data.datasets import load_dataset
from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import weights_digest
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.modules.checkpoint_io import AtomicCheckpointIO
from reid_lab.modules.checkpointing import parse_checkpoint_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _tiny_overrides(root: Path, tmp: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/experiments/synthetic_bot_r18.yaml"),
        f"--data.init_args.root={root}",
        "--data.init_args.image_size=[64,32]",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=32",
        "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        f"--trainer.default_root_dir={tmp}",
    ]


def test_fit_then_test_then_predict(tiny_synthetic, tmp_path, cli_argv, capsys):
    cli = run_lightning_cli(["fit", *_tiny_overrides(tiny_synthetic, tmp_path)])
    trainer = cli.trainer
    # num_classes was linked from the data module: 6 of the 12 synthetic ids are training ids.
    splits = load_dataset("synthetic", tiny_synthetic)
    assert cli.model.model.num_classes == splits.num_train_pids == 6
    assert trainer.current_epoch == 2
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # checkpoints are written atomically
    out = capsys.readouterr().out
    # No held-out identities: the run says it validates on the test split and keeps its last epoch only.
    assert ("validation (val/i2i/*): the test query / gallery of synthetic (the field's convention" in out
            and "checkpoint: last epoch only (last.ckpt), none selected on test data" in out)
    assert trainer.checkpoint_callback.best_model_path == ""
    best = Path(trainer.checkpoint_callback.last_model_path)
    assert sorted(p.name for p in best.parent.iterdir()) == ["last.ckpt"]  # no file chosen on the test split
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    # The space is identified by the weights: the label names it, a hash of the encoder's weights ends it.
    encoder_state = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    space_id = ckpt["embedding_space"]["space_id"]
    assert space_id == f"synthetic_bot_r18-512d-{weights_digest(encoder_state)}"
    assert ckpt["embedding_space"]["label"] == "synthetic_bot_r18" and ckpt["embedding_space"]["dim"] == 512
    # Any checkpoint records how to rebuild its encoder.
    assert ckpt["encoder"]["class_path"] == "reid_lab.models.reid_model.ReIDModel"
    assert best.parent == Path(trainer.checkpoint_callback.dirpath)  # no metric name turned into a sub-folder
    # Keys name the protocol (image -> image ReID); no key without it is logged.
    assert {"val/i2i/R1", "val/i2i/mAP", "val/i2i/mINP"} <= set(trainer.callback_metrics)
    assert not {"val/mAP", "val/R1"} & set(trainer.callback_metrics)
    val_map = float(trainer.callback_metrics["val/i2i/mAP"])
    assert 0.0 < val_map <= 100.0
    # wandb wrote a real offline run with the resolved config.
    run_dirs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert run_dirs, "expected an offline wandb run folder"
    trainer.logger.experiment.finish()

    test_cli = run_lightning_cli(["test", *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", str(best)])
    metrics = test_cli.trainer.callback_metrics
    assert {"test/i2i/R1", "test/i2i/mAP", "test/i2i/mINP"} <= set(metrics)
    # Testing the last checkpoint reproduces the last validation's mAP (same images, same protocol), and the
    # test line names the epoch as the training and validation lines of that epoch did.
    assert float(metrics["test/i2i/mAP"]) == pytest.approx(val_map, abs=1e-3)
    assert "[test, checkpoint of epoch 2] test/i2i: R1" in capsys.readouterr().out
    test_cli.trainer.logger.experiment.finish()

    import wandb

    from tests.wandb_records import read_records

    wandb.teardown()  # every run file written before it is read back
    # The fit's wandb run: typed, tagged, named uniquely, its config as nested keys (sortable in wandb).
    fit_log = next(p for p in (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
                   if any(r.WhichOneof("record_type") == "run" and r.run.job_type == "fit" for r in read_records(p)))
    records = read_records(fit_log)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {"dataset:synthetic", "model:ReIDModule", "backbone:resnet18", "method:none"} <= set(run.tags)
    assert re.fullmatch(r"synthetic_bot_r18-\d{4}-\d{6}", run.display_name), run.display_name
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"trainer", "model", "data"} <= config_keys and "config" not in config_keys
    runs_before = set((tmp_path / "runs" / "wandb").glob("offline-run-*"))

    out = tmp_path / "features.pt"
    pred_cli = run_lightning_cli(
        ["predict", *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", str(best),
         f"--predict_writer.output={out}"]
    )
    # predict writes a feature file and logs nothing: no (empty) logger run
    assert pred_cli.trainer.logger is None
    assert set((tmp_path / "runs" / "wandb").glob("offline-run-*")) == runs_before
    features = FeatureSet.load(out)
    assert features.features.shape == (len(splits.query) + len(splits.gallery), 512)
    assert features.paths == [r.path for r in splits.query + splits.gallery]
    assert features.pids.tolist() == [r.pid for r in splits.query + splits.gallery]
    assert int(features.is_query.sum()) == len(splits.query)
    assert features.space["space_id"] == space_id


def test_held_out_identities_select_the_best_epoch_named_as_the_lines_count_it(tiny_synthetic, tmp_path, cli_argv,
                                                                              capsys):
    """With held-out training identities the best epoch is chosen on them. Its file name separates key and
    value, and the training line, the validation line and the file name count that epoch alike (from 1)."""
    cli = run_lightning_cli(["fit", *_tiny_overrides(tiny_synthetic, tmp_path), "--data.init_args.val_fraction=0.3"])
    cli.trainer.logger.experiment.finish()
    out = capsys.readouterr().out
    assert re.search(r"validation \(val/i2i/\*\): 2 held-out training identities of synthetic \(val_fraction 0\.3, "
                     r"seed 0\).*; checkpoint: best val/i2i/mAP \(selected on held-out data\) and last\.ckpt", out)
    trained = [int(e) for e in re.findall(r"^\[train\] epoch (\d+)/2 +done", out, re.M)]
    validated = {int(e): v for e, v in re.findall(r"^\[epoch (\d+)/2\] val/i2i: R1 .* mAP ([\d.]+) ", out, re.M)}
    assert trained == [1, 2] and sorted(validated) == [1, 2]
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    name = parse_checkpoint_name(best.name)
    assert name is not None and name.metric == "val_i2i_mAP", best.name
    # a later epoch replaces the kept one only when strictly better: the first of equal values stays
    best_epoch = max(validated, key=lambda e: (float(validated[e]), -e))
    assert name.epoch == best_epoch and f"{name.value:.2f}" == validated[best_epoch]
    assert torch.load(best, map_location="cpu", weights_only=False)["epoch"] + 1 == best_epoch  # Lightning's index


def test_print_config_composes_building_blocks(tmp_path, cli_argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([
            "fit",
            "--config", str(REPO / "configs/data/market1501.yaml"),
            "--config", str(REPO / "configs/model/bot_r50.yaml"),
            "--config", str(REPO / "configs/trainer/default.yaml"),
            "--data.init_args.root=/datasets",
            "--print_config",
        ])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["root"] == "/datasets"
    assert config["data"]["init_args"]["dataset"] == "market1501"
    assert config["model"]["init_args"]["backbone"] == "resnet50"
    assert config["model"]["init_args"]["last_stride"] == 1
    assert config["trainer"]["max_epochs"] == 120
