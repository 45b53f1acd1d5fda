"""CLIPModule without the Trainer: losses, temperature clamp, checkpoints, a CLIP -> CLIP upgrade."""

from __future__ import annotations

import pytest
import torch
import yaml

from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.losses.image_text import CLIPLoss
from reid_lab.modules.clip import MAX_LOGIT_SCALE, CLIPModule
from tests.conftest import save_module_checkpoint

TINY = yaml.safe_load(open("configs/model/clip_tiny.yaml"))["model"]["init_args"]["model_cfg"]
CAPTIONS = ["a man in a red coat and blue jeans", "a woman with a white bag", "a man in a red jacket",
            "a child in a green shirt"]


def module(**kwargs) -> CLIPModule:
    torch.manual_seed(0)
    return CLIPModule(model_cfg=TINY, **kwargs)


def batch(m: CLIPModule) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(4, 3, 128, 64, generator=g), "text": m.encoder.tokenizer()(CAPTIONS),
            "pid": torch.tensor([0, 1, 0, 2])}


def test_training_loss_is_the_configured_weighted_sum():
    m = module(losses=[{"name": "clip", "weight": 0.5}, {"name": "sdm", "weight": 2.0}],
               image_losses=[{"name": "triplet", "margin": 0.3}], num_classes=3)
    b = batch(m)
    out = m.training_output(b)
    image, text = m.encoder.encode_image(b["image"]), m.encoder.encode_text(b["text"])
    expected = 0.5 * CLIPLoss()(image, text, b["pid"], m.encoder.logit_scale) + 2.0 * float(out.parts["sdm"]) \
        + float(out.parts["image/triplet"])
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    assert set(out.embeddings) == {"image", "text"}
    out.loss.backward()
    assert m.encoder.logit_scale.grad is not None  # the temperature learns


def test_temperature_is_clamped_after_each_step():
    m = module()
    with torch.no_grad():
        m.encoder.logit_scale.fill_(10.0)
    m.on_train_batch_end(None, None, 0)
    assert float(m.encoder.logit_scale) == pytest.approx(MAX_LOGIT_SCALE)


def test_checkpoint_rebuilds_both_towers(tmp_path):
    m = module().eval()
    path = save_module_checkpoint(m, tmp_path / "clip.ckpt")
    encoder, checkpoint = load_encoder(path)
    b = batch(m)
    for modality in ("image", "text"):
        torch.testing.assert_close(encoder.eval().encode(b)[modality], m.encoder.encode(b)[modality])
    assert checkpoint["embedding_space"]["modalities"] == ["image", "text"]


def test_clip_to_clip_upgrade_with_new_text_searching_old_images(tmp_path):
    old = save_module_checkpoint(module(), tmp_path / "old.ckpt")
    new = module(upgrade={"old_checkpoint": str(old), "compatible_losses": [{"name": "l2"}],
                          "pairings": ["image->image", "text->image"]})
    b = batch(new)
    out = new.training_output(b)
    total, parts = new.host(b, out.embeddings, b["pid"], 0)
    assert {"image2image/l2/loss", "text2image/l2/loss"} <= set(parts)
    old_encoder, _ = load_encoder(old)
    old_image = torch.nn.functional.normalize(old_encoder.eval().encode_image(b["image"]).detach(), dim=1)
    expected = sum((torch.nn.functional.normalize(out.embeddings[m], dim=1) - old_image).pow(2).sum(1).mean()
                   for m in ("image", "text"))
    torch.testing.assert_close(total, expected)
    # with the default pairings a CLIP upgrade keeps both modalities in place
    plain = module(upgrade={"old_checkpoint": str(old), "compatible_losses": [{"name": "l2"}]})
    assert plain.host.pairings == [("image", "image"), ("text", "text")]


def test_lit_tower_is_locked_and_stays_in_eval_mode():
    m = CLIPModule(model_cfg={"embed_dim": 32, "vision_cfg": TINY["vision_cfg"]}, text_tower="minilm_l6",
                   lock_text=True)
    m.train()
    tower = m.encoder.model.text.transformer
    assert not tower.training and all(not p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in m.encoder.model.text.proj.parameters())
    ids = m.encoder.tokenizer()(CAPTIONS[:2])
    torch.testing.assert_close(m.encoder.encode_text(ids), m.encoder.encode_text(ids))  # no dropout noise


def test_an_imagenet_backbone_can_be_the_image_tower():
    from reid_lab.models.backbones import build_backbone

    m = CLIPModule(model_cfg=TINY, image_backbone="mobilenet_v2", image_pretrained="imagenet")
    tower = m.encoder.model.visual
    reference = build_backbone("mobilenet_v2", pretrained="imagenet").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in tower.backbone.state_dict().items())
    assert m.encoder.encode({"image": torch.randn(2, 3, 128, 64)})["image"].shape == (2, TINY["embed_dim"])
    assert m.encoder.spec()["init_args"]["image_pretrained"] is None  # a checkpoint holds the weights


