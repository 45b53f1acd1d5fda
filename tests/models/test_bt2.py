"""BT² (Zhou et al. 2023, arXiv 2211.03989): the basis transformation and its compatible objective.

References written here from the official code (YifeiZhou02/BT-2): ``ResNet_ortho.forward`` in
``models/resnet.py`` for the embedding, ``TransferTrainer.train`` in ``trainers/transfer_trainer.py`` for the
loss, and its evaluation's truncation to the smaller dimension for the cross-test. A real Lightning fit checks the
wiring: the independent model φ_n*'s features, the branch ``f`` and the truncated ``e`` reach the loss.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.losses.compatible import build_compatible_loss
from reid_lab.losses.compatible.base import CompatibleInputs
from reid_lab.models.basis_transform import BasisTransform
from reid_lab.models.reid_model import ReIDModel
from reid_lab.modules.reid import ReIDModule
from reid_lab.upgrade.old_model import load_embedder
from tests.conftest import save_module_checkpoint


def official_forward(t: BasisTransform, feature: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``ResNet_ortho.forward`` after the backbone, with the branch layout of :class:`BasisTransform`."""
    old_feature = t.extra(F.relu(pooled))
    feature = F.normalize(feature)  # norm_feature: True in every official config
    new_feature = torch.cat([F.normalize(old_feature[:, : t.add_dim]), (t.scale * feature) @ t.rotate_new.weight.T],
                            dim=1)
    bct_feature = new_feature[:, : t.old_dim] @ t.rotate_old.weight.T
    to_add = new_feature[:, -(t.branch_dim + t.add_dim - t.old_dim):]
    return torch.cat([bct_feature, to_add], dim=1)


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_basis_transform_is_the_official_forward_with_orthogonal_maps(orthogonal_map):
    torch.manual_seed(0)
    t = BasisTransform(in_features=12, branch_dim=8, old_dim=6, add_dim=4, scale=2.0, orthogonal_map=orthogonal_map)
    f, pooled = torch.randn(5, 8), torch.randn(5, 12)
    out = t(f, pooled)
    assert out.shape == (5, 12) and t.out_dim == 12
    torch.testing.assert_close(out, official_forward(t, f, pooled))
    for rotation in (t.rotate_new.weight, t.rotate_old.weight):
        eye = torch.eye(rotation.shape[0])
        torch.testing.assert_close(rotation @ rotation.T, eye, atol=1e-5, rtol=0)
    # orthogonal maps preserve the norm: |extra|² + C²|f̂|² = 1 + C² for every image
    torch.testing.assert_close(out.norm(dim=1), torch.full((5,), math.sqrt(5.0)))
    # after a gradient step the maps are still orthogonal (the parametrisation, not a penalty)
    opt = torch.optim.SGD(t.parameters(), lr=0.5)
    out[:, :6].sum().backward()
    opt.step()
    w = t.rotate_old.weight
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)


def test_basis_transform_refuses_too_few_dimensions():
    with pytest.raises(ValueError, match="raise add_dim to at least 4"):
        BasisTransform(in_features=12, branch_dim=8, old_dim=12, add_dim=2)
    with pytest.raises(ValueError, match="orthogonal_map must be one of"):
        BasisTransform(in_features=12, branch_dim=8, old_dim=6, orthogonal_map="qr")


def official_loss(e, f, phi_old, phi_new, pseudo_classifier, target, lambda_1=1.0, lambda_2=10.0, lambda_3=5.0):
    """``TransferTrainer.train``'s compatible terms (the model's own CE on f left out: the module adds it)."""
    old_feature, feature = F.normalize(e, dim=1), F.normalize(f, dim=1)
    phi_old, phi_p = F.normalize(phi_old, dim=1), F.normalize(phi_new, dim=1)  # build_feature_dict normalises
    loss = lambda_3 * (1 - torch.mean(torch.sum(phi_old * old_feature, dim=1)))
    loss = loss + lambda_1 * (1 - torch.mean(torch.sum(phi_p * feature, dim=1)))
    return loss + lambda_2 * F.cross_entropy(old_feature @ pseudo_classifier.transpose(0, 1), target)


def test_bt2_loss_is_the_official_objective():
    gen = torch.Generator().manual_seed(3)
    e = torch.randn(6, 5, generator=gen, requires_grad=True)
    f = torch.randn(6, 7, generator=gen, requires_grad=True)
    old, ref = torch.randn(6, 5, generator=gen), torch.randn(6, 7, generator=gen)
    means = F.normalize(torch.randn(3, 5, generator=gen), dim=1) * 0.7
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    inputs = CompatibleInputs(e, old, labels, extras={"new_branch": f, "reference_features": ref, "old_means": means})
    out = build_compatible_loss("bt2")(inputs)
    torch.testing.assert_close(out.loss, official_loss(e, f, old, ref, means, labels))
    weighted = build_compatible_loss("bt2", lambda_new=2.0, lambda_influence=0.5, lambda_old=0.0)(inputs)
    torch.testing.assert_close(weighted.loss, official_loss(e, f, old, ref, means, labels, 2.0, 0.5, 0.0))
    # gradients reach both branches of the new model
    out.loss.backward()
    assert e.grad.abs().sum() > 0 and f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="φ_n\\* must embed in the branch's dimension"):
        build_compatible_loss("bt2")(CompatibleInputs(e, old, labels, extras={
            "new_branch": f, "reference_features": ref[:, :4], "old_means": means}))


