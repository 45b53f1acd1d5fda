"""CLIP weight files: reading open_clip's and OpenAI's layouts, and fitting them to a model's input sizes.

Used by :class:`~reid_lab.models.clip.CLIPEncoder` (a whole dual encoder from ``weights``) and by the CLIP
image-tower backbone (:class:`~reid_lab.models.backbones.CLIPViTBackbone`, its ``visual.*`` part).

Weight files read here (never downloaded, never running code from the file):

* open_clip's layout: a state dict saved by ``torch.save`` (``.pt`` / ``.bin`` / ``.pth``) or safetensors
  (``open_clip_model.safetensors``), plain or as an open_clip training checkpoint ``{"state_dict": ...}`` whose
  keys may start with ``module.``.
* OpenAI's published layout (``ViT-B-16.pt``): a TorchScript archive. Its tensors are read from the archive's
  pickle by an unpickler that only builds tensors and plain attribute records; the archive's TorchScript code
  is neither compiled nor run (``torch.jit.load``, which open_clip's ``load_openai_model`` uses, would).
  The key names equal open_clip's ``CLIP`` (open_clip's ``build_model_from_openai_state_dict`` loads them
  unchanged) plus the scalar records ``input_resolution``, ``context_length`` and ``vocab_size`` (dropped);
  most weights are float16 (cast to the model's dtype on load). OpenAI's models use QuickGELU: build them with
  a ``-quickgelu`` config (``ViT-B-16-quickgelu``) or ``quick_gelu: true``, as open_clip does for them.

A weights file for another input size is adapted as open_clip's ``load_checkpoint`` does: the image
positional embedding is resized to the model's patch grid (:func:`interpolate_pos_embed`, bicubic; CLIP-ReID
resizes ViT-B/16's 14x14 grid to 16x8 for 256x128 inputs), the text one to the context length.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OPENAI_METADATA_KEYS",
    "interpolate_pos_embed",
    "load_clip_state_dict",
    "read_clip_state_dict",
    "visual_prefix",
]

# scalar records in OpenAI's archives that are not parameters (open_clip drops them too)
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """What a TorchScript module becomes when its archive is read as data: its attributes, nothing else."""

    def __init__(self, *args: Any) -> None:
        self.attributes: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = dict(state) if isinstance(state, Mapping) else {}


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive: TorchScript classes become attribute records, storages are
    read from the archive's ``data/`` entries; any other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.path = archive, root, path

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise ValueError(f"weights file {str(self.path)!r}: the TorchScript archive names {module}.{name}, which "
                         "is not a tensor or a module record; reid_lab reads archives as data only")

    def persistent_load(self, pid: Any) -> Any:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise ValueError(f"weights file {str(self.path)!r}: unexpected storage record {pid!r}")
        dtype = _STORAGE_DTYPES[storage_type]
        raw = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if flat.numel() != numel:
            raise ValueError(f"weights file {str(self.path)!r}: storage {key} holds {flat.numel()} values, "
                             f"its record says {numel}")
        return torch.storage.TypedStorage(wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True)


def _archive_tensors(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    for name, value in obj.attributes.items():
        if isinstance(value, Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _archive_tensors(value, f"{prefix}{name}.", out)


def _read_torchscript_archive(path: Path) -> dict[str, Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name (buffers, parameters and
    tensor attributes such as OpenAI's ``attn_mask``)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"weights file {str(path)!r} is a zip archive without a TorchScript data.pkl")
        root = pickles[0].split("/")[0]
        module = _ArchiveUnpickler(archive.read(pickles[0]), archive, root, path).load()
    if not isinstance(module, _ScriptObject):
        raise ValueError(f"weights file {str(path)!r}: the TorchScript archive does not hold a module")
    tensors: dict[str, Tensor] = {}
    _archive_tensors(module, "", tensors)
    # a traced open_clip model keeps its causal text mask (a non-persistent buffer: a constant, not a weight)
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] != "attn_mask"}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_clip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a CLIP weights file in open_clip's or OpenAI's layout (see the module docstring).

    A ``{"state_dict": ...}`` checkpoint is unwrapped and a ``module.`` prefix (DDP) stripped; OpenAI's scalar
    records (:data:`OPENAI_METADATA_KEYS`) are dropped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tensors, or needs unpickling arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif _is_torchscript(path):
        state = _read_torchscript_archive(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"weights file {str(path)!r} is not plain tensors (it would unpickle arbitrary "
                             f"objects: {str(err).splitlines()[0]}); save its state dict with torch.save") from err
        except (RuntimeError, OSError, EOFError) as err:
            raise ValueError(f"weights file {str(path)!r} is not a readable torch.save file: {err}") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"weights file {str(path)!r} holds {type(state).__name__}, expected a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"weights file {str(path)!r} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    for key in OPENAI_METADATA_KEYS:
        tensors.pop(key, None)
    return tensors


def interpolate_pos_embed(pos_embed: Tensor, grid_size: Sequence[int], old_grid_size: Sequence[int] | None = None,
                          extra_tokens: int = 1, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """A ViT positional embedding resized to another patch grid.

    Args:
        pos_embed: ``(extra_tokens + h * w, width)``: the class token's embedding first, then the grid row by row.
        grid_size: the new grid ``(H, W)`` (e.g. ``(16, 8)`` for 256x128 inputs with 16-pixel patches).
        old_grid_size: ``(h, w)`` of ``pos_embed``; ``None``: square.
        extra_tokens: leading tokens kept as they are (the class token).
        mode / antialias: ``F.interpolate``'s; open_clip's ``resize_pos_embed`` uses bicubic with antialias.

    Returns:
        ``(extra_tokens + H * W, width)``, the grid part resampled with corners not aligned.
    """
    tokens, grid = pos_embed[:extra_tokens], pos_embed[extra_tokens:]
    if old_grid_size is None:
        side = math.isqrt(grid.shape[0])
        if side * side != grid.shape[0]:
            raise ValueError(f"a positional embedding of {grid.shape[0]} grid tokens is not square; give "
                             "old_grid_size")
        old_grid_size = (side, side)
    old_h, old_w = (int(s) for s in old_grid_size)
    new_h, new_w = (int(s) for s in grid_size)
    if old_h * old_w != grid.shape[0]:
        raise ValueError(f"old_grid_size {(old_h, old_w)} does not match {grid.shape[0]} grid tokens")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    image = grid.reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
    kwargs = {"align_corners": False, "antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    image = F.interpolate(image.float(), size=(new_h, new_w), mode=mode, **kwargs).to(pos_embed.dtype)
    return torch.cat([tokens, image.permute(0, 2, 3, 1).reshape(new_h * new_w, -1)], dim=0)


def _resize_pos_embeds(state: dict[str, Tensor], target: Mapping[str, Tensor], visual: nn.Module | None,
                       prefix: str) -> None:
    image_key = f"{prefix}visual.positional_embedding"
    grid = getattr(visual, "grid_size", None)
    if image_key in state and image_key in target and state[image_key].shape != target[image_key].shape and grid:
        state[image_key] = interpolate_pos_embed(state[image_key], grid)
    text_key = f"{prefix}positional_embedding"
    if text_key in state and text_key in target and state[text_key].shape != target[text_key].shape:
        old = state[text_key]
        if old.shape[1] == target[text_key].shape[1]:  # open_clip's resize_text_pos_embed: linear along tokens
            resized = F.interpolate(old.T.unsqueeze(0).float(), size=target[text_key].shape[0], mode="linear",
                                    align_corners=False)
            state[text_key] = resized[0].T.to(old.dtype)


def load_clip_state_dict(module: nn.Module, state: Mapping[str, Tensor], source: str | Path, *,
                         prefix: str = "", visual: nn.Module | None = None) -> None:
    """Load CLIP weights into ``module`` strictly, adapting positional embeddings to its sizes.

    Args:
        module: the module to load (an open_clip ``CLIP`` with ``prefix=""``, or a module holding the tower as
            ``visual``).
        state: tensors from :func:`read_clip_state_dict` (keys as in ``module.state_dict()``).
        source: the file, named in errors.
        prefix: prefix of the CLIP keys inside ``module``'s state dict.
        visual: the image tower (its ``grid_size`` is the target patch grid); default ``module.visual``.

    Raises:
        ValueError: keys missing from the file, keys the model does not have, or shapes that still differ
            after resizing, each listed with the file's name.
    """
    target = module.state_dict()
    # OpenAI's float16 weights take the model's dtype first, so resizing happens at the model's precision
    state = {prefix + k: v.to(target[prefix + k].dtype) if prefix + k in target and v.is_floating_point() else v
             for k, v in state.items()}
    visual = visual if visual is not None else getattr(module, "visual", None)
    _resize_pos_embeds(state, target, visual, prefix)
    scale = f"{prefix}logit_scale"
    if scale in state and scale in target and state[scale].ndim != target[scale].ndim:
        state[scale] = state[scale].reshape(target[scale].shape)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(target[k].shape)}"
                    for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"shape mismatches {shapes[:3]}" if shapes else ""]
        raise ValueError(f"weights file {str(source)!r} does not fit the model ({type(module).__name__}): "
                         f"{'; '.join(p for p in parts if p)}. Use the architecture the file was trained with "
                         "(model_name / model_cfg; OpenAI's ViT-B/16 is ViT-B-16-quickgelu)")
    module.load_state_dict(state, strict=True)


def visual_prefix(keys: Sequence[str]) -> str | None:
    """The prefix before ``visual.`` in a CLIP checkpoint's keys (``""``, ``"module."``, ``"encoder.model."``),
    or ``None`` when no key is an image tower's."""
    for key in keys:
        for anchor in ("visual.conv1.weight", "visual.positional_embedding"):
            if key.endswith(anchor):
                return key[: len(key) - len(anchor)]
    return None
