"""Shared fixtures: offline environment, a tiny synthetic dataset, one torch thread."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors run faster on one thread, and CI has two cores shared with the test process."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A 12-identity, 3-camera synthetic Market-1501 tree at 64x32 (generated once per test session)."""
    from reid_lab.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_synthetic(
        root, num_ids=12, num_cameras=3, seed=0, image_size=(64, 32), images_per_id=(6, 8),
        num_distractors=4, num_junk=2,
    )
    return root


@pytest.fixture
def cli_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and a pytest ``sys.argv`` are present: give it a clean argv."""
    monkeypatch.setattr(sys, "argv", ["reid-lab"])


def save_module_checkpoint(module, path, datamodule_hparams: dict | None = None):
    """Write ``module`` as Lightning does (state dict, hyper-parameters, then the module's own hook)."""
    import torch

    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    if datamodule_hparams is not None:
        checkpoint["datamodule_hyper_parameters"] = datamodule_hparams
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def old_checkpoint(tmp_path):
    """A ResNet-18 ReIDModule checkpoint (4 classes, random weights) written as Lightning writes it."""
    import torch

    from reid_lab.modules.reid import ReIDModule

    torch.manual_seed(0)
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2, space_label="old")
    return save_module_checkpoint(module, tmp_path / "old.ckpt")
