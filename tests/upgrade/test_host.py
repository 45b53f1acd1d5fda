"""The upgrade host without the Trainer: frozen old encoder, plugin sums, pairings, class state, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reid_lab.data.records import ImageRecord
from reid_lab.data.views import TrainingSetView
from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.modules.reid import ReIDModule
from reid_lab.upgrade.old_model import load_embedder
from tests.conftest import save_module_checkpoint

IMAGES = torch.randn(12, 3, 64, 32, generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 1, 2] * 4)  # three classes of four images (refinement needs three or more per class)


def new_module(old_checkpoint, losses, **kwargs):
    torch.manual_seed(1)
    upgrade = {"old_checkpoint": str(old_checkpoint), "compatible_losses": losses, **kwargs.pop("upgrade", {})}
    return ReIDModule(backbone="resnet18", num_classes=3, last_stride=2, upgrade=upgrade, **kwargs)


def view() -> TrainingSetView:
    records = [ImageRecord(f"img{i}.jpg", int(p), 0) for i, p in enumerate(LABELS)]

    def batches():
        return [{"image": IMAGES[i:i + 5], "pid": LABELS[i:i + 5]} for i in range(0, 12, 5)]

    return TrainingSetView(records=records, raw_records=[], batches=batches)


def naive_old_features(old_checkpoint, images):
    encoder, _ = load_encoder(old_checkpoint)
    return encoder.eval()(images)["embedding"].detach()


def test_the_old_model_stays_out_of_the_new_module(old_checkpoint):
    module = new_module(old_checkpoint, [{"name": "l2"}])
    old_params = {id(p) for p in module.host.old.encoder.parameters()}
    assert not any(k.startswith("host.old") for k in module.state_dict())  # not in the new checkpoint
    assert not old_params & {id(p) for p in module.parameters()}  # nor in the optimiser / DDP tree
    assert all(not p.requires_grad for p in module.host.old.encoder.parameters())


def test_the_old_model_stays_in_eval_mode_while_the_new_one_trains(old_checkpoint):
    module = new_module(old_checkpoint, [{"name": "l2"}]).train()
    bn = module.host.old.encoder.head.bottleneck
    before = bn.running_mean.clone()
    module.host.old.encoder.train()  # even when someone switches it on purpose
    out = module.encoder(IMAGES)
    module.host(dict(image=IMAGES), {"image": out["embedding"]}, LABELS, epoch=0)
    assert not module.host.old.encoder.training
    torch.testing.assert_close(bn.running_mean, before)  # BatchNorm statistics never drift


def test_l2_loss_is_the_naive_formula_on_independently_computed_old_features(old_checkpoint):
    module = new_module(old_checkpoint, [{"name": "l2", "weight": 0.5}]).train()
    out = module.encoder(IMAGES)
    total, parts = module.host({"image": IMAGES}, {"image": out["embedding"]}, LABELS, epoch=0)
    old = naive_old_features(old_checkpoint, IMAGES)
    expected = 0.5 * (F.normalize(out["embedding"], dim=1) - F.normalize(old, dim=1)).pow(2).sum(1).mean()
    torch.testing.assert_close(total, expected)
    assert "image2image/l2/loss" in parts and "image2image/n2o_cos" in parts
    total.backward()
    assert module.encoder.backbone.conv1.weight.grad is not None


def test_pairings_are_checked_against_both_encoders(old_checkpoint):
    with pytest.raises(ValueError, match=r"pairing text->image: the new encoder embeds \['image'\]"):
        new_module(old_checkpoint, [{"name": "l2"}], upgrade={"pairings": ["text->image"]})
    with pytest.raises(ValueError, match="'<new modality>-><old modality>'"):
        new_module(old_checkpoint, [{"name": "l2"}], upgrade={"pairings": ["image"]})
    with pytest.raises(ValueError, match="unknown compatible loss 'bcd'"):
        new_module(old_checkpoint, [{"name": "bcd"}])


def test_class_state_follows_the_plugins_needs(old_checkpoint):
    module = new_module(old_checkpoint, [{"name": "lce"}, {"name": "lwf"}])
    module.host.prepare(view())
    old = naive_old_features(old_checkpoint, IMAGES)
    means = torch.stack([F.normalize(old[LABELS == c], dim=1).mean(0) for c in range(3)])  # LCE's centres
    torch.testing.assert_close(module.host.state.prototypes, F.normalize(means, dim=1), rtol=1e-4, atol=1e-5)
    assert module.host.state.boundaries.shape == (3,)
    old_encoder, _ = load_encoder(old_checkpoint)
    torch.testing.assert_close(module.host.state.old_class_weight, old_encoder.classifier_weight.detach())
    assert module.host.state.old_classifier is None  # no plugin asked for BCT's synthesised classifier
    total, parts = module.host({"image": IMAGES}, {"image": module.encoder(IMAGES)["embedding"]}, LABELS, 0,
                               new_classifier=module.encoder.classifier_weight)
    assert torch.isfinite(total) and "image2image/lwf/loss" in parts


def test_refined_prototypes_survive_a_resume(old_checkpoint, tmp_path):
    spec = [{"name": "unibct", "warmup_epochs": 0, "refresh_epochs": [0]}]
    module = new_module(old_checkpoint, spec)
    module.host.prepare(view())
    unrefined = module.host.state.prototypes.clone()
    assert module.host.on_train_epoch_start(0, module.embedder())
    refined = module.host.state.prototypes.clone()
    assert not torch.allclose(refined, unrefined)
    path = save_module_checkpoint(module, tmp_path / "last.ckpt")

    resumed = new_module(old_checkpoint, spec)
    resumed.on_load_checkpoint(torch.load(path, weights_only=False))
    resumed.host.prepare(view())
    torch.testing.assert_close(resumed.host.state.prototypes, refined)
    assert not resumed.host.on_train_epoch_start(0, resumed.embedder())  # epoch 0 was refined already


def test_a_dimension_change_embeds_new_queries_through_the_saved_adapter(old_checkpoint, tmp_path):
    module = new_module(old_checkpoint, [{"name": "l2"}], embedding_dim=64, upgrade={"adapter": "linear"})
    with torch.no_grad():
        module.host.adapter.proj.weight.normal_()
    path = save_module_checkpoint(module.eval(), tmp_path / "new.ckpt")
    into_old = load_embedder(path, into_old_space=True)({"image": IMAGES})["image"]
    own = module.encoder(IMAGES)["embedding"].detach()
    assert into_old.shape == (12, 512)
    torch.testing.assert_close(into_old, own @ module.host.adapter.proj.weight.detach().T)
    with pytest.raises(ValueError, match="no adapter into an old space"):
        load_embedder(old_checkpoint, into_old_space=True)


def test_a_trained_model_loads_for_test_and_predict_without_its_old_model(old_checkpoint, tmp_path):
    trained = new_module(old_checkpoint, [{"name": "l2"}], embedding_dim=64).eval()
    path = save_module_checkpoint(trained, tmp_path / "new.ckpt")
    moved = tmp_path / "moved" / "old.ckpt"
    moved.parent.mkdir()
    old_checkpoint.rename(moved)  # the old model's file is gone from where the config says

    reloaded = new_module(old_checkpoint, [{"name": "l2"}], embedding_dim=64).eval()  # same config
    assert reloaded.host is None
    checkpoint = torch.load(path, weights_only=True)
    reloaded.on_load_checkpoint(checkpoint)
    reloaded.load_state_dict(checkpoint["state_dict"])  # strict: the adapter's weights were dropped, not lost
    torch.testing.assert_close(reloaded.embedder()({"image": IMAGES})["image"],
                               trained.embedder()({"image": IMAGES})["image"])
    with pytest.raises(FileNotFoundError, match=r"old_checkpoint .*old.ckpt does not exist"):
        reloaded.setup("fit")


def test_a_misspelled_upgrade_key_is_named(old_checkpoint):
    with pytest.raises(ValueError, match=r"upgrade has unknown key\(s\) \['compatible_loss'\]"):
        ReIDModule(backbone="resnet18", num_classes=3,
                   upgrade={"old_checkpoint": str(old_checkpoint), "compatible_loss": [{"name": "bct"}]})
