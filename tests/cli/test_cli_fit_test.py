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


def test_fit_then_test_then_predict(tiny_synthetic, tmp_path, cli_argv):
    cli = run_lightning_cli(["fit", *_tiny_overrides(tiny_synthetic, tmp_path)])
    trainer = cli.trainer
    # num_classes was linked from the data module: 6 of the 12 synthetic ids are training ids.
    splits = load_dataset("synthetic", tiny_synthetic)
    assert cli.model.model.num_classes == splits.num_train_pids == 6
    assert trainer.current_epoch == 2
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # checkpoints are written atomically
    best = Path(trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.suffix == ".ckpt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    # The space is identified by the weights: the label names it, a hash of the encoder's weights ends it.
    encoder_state = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    space_id = ckpt["embedding_space"]["space_id"]
    assert space_id == f"synthetic_bot_r18-512d-{weights_digest(encoder_state)}"
    assert ckpt["embedding_space"]["label"] == "synthetic_bot_r18" and ckpt["embedding_space"]["dim"] == 512
    # Any checkpoint records how to rebuild its encoder (the model's own checkpoint file name names the monitor).
    assert ckpt["encoder"]["class_path"] == "reid_lab.models.reid_model.ReIDModel" and re.fullmatch(r"epoch\d{3}-mAP\d+\.\d{2}\.ckpt", best.name)
    assert best.parent == Path(trainer.checkpoint_callback.dirpath)  # no metric name turned into a sub-folder
    val_map = float(trainer.callback_metrics["val/mAP"])
    assert 0.0 < val_map <= 100.0
    # wandb wrote a real offline run with the resolved config.
    run_dirs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert run_dirs, "expected an offline wandb run folder"
    trainer.logger.experiment.finish()

    test_cli = run_lightning_cli(["test", *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", str(best)])
    metrics = test_cli.trainer.callback_metrics
    assert {"test/R1", "test/mAP", "test/mINP"} <= set(metrics)
    # Testing the best checkpoint reproduces its validation mAP (same images, same protocol).
    assert float(metrics["test/mAP"]) == pytest.approx(val_map, abs=1e-3)
    test_cli.trainer.logger.experiment.finish()

    out = tmp_path / "features.pt"
    pred_cli = run_lightning_cli(
        ["predict", *_tiny_overrides(tiny_synthetic, tmp_path), "--ckpt_path", str(best),
         f"--predict_writer.output={out}"]
    )
    pred_cli.trainer.logger.experiment.finish()
    features = FeatureSet.load(out)
    assert features.features.shape == (len(splits.query) + len(splits.gallery), 512)
    assert features.paths == [r.path for r in splits.query + splits.gallery]
    assert features.pids.tolist() == [r.pid for r in splits.query + splits.gallery]
    assert int(features.is_query.sum()) == len(splits.query)
    assert features.space["space_id"] == space_id


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
