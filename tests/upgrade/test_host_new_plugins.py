"""The upgrade host with the AdvBCT and d-Simplex plugins: the class-level state they declare (computed from
φ_old's features by the official formulas, identities by hand), their parameters in the new module, and one
real training step that moves AdvBCT's discriminator and elastic scalars."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.losses.compatible.advbct import grl_coefficient
from reid_lab.modules.reid import ReIDModule
from tests.losses.compatible.test_advbct import official_class_meta
from tests.upgrade.test_host_glue import (
    IMAGES,
    LABELS,
    PIDS,
    new_module,
    old_features_and_classifier,
    old_model,
    view,
)


def test_advbct_state_is_the_official_class_meta_of_the_old_features(tmp_path):
    old_checkpoint = old_model(tmp_path)
    module = new_module(old_checkpoint, [{"name": "advbct"}])
    module.host.prepare(view())
    state = module.host.state
    old, _ = old_features_and_classifier(old_checkpoint)
    meta = official_class_meta(old.double().numpy(), LABELS.numpy())
    for k in range(len(PIDS)):
        np.testing.assert_allclose(state.old_means[k].numpy(), meta[k]["center"], rtol=1e-4, atol=1e-5)
        # three images a class: no IQR filtering, the radius is the largest distance
        assert state.old_radii[k].item() == pytest.approx(meta[k]["radius"][-1], rel=1e-4)
    assert state.old_seen.tolist() == [True, True, False, True, False, True]  # pids 12 and 14: new identities

    plugin = module.host.plugins[0]  # bound by the host: d_old = 512, C_new = 6
    assert plugin.discriminator[0].in_features == 512 and plugin.elastic.shape == (len(PIDS),)
    own = {id(p) for p in module.parameters()}
    assert all(id(p) in own for p in plugin.parameters())  # trained by the new model's optimiser
    assert "host.plugins.0.elastic" in module.state_dict()  # and saved with it

    total, parts = module.host({"image": IMAGES}, {"image": module.encoder(IMAGES)["embedding"]}, LABELS, 0,
                               progress=0.5, max_epochs=4)
    assert torch.isfinite(total)
    assert parts["image2image/advbct/adv_weight"].item() == (4 - 0 + 1) / 4


def test_simplex_state_holds_each_new_class_identity(tmp_path):
    old_checkpoint = old_model(tmp_path)
    module = new_module(old_checkpoint, [{"name": "simplex", "num_classes": 16}])
    module.host.prepare(view())
    assert module.host.state.class_identity.tolist() == PIDS  # the raw pids 10..15, not the labels 0..5
    assert module.host.state.prototypes is None and module.host.state.old_means is None  # nothing else asked
    total, parts = module.host({"image": IMAGES}, {"image": module.encoder(IMAGES)["embedding"]}, LABELS, 0)
    assert torch.isfinite(total) and "image2image/simplex/ce" in parts


def test_training_steps_update_the_discriminator_and_the_elastic_scalars(tiny_synthetic, tmp_path, old_checkpoint):
    L.seed_everything(0)
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), batch_size=8,
                        num_instances=2, eval_batch_size=64, num_workers=0)
    module = ReIDModule(backbone="resnet18", num_classes=dm.num_classes, optimizer="adam", lr=1e-3,
                        scheduler="none", warmup_epochs=0,
                        upgrade={"old_checkpoint": str(old_checkpoint),
                                 "compatible_losses": [{"name": "advbct", "classes": "all"}]})
    plugin = module.host.plugins[0]
    before = {name: p.detach().clone() for name, p in plugin.named_parameters()}
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    for name, p in plugin.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} was not trained"
    # the trainer's plan reached the plugin: E = 1 at epoch 0 gives (1 - 0 + 1) / 1, and the last of the two
    # planned steps ran at progress p = 1/2 (global_step / estimated_stepping_batches)
    metrics = trainer.callback_metrics
    assert metrics["train/image2image/advbct/adv_weight"].item() == 2.0
    assert metrics["train/image2image/advbct/grl_alpha"].item() == pytest.approx(grl_coefficient(0.5), rel=1e-6)
