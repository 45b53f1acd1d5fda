"""`reid-lab export`: ONNX (run by onnxruntime) and TorchScript files that embed as the checkpoint does, with the
space record inside."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import reid_lab
from reid_lab.cli import main
from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.modules.export import read_space
from reid_lab.modules.reid import ReIDModule
from tests.conftest import save_module_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=1, flip_test=True, space_label="export")
    return save_module_checkpoint(module, tmp_path / "model.ckpt", datamodule_hparams={"image_size": [64, 32]})


@pytest.mark.parametrize("fmt, suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_export_embeds_like_the_checkpoint(checkpoint, tmp_path, capsys, fmt, suffix):
    out = tmp_path / f"model.{suffix}"
    assert main(["export", "--ckpt_path", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    diff = float(re.search(r"max \|exported - torch\| = ([\d.e+-]+)", capsys.readouterr().out).group(1))
    assert diff < 1e-4
    assert read_space(out) == read_checkpoint(checkpoint)["embedding_space"]
    torch.manual_seed(3)
    pixels = torch.rand(7, 3, 64, 32)  # a batch size the export was not traced with
    expected = reid_lab.load_embedder(checkpoint)(pixels)  # flip TTA and normalisation included
    torch.testing.assert_close(_run_exported(out, fmt, pixels), expected, atol=1e-4, rtol=1e-3)


def _run_exported(out, fmt: str, pixels: torch.Tensor) -> torch.Tensor:
    """Embeddings of ``pixels`` (in [0, 1]) by the exported file, fed ImageNet-normalised images."""
    images = ((pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"image": images.numpy().astype(np.float32)})[0])
    return torch.jit.load(str(out))(images)


def test_a_checkpoint_without_an_input_size_is_refused(tmp_path, capsys):
    module = ReIDModule(backbone="resnet18", num_classes=4)
    bare = save_module_checkpoint(module, tmp_path / "bare.ckpt")
    assert main(["export", "--ckpt_path", str(bare), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "records no data image_size" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("fmt, suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_the_file_states_its_input_contract_and_following_it_embeds_like_the_checkpoint(checkpoint, tmp_path,
                                                                                         fmt, suffix):
    """The contract read back from the file (not the test's own constants) says how to feed the graph: feeding
    it that way reproduces load_embedder on raw pixels (before: no contract in the file, only a docstring)."""
    import onnxruntime

    from reid_lab.modules.export import read_input_contract

    out = tmp_path / f"model.{suffix}"
    assert main(["export", "--ckpt-path", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    contract = read_input_contract(out)
    assert contract["input"]["shape"] == ["batch", 3, 64, 32]  # the checkpoint's image_size
    assert contract["input"]["color"] == "RGB" and contract["in_graph"]["input_normalization"] is False
    torch.manual_seed(4)
    pixels = torch.rand(3, 3, 64, 32)
    expected = reid_lab.load_embedder(checkpoint)(pixels)
    mean = torch.tensor(contract["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(contract["input"]["std"]).view(1, 3, 1, 1)
    images = ((pixels - mean) / std).float()
    if fmt == "onnx":
        import onnx

        assert "ImageNet-normalised" in onnx.load(str(out)).doc_string
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    else:
        got = torch.jit.load(str(out))(images)
    assert contract["output"]["shape"][1] == got.shape[1]
    assert contract["output"]["l2_normalized"] == contract["in_graph"]["l2_normalization"]
    if contract["output"]["l2_normalized"]:
        torch.testing.assert_close(got.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_export_help_states_the_input_contract_and_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "ImageNet-normalised" in text and "L2 normalisation" in text and "training image_size" in text
    for option in ("--ckpt-path", "--format", "--out", "--opset", "--tolerance"):
        assert option in text


@pytest.mark.parametrize("fmt, suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_a_bt2_model_exports_its_orthogonal_maps_as_matrices(tmp_path, capsys, fmt, suffix):
    """BT²'s parametrised weights (a Cayley map solves a linear system per forward; ONNX has no solve) are exported
    as their values; the file embeds as the checkpoint does, 16 old-compatible + 8 added dimensions."""
    torch.manual_seed(0)
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2, embedding_dim=20,
                        basis_transform={"old_dim": 16, "add_dim": 4, "orthogonal_map": "cayley"})
    ckpt = save_module_checkpoint(module, tmp_path / "bt2.ckpt", datamodule_hparams={"image_size": [64, 32]})
    out = tmp_path / f"bt2.{suffix}"
    assert main(["export", "--ckpt_path", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    diff = float(re.search(r"max \|exported - torch\| = ([\d.e+-]+)", capsys.readouterr().out).group(1))
    assert diff < 1e-4
    pixels = torch.rand(3, 3, 64, 32)
    expected = reid_lab.load_embedder(ckpt)(pixels)
    assert expected.shape == (3, 24)
    torch.testing.assert_close(_run_exported(out, fmt, pixels), expected, atol=1e-4, rtol=1e-3)
