"""Encoder specs and checkpoints: any checkpoint rebuilds its encoder, legacy ones included."""

from __future__ import annotations

import pytest
import torch

from reid_lab.embedding.checkpoint import load_encoder
from reid_lab.embedding.encoder import Encoder, build_encoder
from reid_lab.models.reid_model import ReIDModel
from reid_lab.modules.reid import ReIDModule
from tests.conftest import save_module_checkpoint


def test_spec_rebuilds_the_same_architecture_and_drops_init_only_weights(tmp_path):
    weights = tmp_path / "backbone.pt"
    source = ReIDModel("resnet18", num_classes=3, last_stride=2, embedding_dim=64)
    torch.save(source.backbone.state_dict(), weights)
    model = ReIDModel("resnet18", num_classes=3, last_stride=2, embedding_dim=64, weights=str(weights))
    spec = model.spec()
    assert spec["class_path"] == "reid_lab.models.reid_model.ReIDModel"
    assert spec["init_args"]["weights"] is None  # the checkpoint holds every weight: no file needed to rebuild
    rebuilt = build_encoder(spec)
    assert isinstance(rebuilt, ReIDModel) and rebuilt.embedding_dim == 64 and rebuilt.num_classes == 3
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_build_encoder_errors_name_the_class():
    with pytest.raises(ValueError, match="cannot be imported"):
        build_encoder({"class_path": "reid_lab.models.NoSuchModel", "init_args": {}})
    with pytest.raises(ValueError, match="not a reid_lab Encoder"):
        build_encoder({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 2}})
    with pytest.raises(ValueError, match="class_path"):
        build_encoder({"init_args": {}})


def test_checkpoint_rebuilds_the_encoder_with_its_weights(old_checkpoint):
    encoder, checkpoint = load_encoder(old_checkpoint)
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2)
    module.load_state_dict(checkpoint["state_dict"])
    images = torch.randn(3, 3, 64, 32)
    encoder.eval(), module.eval()
    torch.testing.assert_close(encoder.encode({"image": images})["image"], module.model(images)["embedding"])
    assert checkpoint["encoder"]["state_prefix"] == "encoder."


def test_a_checkpoint_from_before_the_encoder_contract_still_loads(tmp_path):
    """ReIDModule checkpoints used to keep the encoder under ``model.`` with no ``encoder`` entry."""
    torch.manual_seed(1)
    model = ReIDModel("resnet18", num_classes=4, last_stride=2)
    legacy = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"backbone": "resnet18", "num_classes": 4, "last_stride": 2, "pooling": "avg",
                             "embedding_dim": None, "neck_feat": "after", "space_id": "demo/old",
                             "flip_test": False, "distance": "cosine"},
        "embedding_space": {"space_id": "demo/old", "dim": 512, "claims": []},
    }
    torch.save(legacy, tmp_path / "legacy.ckpt")
    encoder, _ = load_encoder(tmp_path / "legacy.ckpt")
    images = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(encoder.eval().encode({"image": images})["image"], model.eval()(images)["embedding"])
    # The module reads it too: weights are moved under encoder., the stale space record (not a hash of these
    # weights) is re-derived rather than trusted.
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2)
    checkpoint = torch.load(tmp_path / "legacy.ckpt", weights_only=False)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    assert module.embedding_space()["space_id"] != "demo/old"


def test_foreign_and_missing_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_encoder(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="records no encoder"):
        load_encoder(tmp_path / "other.ckpt")


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path):
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2)
    path = save_module_checkpoint(module, tmp_path / "m.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["encoder"]["init_args"]["embedding_dim"] = 128  # spec no longer matches the weights
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder(path)


def test_every_encoder_subclass_records_its_arguments():
    class Bare(Encoder):
        pass

    with pytest.raises(RuntimeError, match="record_init_args"):
        Bare().spec()


class _Payload:
    """Stands for arbitrary pickled code in a foreign file."""


def test_a_checkpoint_that_would_run_code_is_refused_by_name(tmp_path):
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2)
    path = save_module_checkpoint(module, tmp_path / "m.ckpt")
    checkpoint = torch.load(path, weights_only=True)  # what reid_lab writes loads as plain data
    checkpoint["extra"] = _Payload()
    torch.save(checkpoint, tmp_path / "code.ckpt")
    with pytest.raises(ValueError, match=r"code.ckpt cannot be read as a reid_lab checkpoint .*weights_only=True"):
        load_encoder(tmp_path / "code.ckpt")
