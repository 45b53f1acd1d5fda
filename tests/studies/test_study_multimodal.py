"""`reid-lab upgrade` across encoders and modalities, end to end on the tiny synthetic set: a ReID CNN upgraded to
a CLIP dual encoder (image queries), and CLIP -> CLIP evaluated text -> image (caption queries, no camera filter).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from reid_lab.cli import main
from reid_lab.data.text_datamodule import TextImageDataModule
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.features import FeatureSet
from reid_lab.metrics.backfill import old_model_uncertainty
from reid_lab.metrics.rank import evaluate_rank_reference

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAINER = {"trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 2, "trainer.limit_train_batches": 2,
           "trainer.accelerator": "cpu"}


def _data(root: Path) -> dict:
    return {"data.init_args.root": str(root), "data.init_args.image_size": [64, 32], "data.init_args.batch_size": 8,
            "data.init_args.eval_batch_size": 64, "data.init_args.num_workers": 0}


def _clip(root: Path, embed_dim: int = 32) -> dict:
    """Overrides of a tiny open_clip dual encoder (random init) on the synthetic captions at 64 x 32."""
    return {**_data(root), **TRAINER, "data.init_args.context_length": 16, "data.init_args.num_instances": 4,
            "model.init_args.context_length": 16, "model.init_args.force_image_size": [64, 32],
            "model.init_args.model_cfg.embed_dim": embed_dim,
            "model.init_args.model_cfg.text_cfg.context_length": 16}


def _cross(query: FeatureSet, gallery: FeatureSet):
    """Reference evaluation of ``query`` against ``gallery`` (cosine, the naive per-query evaluator)."""
    qn = torch.nn.functional.normalize(query.features, dim=1)
    gn = torch.nn.functional.normalize(gallery.features, dim=1)
    return evaluate_rank_reference(1 - qn @ gn.T, query.pids, gallery.pids, query.camids, gallery.camids)


def _cell(report_path: Path, query: str, gallery: str) -> dict:
    import json

    cells = json.loads(report_path.read_text())["compatibility_matrix"]["cells"]
    return next(c for c in cells if c["query"] == query and c["gallery"] == gallery)


def test_clip_to_clip_study_ranks_new_captions_against_the_old_image_gallery(tiny_synthetic, tmp_path, cli_argv,
                                                                            capsys):
    out = tmp_path / "study"
    study = {"study": {
        "name": "tiny_clip_to_clip", "out": str(out),
        "configs": [str(REPO / "configs/data/synthetic_text.yaml"), str(REPO / "configs/model/clip_tiny.yaml"),
                    str(REPO / "configs/trainer/cpu_demo.yaml")],
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0},
        "old": {"overrides": _clip(tiny_synthetic)}, "new": {"overrides": _clip(tiny_synthetic)},
        "methods": {"independent": {},
                    "bct": {"compatible_losses": [{"name": "bct"}], "pairings": ["image->image", "text->image"]}},
        "evaluation": {"orderings": ["random", "uncertainty", "oracle"], "ratios": [0, 0.5, 1.0]},
    }}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["upgrade", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    # the old dual encoder has no classifier: the uncertainty ordering is skipped, and says so
    assert "no uncertainty ordering" in printed

    # Feature files: caption queries (no cameras) then gallery images, in the data module's test order.
    dm = TextImageDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32))
    records, is_query = dm.eval_records("test")
    feats = {v: FeatureSet.load(out / "features" / f"{v}.pt") for v in ("old", "independent", "bct")}
    for fs in feats.values():
        assert fs.modalities == ("text", "image") and fs.camids is None
        assert fs.is_query.tolist() == is_query
        assert fs.items == [r.text if q else r.path for r, q in zip(records, is_query)]
        assert fs.pids.tolist() == [r.pid for r in records]

    # The matrix cells equal a direct evaluation of the saved features without camera filtering.
    old_q, old_g = feats["old"].split()
    bct_q, _ = feats["bct"].split()
    cross = _cross(bct_q, old_g)
    assert _cell(out / "report.json", "bct", "old")["mAP"] == pytest.approx(100 * cross.mAP, abs=1e-4)
    assert _cell(out / "report.json", "old", "old")["R1"] == pytest.approx(100 * _cross(old_q, old_g).cmc[0],
                                                                         abs=1e-4)

    # The BCT model was trained on both pairings, against the old checkpoint, on the new split's images.
    ckpt = read_checkpoint(out / "train" / "bct" / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["upgrade"]["pairings"] == ["image->image", "text->image"]
    assert ckpt["datamodule_hyper_parameters"]["train_subset"] == str(out / "split" / "new.json")


def test_a_reid_cnn_gallery_upgraded_to_a_clip_image_encoder(tiny_synthetic, tmp_path, cli_argv):
    out = tmp_path / "study"
    reid = {**_data(tiny_synthetic), **TRAINER}
    study = {"study": {
        "name": "tiny_cnn_to_clip", "out": str(out),
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0},
        "old": {"configs": [str(REPO / "configs/data/synthetic.yaml"), str(REPO / "configs/model/bot_r18.yaml"),
                            str(REPO / "configs/trainer/cpu_demo.yaml")], "overrides": reid},
        # the new dual encoder embeds into the old model's 512-d space (no adapter)
        "new": {"configs": [str(REPO / "configs/data/synthetic_text.yaml"), str(REPO / "configs/model/clip_tiny.yaml"),
                            str(REPO / "configs/trainer/cpu_demo.yaml")],
                "overrides": {**_clip(tiny_synthetic, embed_dim=512),
                              "model.init_args.image_losses": [{"name": "triplet", "margin": 0.3}]}},
        "methods": {"independent": {}, "bct": {"compatible_losses": [{"name": "bct"}]}},
        "evaluation": {"orderings": ["random", "uncertainty", "uncertainty_margin"], "ratios": [0, 0.5, 1.0]},
    }}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["upgrade", "--config", str(config)]) == 0

    # Evaluated as ReID (the old stage's data): image queries with cameras, the same rows for every version.
    feats = {v: FeatureSet.load(out / "features" / f"{v}.pt") for v in ("old", "bct")}
    assert feats["old"].modalities == feats["bct"].modalities == ("image", "image")
    assert feats["old"].items == feats["bct"].items and feats["bct"].camids is not None
    # the CNN's classifier scores the gallery: its logits are kept, so every estimator's ordering can be made
    saved = torch.load(out / "features" / "old.gallery_uncertainty.pt", weights_only=True)
    assert torch.allclose(saved["uncertainty"], old_model_uncertainty(saved["logits"]))
    import json

    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["study"]}
    assert set(rows["bct"]["auc"]) == {"random", "uncertainty", "uncertainty_margin"}
    old_q, old_g = feats["old"].split()
    bct_q, _ = feats["bct"].split()
    assert _cell(out / "report.json", "bct", "old")["mAP"] == pytest.approx(100 * _cross(bct_q, old_g).mAP, abs=1e-4)

    # The new stage trained a CLIPModule on image-caption pairs of the new split, against the old CNN.
    trained = yaml.safe_load((out / "train" / "bct" / "config.yaml").read_text())
    assert trained["model"]["class_path"].endswith("CLIPModule")
    assert trained["data"]["class_path"].endswith("TextImageDataModule")
    assert trained["model"]["init_args"]["upgrade"]["old_checkpoint"].startswith(str(out / "train" / "old"))


def test_caption_queries_need_dual_encoders_before_anything_trains(tiny_synthetic, tmp_path, cli_argv, capsys):
    out = tmp_path / "study"
    study = {"study": {
        "name": "bad", "out": str(out),
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0},
        "old": {"configs": [str(REPO / "configs/data/synthetic_text.yaml"), str(REPO / "configs/model/bot_r18.yaml")],
                "overrides": _data(tiny_synthetic)},
        "new": {"configs": [str(REPO / "configs/data/synthetic_text.yaml"), str(REPO / "configs/model/clip_tiny.yaml")],
                "overrides": _clip(tiny_synthetic)},
        "methods": {"independent": {}},
    }}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["upgrade", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "caption queries" in err and "study.old trains reid_lab.modules.ReIDModule" in err
    assert not (out / "train").exists()


def test_a_clip_gallery_upgraded_to_a_vlm_embedder(tiny_synthetic, tmp_path, cli_argv):
    """The same host and plugins upgrade a VLM2Vec-style embedder: its caption queries search the old CLIP
    model's image gallery (pairings text->image and image->image, BCT)."""
    from reid_lab.data.text.parsers import load_text_dataset
    from reid_lab.data.text.vlm_processor import build_offline_processor

    corpus = [c for r in load_text_dataset("synthetic", tiny_synthetic).train for c in r.captions]
    processor = str(build_offline_processor(tmp_path / "processor", corpus + ["Find the person "], vocab_size=300))
    out = tmp_path / "study"
    vlm = {**_data(tiny_synthetic), **TRAINER, "data.init_args.context_length": 24,
           "data.init_args.tokenizer.init_args.processor_path": processor,
           "model.init_args.processor_path": processor, "model.init_args.context_length": 24,
           "model.init_args.model_cfg.text_config.hidden_size": 32,
           "model.init_args.model_cfg.text_config.intermediate_size": 64,
           "model.init_args.model_cfg.text_config.rope_parameters.mrope_section": [1, 1, 2],
           "model.init_args.model_cfg.vision_config.hidden_size": 32}
    study = {"study": {
        "name": "tiny_clip_to_vlm", "out": str(out),
        "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0},
        "old": {"configs": [str(REPO / "configs/data/synthetic_text.yaml"), str(REPO / "configs/model/clip_tiny.yaml"),
                            str(REPO / "configs/trainer/cpu_demo.yaml")], "overrides": _clip(tiny_synthetic)},
        "new": {"configs": [str(REPO / "configs/data/synthetic_text_vlm.yaml"),
                            str(REPO / "configs/model/vlm_tiny_qwen2.yaml"), str(REPO / "configs/trainer/cpu_demo.yaml")],
                "overrides": vlm},
        "methods": {"bct": {"compatible_losses": [{"name": "bct"}], "pairings": ["text->image", "image->image"]}},
        "evaluation": {"orderings": ["random"], "ratios": [0, 1.0]},
    }}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["upgrade", "--config", str(config)]) == 0
    feats = {v: FeatureSet.load(out / "features" / f"{v}.pt") for v in ("old", "bct")}
    assert feats["bct"].modalities == ("text", "image") and feats["bct"].features.shape[1] == 32
    assert feats["bct"].items == feats["old"].items
    _, old_g = feats["old"].split()
    bct_q, _ = feats["bct"].split()
    cross = _cross(bct_q, old_g)  # VLM caption queries against the CLIP image gallery, no camera filter
    assert _cell(out / "report.json", "bct", "old")["mAP"] == pytest.approx(100 * cross.mAP, abs=1e-4)
    ckpt = read_checkpoint(out / "train" / "bct" / "checkpoints" / "last.ckpt")
    assert ckpt["encoder"]["class_path"] == "reid_lab.models.vlm.VLMEncoder"
    assert ckpt["hyper_parameters"]["upgrade"]["pairings"] == ["text->image", "image->image"]
    assert ckpt["embedding_space"]["parent"] == feats["old"].space["space_id"]
