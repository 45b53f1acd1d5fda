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
