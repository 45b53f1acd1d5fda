"""The fixed d-Simplex head (CoReS, Biondi et al. TPAMI 2023) as a ReID model's own classifier.

Checked against the simplex's defining geometry (unit rows, pairwise cosine -1/(K-1), computed here), a
cross-entropy written by hand against the vertex of each image's *raw* identity, and two real Lightning fits on
different identity subsets (an old version on half the identities, a new one on all): the same identity must
meet the same vertex in both, which is what makes the versions compatible without an old model in the loop.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.datasets import load_dataset
from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.embedding.encoder import build_encoder
from reid_lab.models.heads import BNNeckHead
from reid_lab.models.reid_model import ReIDModel
from reid_lab.modules.reid import ReIDModule
from tests.conftest import save_module_checkpoint


def test_head_logits_are_the_fixed_simplex_and_not_trained():
    torch.manual_seed(0)
    head = BNNeckHead(16, num_classes=9, classifier="simplex").eval()
    pooled = torch.randn(5, 16)
    out = head(pooled)
    w = head.simplex.double()
    # the defining geometry, computed here: unit rows, pairwise cosine -1/(K-1), rows summing to zero
    gram = w @ w.T
    torch.testing.assert_close(gram.diagonal(), torch.ones(9, dtype=torch.float64), atol=1e-6, rtol=0)
    off = gram[~torch.eye(9, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.sum(0), torch.zeros(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["logits"], out["bn_features"] @ head.simplex.T)
    # fixed: no classifier parameter, nothing of it in the state dict (it is a function of K and D)
    assert head.classifier is None
    assert not any("simplex" in k or "classifier" in k for k in head.state_dict())
    assert all(p is not head.simplex for p in head.parameters())


def test_head_refuses_a_simplex_wider_than_the_embedding():
    with pytest.raises(ValueError, match="at least 9 dimensions"):
        BNNeckHead(8, num_classes=10, classifier="simplex")
    with pytest.raises(ValueError, match="classifier must be one of"):
        BNNeckHead(8, num_classes=4, classifier="cosine")


def test_model_default_k_is_d_plus_one_and_the_spec_rebuilds_it():
    model = ReIDModel("resnet18", num_classes=0, classifier="simplex", embedding_dim=32, last_stride=2).eval()
    assert model.num_classes == 33 and model.classifier_weight is None
    rebuilt = build_encoder(model.spec())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(rebuilt.eval()(x)["logits"], model(x)["logits"])
    # a linear head's spec is unchanged by the option (checkpoints of earlier versions keep their spec)
    assert "classifier" not in ReIDModel("resnet18", num_classes=4).spec()["init_args"]


def _fit(root, tmp_path, subset_pids, seed):
    dataset = load_dataset("synthetic", root)
    train_subset = None
    if subset_pids is not None:
        train_subset = tmp_path / f"subset{seed}.json"
        train_subset.write_text(json.dumps({"paths": [r.path for r in dataset.train if r.pid in subset_pids]}))
    dm = ReIDDataModule(dataset="synthetic", root=str(root), image_size=(64, 32), batch_size=4, num_instances=2,
                        eval_batch_size=16, num_workers=0,
                        train_subset=None if train_subset is None else str(train_subset))
    L.seed_everything(seed)
    module = ReIDModule(backbone="resnet18", num_classes=dm.num_classes, last_stride=2, embedding_dim=32,
                        classifier="simplex", losses=[{"name": "ce", "epsilon": 0.0}], warmup_epochs=0, scheduler="none")
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    return module, dm, dataset


def test_two_versions_on_different_subsets_share_each_identitys_vertex(tiny_synthetic, tmp_path):
    dataset = load_dataset("synthetic", tiny_synthetic)
    all_pids = sorted({r.pid for r in dataset.train})
    half = set(all_pids[::2])
    old, old_dm, _ = _fit(tiny_synthetic, tmp_path, half, seed=0)
    new, new_dm, _ = _fit(tiny_synthetic, tmp_path, None, seed=1)

    raw_pid_of_path = {r.path: r.pid for r in dataset.train}
    for module, dm in ((old, old_dm), (new, new_dm)):
        # by hand: the identity of each relabelled class is the raw pid of its images
        expected = {int(r.pid): raw_pid_of_path[r.path] for r in dm.train_records}
        got = {c: int(module.class_identity[c]) for c in range(dm.num_classes)}
        assert got == expected
    assert old.class_identity.numel() == len(half) and new.class_identity.numel() == len(all_pids)
    # the same person meets the same vertex in both versions, whatever its class index
    old_vertex = {int(i): old.encoder.head.simplex[int(i)] for i in old.class_identity}
    for i in new.class_identity.tolist():
        if i in old_vertex:
            torch.testing.assert_close(new.encoder.head.simplex[i], old_vertex[i])

    # the training loss is the cross-entropy against the raw identity's vertex over all K vertices (by hand)
    batch = next(iter(old_dm.train_dataloader()))
    old.train()
    out = old.training_output(batch)
    bn = old.encoder(batch["image"])["bn_features"]
    targets = torch.tensor([int(old.class_identity[p]) for p in batch["pid"]])
    logits = bn @ old.encoder.head.simplex.T
    assert logits.shape[1] == 33  # K = D + 1 vertices, not the 6 training classes
    expected_ce = F.cross_entropy(logits, targets)
    torch.testing.assert_close(out.loss, expected_ce, rtol=1e-5, atol=1e-6)
    # the accuracy / host see this version's classes, in their order
    assert out.logits.shape == (len(batch["pid"]), len(half))
    torch.testing.assert_close(out.logits, logits[:, old.class_identity])


def test_too_few_vertices_for_the_training_identities_is_refused(tiny_synthetic, tmp_path):
    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), batch_size=8,
                        num_instances=2, eval_batch_size=16, num_workers=0)
    module = ReIDModule(backbone="resnet18", num_classes=dm.num_classes, last_stride=2, embedding_dim=32,
                        classifier="simplex", simplex_classes=4, losses=[{"name": "ce"}])
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match="beyond the 4 pre-allocated vertices; set model simplex_classes"):
        trainer.fit(module, datamodule=dm)


def test_checkpoint_keeps_the_identities(tiny_synthetic, tmp_path):
    module, _, _ = _fit(tiny_synthetic, tmp_path, None, seed=2)
    path = save_module_checkpoint(module, tmp_path / "simplex.ckpt")
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.testing.assert_close(state["class_identity"], module.class_identity)
    encoder, _ = load_encoder(path)  # as a study reads an old version
    x = torch.randn(3, 3, 64, 32)
    torch.testing.assert_close(encoder.eval()(x)["logits"], module.encoder.eval()(x)["logits"])


def test_k_without_an_embedding_dim_reduces_the_embedding_to_k_minus_one_as_cores():
    module = ReIDModule(backbone="resnet18", num_classes=6, last_stride=2, classifier="simplex", simplex_classes=10)
    assert module.encoder.embedding_dim == 9 and module.encoder.num_classes == 10
    assert module.encoder.head.simplex.shape == (10, 9)
    # rebuilt from its own hyper-parameters (a checkpoint), the same layout
    again = ReIDModule(**module.hparams)
    assert again.encoder.embedding_dim == 9
    explicit = ReIDModule(backbone="resnet18", num_classes=6, last_stride=2, classifier="simplex", simplex_classes=10,
                          embedding_dim=32)
    assert explicit.encoder.head.simplex.shape == (10, 32)