# ------------------------------------------------------------------ caption-data evaluation: i2t, t2t, zero-shot
def naive_retrieval(queries, q_pids, gallery, g_pids, remove_self=False):
    """R1 / R5 / mAP / mINP (percent) by sorting every query's row, one query at a time; cosine distance, ties by
    gallery index; with ``remove_self`` query i and gallery i are one item and it is dropped from its own row."""
    q = torch.nn.functional.normalize(queries, dim=1)
    g = torch.nn.functional.normalize(gallery, dim=1)
    r1 = r5 = ap_sum = inp_sum = valid = 0
    for i in range(len(q)):
        dist = (1 - q[i] @ g.T).tolist()
        order = sorted(range(len(g)), key=lambda j: (dist[j], j))
        if remove_self:
            order = [j for j in order if j != i]
        hits = [int(g_pids[j]) == int(q_pids[i]) for j in order]
        if not any(hits):
            continue
        valid += 1
        first = hits.index(True)
        r1 += first < 1
        r5 += first < 5
        found, precisions = 0, []
        for rank, hit in enumerate(hits):
            if hit:
                found += 1
                precisions.append(found / (rank + 1))
        ap_sum += sum(precisions) / len(precisions)
        last = max(k for k, hit in enumerate(hits) if hit)
        inp_sum += sum(hits) / (last + 1)
    return {"R1": 100 * r1 / valid, "R5": 100 * r5 / valid, "mAP": 100 * ap_sum / valid, "mINP": 100 * inp_sum / valid}


@pytest.mark.parametrize("protocol", ["image_to_text", "text_to_text"])
def test_caption_gallery_protocols_equal_a_naive_loop(protocol):
    from reid_lab.metrics.reid_metric import RetrievalMetric

    g = torch.Generator().manual_seed(4)
    images, image_pids = torch.randn(10, 8, generator=g), torch.tensor([1, 1, 2, 2, 3, 3, 4, 4, 5, 6])
    captions = torch.randn(17, 8, generator=g)
    caption_pids = torch.tensor([1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 6, 6, 7, 2, 1])
    metric = RetrievalMetric(protocol=protocol)
    if protocol == "image_to_text":
        metric.update(captions[:9], caption_pids[:9], False)
        metric.update(images, image_pids, True)
        metric.update(captions[9:], caption_pids[9:], torch.zeros(8, dtype=torch.bool))
        expected = naive_retrieval(images, image_pids, captions, caption_pids)
        assert metric.tag == "i2t"
    else:
        metric.update(captions[:6], caption_pids[:6])
        metric.update(captions[6:], caption_pids[6:])
        expected = naive_retrieval(captions, caption_pids, captions, caption_pids, remove_self=True)
        assert metric.tag == "t2t"
    got = {k: float(v) for k, v in metric.compute().items() if k in expected}
    assert got == pytest.approx(expected, abs=1e-4)
    if protocol == "text_to_text":  # pids 5 and 7 have one caption each: nothing left to find but themselves
        assert "15 of 17 queries have a match" in metric.describe() and "itself removed" in metric.describe()


def test_test_on_caption_data_reports_i2t_t2t_and_zero_shot(tiny_synthetic, capsys):
    import lightning as L

    from reid_lab.data.text_datamodule import TextImageDataModule
    from tests.metrics.test_zero_shot import naive_zero_shot

    m = module().eval()
    dm = TextImageDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(128, 64), batch_size=8,
                             num_instances=2, eval_batch_size=16, num_workers=0,
                             context_length=TINY["text_cfg"]["context_length"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(m, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    texts, text_pids, images, image_pids = [], [], [], []
    with torch.no_grad():
        for b in dm.test_dataloader():
            if "text" in b:
                texts.append(m.encoder.encode_text(b["text"])), text_pids.append(b["pid"])
            else:
                images.append(m.encoder.encode_image(b["image"])), image_pids.append(b["pid"])
    texts, text_pids, images, image_pids = (torch.cat(x) for x in (texts, text_pids, images, image_pids))
    i2t = naive_retrieval(images, image_pids, texts, text_pids)
    t2t = naive_retrieval(texts, text_pids, texts, text_pids, remove_self=True)
    zero = naive_zero_shot(texts.tolist(), text_pids.tolist(), images.tolist(), image_pids.tolist())
    for key, value in i2t.items():
        assert logged[f"test/i2t/{key}"] == pytest.approx(value, abs=1e-3), key
    for key, value in t2t.items():
        assert logged[f"test/t2t/{key}"] == pytest.approx(value, abs=1e-3), key
    assert logged["test/zeroshot/top1"] == pytest.approx(zero["top1"], abs=1e-3)
    assert logged["test/zeroshot/top5"] == pytest.approx(zero["top5"], abs=1e-3)
    assert "test/t2i/R1" in logged
    out = capsys.readouterr().out
    classes = len(set(text_pids.tolist()))
    assert f"test/zeroshot: top1 {zero['top1']:.2f}" in out and f"chance top1 {100 / classes:.2f}" in out
    assert "test/i2t: R1" in out and "image queries vs caption gallery" in out
    assert "test/t2t: R1" in out and "the query itself removed" in out


@pytest.mark.slow
def test_irra_experiment_config_trains_through_the_cli(tiny_synthetic, tmp_path, cli_argv, capsys):
    """configs/experiments/synthetic_irra.yaml: SDM + MLM + ID over every caption, fit and validated."""
    from pathlib import Path

    from reid_lab.lightning_cli import run_lightning_cli

    repo = Path(__file__).resolve().parents[2]
    fit = run_lightning_cli([
        "fit", "--config", str(repo / "configs/experiments/synthetic_irra.yaml"),
        f"--data.init_args.root={tiny_synthetic}", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=32", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=2", "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}",
    ])
    fit.trainer.logger.experiment.finish()
    metrics = fit.trainer.callback_metrics
    assert {"train/sdm", "train/mlm", "train/id", "val/t2i/R1"} <= set(metrics)
    assert fit.datamodule.captions_per_image == "all" and fit.model.mlm is not None
    assert "0.0 % of" in capsys.readouterr().out  # the context length keeps every synthetic caption whole
