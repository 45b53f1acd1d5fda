"""``reid-lab export``: a checkpoint's image embedder as ONNX (dynamic batch) or TorchScript, with a parity check.

    reid-lab export --ckpt-path model.ckpt --format onnx --out model.onnx
    reid-lab export --ckpt-path model.ckpt --format torchscript --out model.pt

The exported graph maps normalised images ``(B, 3, H, W)`` (the checkpoint's ``image_size``, ImageNet
statistics: what :func:`reid_lab.load_embedder` feeds the model) to ``(B, D)`` embeddings, with the
checkpoint's ``flip_test`` and L2 normalisation when its space is normalised. Resizing and normalisation are
the caller's: the input contract (:func:`input_contract`) says so inside the file, next to the embedding-space
record: ONNX ``metadata_props["reid_lab.input_contract"]`` / ``["reid_lab.embedding_space"]``, TorchScript
``_extra_files["input_contract.json"]`` / ``["embedding_space.json"]``, so features made by the exported model
stay tied to their space and a deployment can read how to feed it (:func:`read_input_contract`).

After writing, the export is run on a batch of a *different* size than the one traced (so the dynamic batch
axis is exercised): onnxruntime (or the loaded TorchScript module) against the checkpoint in PyTorch; the
maximum absolute difference is printed and must stay under ``--tolerance``.

Image encoders only (ReID CNNs / ViTs, the image tower of a dual encoder). VLM embedders run their image
processor outside the graph and are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.upgrade.old_model import load_embedder

SPACE_KEY = "reid_lab.embedding_space"
CONTRACT_KEY = "reid_lab.input_contract"

# The same words in --help and in every exported file's contract.
CONTRACT_TEXT = ("input `image`: float32 (B, 3, H, W), RGB, H x W the training image_size (resized by the caller), "
                 "pixel values / 255 then ImageNet-normalised per channel ((x - mean) / std, mean "
                 f"{list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}); output `embedding`: float32 (B, D). Inside the "
                 "graph: the encoder, flip averaging when the checkpoint tests with flips, and L2 normalisation when "
                 "its space is normalised; nothing else (no resizing, no normalisation of the input).")


def input_contract(size: tuple[int, int], flip_test: bool, normalize: bool, dim: int) -> dict[str, Any]:
    """What an exported graph expects and returns, as stored inside the file (and printed by ``--help``).

    Args:
        size: ``(height, width)`` the checkpoint was trained at.
        flip_test / normalize: whether the graph averages a flipped view / L2-normalises its output.
        dim: ``D``, the embedding dimension.
    """
    return {
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", 3, int(size[0]), int(size[1])],
                  "layout": "NCHW", "color": "RGB", "scale": "pixel / 255", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD)},
        "output": {"name": "embedding", "dtype": "float32", "shape": ["batch", int(dim)],
                   "l2_normalized": bool(normalize)},
        "in_graph": {"flip_test": bool(flip_test), "l2_normalization": bool(normalize), "resize": False,
                     "input_normalization": False},
        "description": CONTRACT_TEXT,
    }


class ImageEmbeddingGraph(nn.Module):
    """``(B, 3, H, W) -> (B, D)``: the encoder's image embedding, flip TTA, optional L2 normalisation."""

    def __init__(self, encoder: nn.Module, flip_test: bool, normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.flip_test = bool(flip_test)
        self.normalize = bool(normalize)

    def forward(self, image: Tensor) -> Tensor:
        out = self.encoder.encode({"image": image})["image"]
        if self.flip_test:
            out = (out + self.encoder.encode({"image": torch.flip(image, dims=[3])})["image"]) / 2
        out = out.float()
        return torch.nn.functional.normalize(out, dim=1) if self.normalize else out


def export_graph(checkpoint: str | Path) -> tuple[ImageEmbeddingGraph, tuple[int, int], dict[str, Any]]:
    """The exportable graph of a checkpoint, its input size and its embedding-space record."""
    raw = read_checkpoint(checkpoint)
    embedder = load_embedder(checkpoint)
    encoder = embedder.encoder.eval()
    if "image" not in encoder.modalities:
        raise ValueError(f"{checkpoint}: the encoder embeds {list(encoder.modalities)}; export needs images")
    if type(encoder).__name__ == "VLMEncoder":
        raise ValueError(f"{checkpoint}: a VLM embedder runs its image processor outside the graph; export the "
                         "image encoders of ReID or CLIP checkpoints")
    bake_parametrizations(encoder)
    size = (raw.get("datamodule_hyper_parameters") or {}).get("image_size")
    if size is None:
        raise ValueError(f"{checkpoint} records no data image_size: the input size is unknown")
    space = dict(embedder.space)
    normalize = bool(space.get("normalized", (raw.get("embedding") or {}).get("distance") == "cosine"))
    return ImageEmbeddingGraph(encoder, embedder.flip_test, normalize).eval(), (int(size[0]), int(size[1])), space


def bake_parametrizations(module: nn.Module) -> nn.Module:
    """Replace every parametrised weight (``torch.nn.utils.parametrize``, e.g. BT²'s orthogonal maps) by its current
    value, in place: the exported graph holds the matrix, not the map that makes it (ONNX has no matrix
    exponential or linear solve, and a deployed model needs neither)."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module


def _replace(tmp: Path, out: Path) -> None:
    os.replace(tmp, out)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", opset: int = 18) -> dict[str, Any]:
    """Write the export atomically and check it; returns ``{"out", "format", "max_abs_diff", "batch"}``."""
    graph, (h, w), space = export_graph(checkpoint)
    with torch.no_grad():
        dim = int(graph(torch.zeros(1, 3, h, w)).shape[1])
    contract = json.dumps(input_contract((h, w), graph.flip_test, graph.normalize, dim), sort_keys=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    traced_batch, check_batch = torch.randn(2, 3, h, w), torch.randn(5, 3, h, w)
    record = json.dumps(space, sort_keys=True, default=str)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        tmp = Path(tmpdir) / out.name
        if fmt == "onnx":
            import onnx

            torch.onnx.export(graph, (traced_batch,), str(tmp), input_names=["image"], output_names=["embedding"],
                              dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
            model = onnx.load(str(tmp))
            for key, value in ((SPACE_KEY, record), (CONTRACT_KEY, contract)):
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
            model.doc_string = CONTRACT_TEXT  # shown by model viewers (Netron) without parsing the JSON
            onnx.checker.check_model(model)
            onnx.save(model, str(tmp))
            got = _run_onnx(tmp, check_batch)
        elif fmt == "torchscript":
            with torch.no_grad():
                scripted = torch.jit.trace(graph, traced_batch, check_trace=False)
            torch.jit.save(scripted, str(tmp), _extra_files={"embedding_space.json": record,
                                                             "input_contract.json": contract})
            got = torch.jit.load(str(tmp))(check_batch).detach()
        else:
            raise ValueError(f"format must be onnx or torchscript, got {fmt!r}")
        with torch.no_grad():
            expected = graph(check_batch)
        _replace(tmp, out)
    return {"out": str(out), "format": fmt, "batch": len(check_batch),
            "max_abs_diff": float((torch.as_tensor(got) - expected).abs().max())}


def _run_onnx(path: Path, images: Tensor) -> Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["embedding"], {"image": images.numpy()})[0])


def _read_record(path: str | Path, onnx_key: str, torchscript_name: str) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        if onnx_key not in props:
            raise ValueError(f"{path}: no metadata_props[{onnx_key!r}] (not written by reid-lab export?)")
        return json.loads(props[onnx_key])
    files = {torchscript_name: ""}
    torch.jit.load(str(path), _extra_files=files)
    if not files[torchscript_name]:
        raise ValueError(f"{path}: no extra file {torchscript_name!r} (not written by reid-lab export?)")
    return json.loads(files[torchscript_name])


def read_space(path: str | Path) -> dict[str, Any]:
    """The embedding-space record inside an exported file (ONNX or TorchScript)."""
    return _read_record(path, SPACE_KEY, "embedding_space.json")


def read_input_contract(path: str | Path) -> dict[str, Any]:
    """The input contract inside an exported file (ONNX or TorchScript): see :func:`input_contract`."""
    return _read_record(path, CONTRACT_KEY, "input_contract.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-lab export", description=__doc__.splitlines()[0],
                                     epilog=f"Input contract (also stored in the file): {CONTRACT_TEXT}")
    parser.add_argument("--ckpt-path", "--ckpt_path", dest="ckpt_path", required=True,
                        help="a checkpoint written by reid-lab fit (ReID or CLIP image encoder)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="onnx (dynamic batch axis, checked with onnxruntime) or torchscript (default: onnx)")
    parser.add_argument("--out", required=True, help="the file to write (written atomically), e.g. model.onnx")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18; onnx only)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max |exported - torch| allowed on the parity batch (default: 1e-4)")
    args = parser.parse_args(argv)
    try:
        result = export(args.ckpt_path, args.out, args.format, args.opset)
    except (FileNotFoundError, ValueError) as err:
        print(f"reid-lab export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']} ({result['format']}); parity on a batch of {result['batch']}: max |exported - "
          f"torch| = {result['max_abs_diff']:.2e} (tolerance {args.tolerance:g})")
    if result["max_abs_diff"] > args.tolerance:
        print("reid-lab export: the exported model differs from the checkpoint beyond the tolerance", file=sys.stderr)
        return 1
    return 0