def _module(num_classes, **kwargs):
    return ReIDModule(backbone="resnet18", num_classes=num_classes, last_stride=2, warmup_epochs=0,
                      scheduler="none", losses=[{"name": "ce"}, {"name": "triplet"}], **kwargs)


def test_a_real_fit_feeds_bt2_the_reference_branch_and_truncated_coordinates(tiny_synthetic, tmp_path):
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), batch_size=8,
                        num_instances=2, eval_batch_size=16, num_workers=0)
    dm.setup("fit")
    torch.manual_seed(0)
    old_ckpt = save_module_checkpoint(_module(dm.num_classes, embedding_dim=16), tmp_path / "old.ckpt")
    torch.manual_seed(1)
    ref_ckpt = save_module_checkpoint(_module(dm.num_classes, embedding_dim=24), tmp_path / "independent.ckpt")

    upgrade = {"old_checkpoint": str(old_ckpt), "compatible_losses": [{"name": "bt2"}], "adapter": "truncate",
               "reference_checkpoint": str(ref_ckpt)}
    torch.manual_seed(2)
    module = _module(dm.num_classes, embedding_dim=24, upgrade=upgrade,
                     basis_transform={"old_dim": 16, "add_dim": 4, "orthogonal_map": "cayley"})
    assert module.encoder.embedding_dim == 28 and module.encoder.feature_dim == 24
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)

    # one training batch through the module, and the same terms from the three models by hand
    batch = next(iter(dm.train_dataloader()))
    module.train()
    out = module.training_output(batch)
    compat, parts = module.host(batch, out.embeddings, out.labels, epoch=0, new_branches=out.branches)
    images = batch["image"]
    with torch.no_grad():
        ref = load_encoder(ref_ckpt)[0].eval()(images)["embedding"]
        old = load_encoder(old_ckpt)[0].eval()(images)["embedding"]
    new = module.encoder(images)
    # P_o: class means of the normalised old features over the whole training set (every class)
    old_train = load_embedder(old_ckpt)
    means = torch.zeros(dm.num_classes, 16)
    view = dm.training_set_view()
    feats = torch.cat([old_train({"image": b["image"]})["image"] for b in view.batches()])
    labels = torch.tensor([r.pid for r in view.records])
    means.index_add_(0, labels, F.normalize(feats, dim=1))
    means /= torch.bincount(labels, minlength=dm.num_classes).unsqueeze(1)
    expected = official_loss(new["embedding"][:, :16], new["branch"], old, ref, means, batch["pid"])
    torch.testing.assert_close(compat, expected, rtol=1e-4, atol=1e-5)
    assert set(parts) >= {"image2image/bt2/new_cos", "image2image/bt2/influence_ce", "image2image/bt2/old_cos"}

    # the checkpoint's cross-test embedder truncates to the old model's 16 coordinates
    ckpt = save_module_checkpoint(module, tmp_path / "bt2.ckpt")
    module.eval()
    with torch.no_grad():
        full = module.encoder(images)["embedding"]
        into_old = load_embedder(ckpt, into_old_space=True)({"image": images})["image"]
        own = load_embedder(ckpt)({"image": images})["image"]
    torch.testing.assert_close(into_old, full[:, :16])
    torch.testing.assert_close(own, full)


def test_bt2_settings_are_checked_naming_the_key(tiny_synthetic, tmp_path):
    torch.manual_seed(0)
    old_ckpt = save_module_checkpoint(_module(6, embedding_dim=16), tmp_path / "old.ckpt")
    ref_ckpt = save_module_checkpoint(_module(6, embedding_dim=24), tmp_path / "ref.ckpt")
    basis = {"old_dim": 16, "add_dim": 4, "orthogonal_map": "cayley"}
    bt2 = {"old_checkpoint": str(old_ckpt), "compatible_losses": [{"name": "bt2"}], "adapter": "truncate",
           "reference_checkpoint": str(ref_ckpt)}
    with pytest.raises(ValueError, match="set upgrade.adapter: truncate"):
        _module(6, embedding_dim=24, basis_transform=basis, upgrade={**bt2, "adapter": "linear"})
    with pytest.raises(ValueError, match="old_dim is 12, but the old model"):
        _module(6, embedding_dim=24, basis_transform={**basis, "old_dim": 12}, upgrade=bt2)
    no_ref = {k: v for k, v in bt2.items() if k != "reference_checkpoint"}
    with pytest.raises(ValueError, match="upgrade.reference_checkpoint is required"):
        _module(6, embedding_dim=24, basis_transform=basis, upgrade=no_ref)
    with pytest.raises(ValueError, match="no compatible loss reads reference features"):
        _module(6, embedding_dim=24, upgrade={**bt2, "compatible_losses": [{"name": "bct"}], "adapter": "linear"})
    with pytest.raises(ValueError, match="old_dim required"):
        ReIDModel("resnet18", num_classes=6, basis_transform={"add_dim": 4})
    with pytest.raises(ValueError, match="do not combine"):
        ReIDModel("resnet18", num_classes=0, classifier="simplex", basis_transform=basis)
    # a plugin that trains the branch on a model without one says what to add
    module = _module(6, embedding_dim=16, upgrade={**bt2, "adapter": "truncate"})
    batch = {"image": torch.randn(4, 3, 64, 32), "pid": torch.tensor([0, 0, 1, 1])}
    out = module.training_output(batch)
    with pytest.raises(ValueError, match="give the model a basis_transform"):
        module.host(batch, out.embeddings, out.labels, epoch=0, new_branches=out.branches)
