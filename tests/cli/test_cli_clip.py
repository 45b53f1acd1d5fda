"""A CLIP text-to-person model through the real LightningCLI: fit, test (text -> image), predict captions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reid_lab.data.text.parsers import load_text_dataset
from reid_lab.embedding.features import FeatureSet
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.metrics.rank import evaluate_rank_reference

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _args(root: Path, tmp: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/experiments/synthetic_clip_text2person.yaml"),
        f"--data.init_args.root={root}", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=32", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=2", "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", f"--trainer.default_root_dir={tmp}",
    ]


def test_fit_test_predict_text_to_person(tiny_synthetic, tmp_path, cli_argv):
    fit = run_lightning_cli(["fit", *_args(tiny_synthetic, tmp_path)])
    fit.trainer.logger.experiment.finish()
    # the synthetic captions have no val split: validation ranks the test split, so only last.ckpt is kept
    assert fit.model.monitor == "val/t2i/R1" and "val/t2i/R1" in fit.trainer.callback_metrics
    assert fit.trainer.checkpoint_callback.best_model_path == ""
    best = fit.trainer.checkpoint_callback.last_model_path
    assert [p.name for p in Path(best).parent.iterdir()] == ["last.ckpt"]
    test = run_lightning_cli(["test", *_args(tiny_synthetic, tmp_path), "--ckpt_path", best])
    test.trainer.logger.experiment.finish()
    metrics = test.trainer.callback_metrics

    outs = {}
    for modality in ("text", "image"):
        out = tmp_path / f"{modality}.pt"
        cli = run_lightning_cli(["predict", *_args(tiny_synthetic, tmp_path), "--ckpt_path", best,
                                 f"--data.init_args.predict_modality={modality}", f"--predict_writer.output={out}"])
        assert cli.trainer.logger is None  # predict opens no logger run
        outs[modality] = FeatureSet.load(out)
    captions, images = outs["text"], outs["image"]
    assert captions.modality == "text" and captions.camids is None and isinstance(captions.items[0], str)
    assert captions.space["modalities"] == ["image", "text"] and captions.space == images.space
    # test/t2i/R1 and mAP equal an independent evaluation of the predicted caption and image embeddings
    q = torch.nn.functional.normalize(captions.features, dim=1)
    g = torch.nn.functional.normalize(images.features, dim=1)
    reference = evaluate_rank_reference(1 - q @ g.T, captions.pids, images.pids)
    assert float(metrics["test/t2i/R1"]) == pytest.approx(100 * reference.cmc[0], abs=1e-3)
    assert float(metrics["test/t2i/mAP"]) == pytest.approx(100 * reference.mAP, abs=1e-3)
    split = load_text_dataset("synthetic", tiny_synthetic)
    assert len(captions.items) == sum(len(r.captions) for r in split.test)


def test_a_tokenizer_that_does_not_match_the_text_tower_is_refused(tiny_synthetic, tmp_path, cli_argv):
    with pytest.raises(ValueError, match="differ from the text tower's"):
        run_lightning_cli(["fit", *_args(tiny_synthetic, tmp_path), "--data.init_args.context_length=16"])


def test_the_image_tower_is_tested_as_reid_on_reid_data(tiny_synthetic, tmp_path, cli_argv):
    """`reid-lab test` of a dual encoder on a ReID data module: image queries, same-camera junk removed."""
    reid_data = ["--config", str(REPO / "configs/data/synthetic.yaml"), f"--data.init_args.root={tiny_synthetic}",
                 "--data.init_args.image_size=[128, 64]", "--data.init_args.num_workers=0"]
    out = tmp_path / "images.pt"
    test = run_lightning_cli(["test", *_args(tiny_synthetic, tmp_path), *reid_data, "--ckpt_path", "random"])
    test.trainer.logger.experiment.finish()
    assert type(test.datamodule).__name__ == "ReIDDataModule" and test.model.protocol == "reid"
    metrics = test.trainer.callback_metrics
    predict = run_lightning_cli(["predict", *_args(tiny_synthetic, tmp_path), *reid_data, "--ckpt_path", "random",
                                 "--data.init_args.predict_split=test", f"--predict_writer.output={out}"])
    assert predict.trainer.logger is None  # predict opens no logger run
    images = FeatureSet.load(out)
    query, gallery = images.split()
    assert images.modality == "image" and images.camids is not None and bool(images.is_query.any())
    q = torch.nn.functional.normalize(query.features, dim=1)
    g = torch.nn.functional.normalize(gallery.features, dim=1)
    reference = evaluate_rank_reference(1 - q @ g.T, query.pids, gallery.pids, query.camids, gallery.camids)
    # the dual encoder on ReID data reports image -> image keys, not its caption protocol's
    assert not any(k.startswith("test/t2i/") for k in metrics)
    assert float(metrics["test/i2i/mAP"]) == pytest.approx(100 * reference.mAP, abs=1e-3)
    assert float(metrics["test/i2i/R1"]) == pytest.approx(100 * reference.cmc[0], abs=1e-3)
    # without the camera filter the numbers would differ on this set (a check that the filter is applied)
    unfiltered = evaluate_rank_reference(1 - q @ g.T, query.pids, gallery.pids)
    assert unfiltered.mAP != pytest.approx(reference.mAP, abs=1e-6)
