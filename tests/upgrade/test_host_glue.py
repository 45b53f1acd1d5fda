"""The upgrade host's glue on an extended-class upgrade: which old classifier rows are trained and which are
synthesised, the old-class index, the UniBCT refinement's inputs and the new classifier's way into the old
space. Every expectation is computed here from the identities by hand or from the papers' formulas, never
by the host's own helpers.

The case: the dataset's training split holds identities 10 .. 15 (three images each). φ_old trained on
10, 11, 13, 15 (old labels 0 .. 3, by sorted pid); φ_new trains on all six (new labels 0 .. 5), so the new
classes 0, 1, 3, 5 are old classes 0, 1, 2, 3 and the new classes 2 (pid 12) and 4 (pid 14) are unseen.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from reid_lab.data.records import ImageRecord
from reid_lab.data.views import TrainingSetView
from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.modules.reid import ReIDModule
from tests.conftest import save_module_checkpoint
from tests.losses.compatible.test_prototypes import numpy_refine

PIDS = [10, 11, 12, 13, 14, 15]
OLD_PIDS = [10, 11, 13, 15]
PER_ID = 3
RAW = [ImageRecord(f"p{pid}_{k}.jpg", pid, k) for pid in PIDS for k in range(PER_ID)]
LABELS = torch.tensor([PIDS.index(r.pid) for r in RAW])  # new label = rank of the pid among the six
IMAGES = torch.randn(len(RAW), 3, 64, 32, generator=torch.Generator().manual_seed(5))
# By hand from the pids: new class of each old class (old label j = j-th smallest old pid).
OLD_CLASS_INDEX = [0, 1, 3, 5]  # pid 10 -> new 0, 11 -> 1, 13 -> 3, 15 -> 5
UNSEEN = [2, 4]  # new classes of pids 12 and 14
# UniBCT structural refinement (Zhang et al. IJCAI'22 Eq. 9-10), hyper-parameters of the public code (MixBCT).
UNIBCT_ALPHA, UNIBCT_TAU = 0.9, 0.05


def old_model(tmp_path, embedding_dim: int | None = None):
    """A random φ_old with four classes, its checkpoint recording the training subset of the old pids."""
    subset = tmp_path / "old_train.json"
    subset.write_text(json.dumps({"paths": [r.path for r in RAW if r.pid in OLD_PIDS]}))
    torch.manual_seed(0)
    module = ReIDModule(backbone="resnet18", num_classes=len(OLD_PIDS), last_stride=2, embedding_dim=embedding_dim)
    return save_module_checkpoint(module, tmp_path / "old.ckpt", datamodule_hparams={"train_subset": str(subset)})


def new_module(old_checkpoint, losses, embedding_dim: int | None = None, adapter: str = "linear"):
    torch.manual_seed(1)
    upgrade = {"old_checkpoint": str(old_checkpoint), "compatible_losses": losses, "adapter": adapter}
    return ReIDModule(backbone="resnet18", num_classes=len(PIDS), last_stride=2, embedding_dim=embedding_dim,
                      upgrade=upgrade)


def view() -> TrainingSetView:
    records = [ImageRecord(r.path, int(label), r.camid) for r, label in zip(RAW, LABELS)]

    def batches():
        return [{"image": IMAGES[i:i + 7], "pid": LABELS[i:i + 7]} for i in range(0, len(RAW), 7)]

    return TrainingSetView(records=records, raw_records=list(RAW), batches=batches)


def old_features_and_classifier(old_checkpoint):
    encoder, _ = load_encoder(old_checkpoint)
    encoder.eval()
    return encoder(IMAGES)["embedding"].detach(), encoder.classifier_weight.detach()


def test_extended_class_bct_keeps_trained_old_rows_and_synthesises_only_unseen_ones(tmp_path):
    # BCT §3.2 (Shen et al. CVPR'20; openBCT issue #1): an old class keeps its trained row of W_o; a class the
    # old model never saw gets the mean of its normalised old features, rescaled to W_o's mean row norm.
    checkpoint = old_model(tmp_path)
    module = new_module(checkpoint, [{"name": "bct"}])
    module.host.prepare(view())
    old_features, w_old = old_features_and_classifier(checkpoint)

    got = module.host.state.old_classifier
    assert got.shape == (len(PIDS), w_old.shape[1])
    for old_label, new_label in enumerate(OLD_CLASS_INDEX):
        torch.testing.assert_close(got[new_label], w_old[old_label])  # copied, not re-estimated
    mean_norm = w_old.norm(dim=1).mean()
    for new_label in UNSEEN:
        members = F.normalize(old_features[LABELS == new_label], dim=1)
        mean = members.mean(0)
        torch.testing.assert_close(got[new_label], mean / mean.norm() * mean_norm, rtol=1e-4, atol=1e-5)


def test_old_class_index_maps_each_old_class_to_its_new_column(tmp_path):
    # PCT / LwF read old logit j against new logit column OLD_CLASS_INDEX[j] (same identity).
    module = new_module(old_model(tmp_path), [{"name": "lwf"}])
    module.host.prepare(view())
    assert module.host.state.old_class_index.tolist() == OLD_CLASS_INDEX


def test_unibct_refinement_propagates_old_features_over_the_new_models_graph(tmp_path):
    # Eq. 9-10: the graph comes from φ_new's features, what it propagates are φ_old's features.
    checkpoint = old_model(tmp_path)
    module = new_module(checkpoint, [{"name": "unibct", "warmup_epochs": 0, "refresh_epochs": [0]}])
    module.host.prepare(view())
    assert module.host.on_train_epoch_start(0, module.embedder())
    old_features, _ = old_features_and_classifier(checkpoint)
    new_features = module.encoder.eval()(IMAGES)["embedding"].detach()
    expected = numpy_refine(old_features.double().numpy(), new_features.double().numpy(), LABELS.numpy(),
                            len(PIDS), UNIBCT_ALPHA, UNIBCT_TAU)
    swapped = numpy_refine(new_features.double().numpy(), old_features.double().numpy(), LABELS.numpy(),
                           len(PIDS), UNIBCT_ALPHA, UNIBCT_TAU)
    assert np.abs(expected - swapped).max() > 1e-2  # the case tells the two roles apart
    got = module.host.state.prototypes.double()
    torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


def test_a_wider_new_classifier_reaches_the_old_space_through_the_learned_adapter(tmp_path):
    # d_new = 48 > d_old = 32 with a learned (not identity-initialised) projection P (32, 48): LCE aligns
    # normalise(W_n P^T) with the old class centres (Meng et al. ICCV'21), so truncating W_n is wrong.
    checkpoint = old_model(tmp_path, embedding_dim=32)
    module = new_module(checkpoint, [{"name": "lce"}], embedding_dim=48)
    with torch.no_grad():
        module.host.adapter.proj.weight.copy_(torch.randn(32, 48, generator=torch.Generator().manual_seed(2)))
    module.host.prepare(view())
    old_features, _ = old_features_and_classifier(checkpoint)
    centres = torch.stack([F.normalize(F.normalize(old_features[LABELS == c], dim=1).mean(0), dim=0)
                           for c in range(len(PIDS))])
    w_new = module.encoder.classifier_weight
    projection = module.host.adapter.proj.weight.detach()

    _, parts = module.host({"image": IMAGES}, {"image": module.encoder(IMAGES)["embedding"]}, LABELS, 0,
                           new_classifier=w_new)
    expected = F.mse_loss(F.normalize(w_new.detach() @ projection.T, dim=1), centres)
    truncated = F.mse_loss(F.normalize(w_new.detach()[:, :32], dim=1), centres)
    assert abs(float(expected) - float(truncated)) > 1e-4  # the case tells the two paths apart
    torch.testing.assert_close(parts["image2image/lce/align"], expected, rtol=1e-4, atol=1e-6)
