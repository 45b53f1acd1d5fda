"""Processors of Qwen2-VL-family embedders, offline: build a small one from captions, load one from a folder.

A VLM embedder (:class:`~reid_lab.models.vlm.VLMEncoder`) reads its inputs through a ``transformers``
processor: a tokenizer with the Qwen chat and vision special tokens, and an image processor that resizes an
image to a multiple of ``patch_size x merge_size`` and cuts it into patches. Real Qwen2-VL processors live in
a model's folder; none ships inside a package. For tiny models trained from random init (tests, CPU
experiments), :func:`build_offline_processor` trains a byte-level BPE vocabulary of a few hundred tokens on
the captions at hand (milliseconds) and writes a complete ``Qwen2VLProcessor`` folder that
``AutoProcessor.from_pretrained(folder)`` reads back.

:func:`processor_digest` names a processor folder by the content of its files, so a checkpoint can tell when
the folder it was trained with has changed (another vocabulary would silently feed the model wrong tokens).

Two prompt formats (:data:`PROMPT_FORMATS`, :func:`item_prompt`):

* ``reid_lab`` (the default): text inputs use :data:`TEXT_TEMPLATE` and image inputs :data:`IMAGE_TEMPLATE`
  (``<|vision_start|><|image_pad|><|vision_end|>`` before the instruction); ``<|im_end|>`` closes every input
  and the embedding is read there.
* ``vlm2vec``: VLM2Vec's own Qwen2-VL inputs (TIGER-AI-Lab/VLM2Vec, ``src/model/processor.py``
  ``Qwen2_VL_process_fn`` and the MMEB rows' ``<|image_1|>`` placeholder rewritten to ``VLM_IMAGE_TOKENS[QWEN2_VL]``):
  a bare ``<|image_pad|>`` (no vision start / end tokens) then a newline before the text of an image item, no
  chat template and no end token (the Qwen2 tokenizer adds none), so the embedding is read at the text's last
  token; a text longer than the context is cut at its end (``truncation=True, max_length=max_len``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN = "<|endoftext|>"
END_TOKEN = "<|im_end|>"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"  # expanded by the processor to the image's tokens
IMAGE_TEMPLATE = IMAGE_BLOCK + "{instruction}" + END_TOKEN
TEXT_TEMPLATE = "{instruction}{text}"  # END_TOKEN is appended after truncation, so it is never cut off
VLM2VEC_IMAGE_TOKEN = "<|image_pad|>"  # VLM2Vec's VLM_IMAGE_TOKENS[QWEN2_VL]; the processor expands it
VLM2VEC_IMAGE_SEPARATOR = "\n"  # MMEB's rows read "<|image_1|>\n<text>"; the placeholder becomes the token above
PROMPT_FORMATS = ("reid_lab", "vlm2vec")

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "special_tokens_map.json", "chat_template.jinja")


def item_prompt(prompt_format: str, instruction: str, text: str | None, has_image: bool) -> str:
    """The prompt string of one item (instruction + optional text, optional image) in ``prompt_format``.

    ``reid_lab``: ``[<|vision_start|><|image_pad|><|vision_end|>]{instruction}{text}<|im_end|>``.
    ``vlm2vec``: ``[<|image_pad|>\\n]{instruction}{text}``, an MMEB row's text with its placeholder rewritten
    as VLM2Vec does for Qwen2-VL (the instruction carries its own trailing separator, e.g. ``"...: "``).

    >>> item_prompt("vlm2vec", "", "Represent the given image for classification", True)
    '<|image_pad|>\\nRepresent the given image for classification'
    >>> item_prompt("reid_lab", "Find the person described: ", "a man", False)
    'Find the person described: a man<|im_end|>'
    """
    body = f"{instruction}{text or ''}"
    if prompt_format == "reid_lab":
        return f"{IMAGE_BLOCK if has_image else ''}{body}{END_TOKEN}"
    if prompt_format == "vlm2vec":
        return f"{VLM2VEC_IMAGE_TOKEN + VLM2VEC_IMAGE_SEPARATOR if has_image else ''}{body}"
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def build_offline_processor(
    out: str | Path,
    texts: Iterable[str],
    vocab_size: int = 512,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    patch_size: int = 14,
    merge_size: int = 2,
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and write a ``Qwen2VLProcessor`` folder at ``out``.

    Args:
        out: the folder to write (replaced atomically if it exists).
        texts: the corpus (captions and instructions); every byte is in the vocabulary whatever the corpus.
        vocab_size: BPE vocabulary size, special tokens included.
        min_pixels / max_pixels: the image processor's pixel budget (Qwen2-VL's ``min_pixels`` / ``max_pixels``;
            an image is resized to a multiple of ``patch_size * merge_size`` inside it).
        patch_size / merge_size: the vision tower's patch and the merge of ``merge_size²`` patches into one token.

    Returns:
        The folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    corpus = [str(t) for t in texts]
    if not corpus:
        raise ValueError("build_offline_processor needs a non-empty corpus of texts")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_TOKEN, pad_token=PAD_TOKEN,
                                   padding_side="left")
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                            merge_size=merge_size)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=merge_size)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=fast, video_processor=video_processor)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # written beside ``out`` and renamed into place: never a half-written processor under its name
        processor.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained`` on a local folder (never the hub), with a clear error.

    Raises:
        ValueError: the folder does not exist or holds no image-text processor.
    """
    from transformers import AutoProcessor

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"VLM processor folder {folder} does not exist (make one with `reid-lab vlm-processor` or "
                         "point processor_path at a model folder that has one)")
    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load a transformers processor from {folder}: {err}") from err
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ValueError(f"{folder} holds a {type(processor).__name__}, not an image-text processor")
    return processor


def processor_digest(path: str | Path) -> str:
    """A 16-hex digest of the processor files in ``path`` (tokenizer and image-processor configs)."""
    folder = Path(path)
    h = hashlib.sha256()
    for name in sorted(PROCESSOR_FILES):
        file = folder / name
        if file.is_file():
            data = file.read_bytes()
            if name.endswith(".json"):  # canonical JSON: key order and whitespace do not change the digest
                data = json.dumps(json.loads(data), sort_keys=True).encode()
            h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    """``reid-lab vlm-processor``: write a small Qwen2-VL processor trained on a caption dataset's training captions."""
    import argparse

    from reid_lab.data.text.parsers import load_text_dataset

    parser = argparse.ArgumentParser(prog="reid-lab vlm-processor", description=main.__doc__)
    parser.add_argument("--out", required=True, help="processor folder to write")
    parser.add_argument("--dataset", default="synthetic", help="caption dataset whose training captions form the corpus")
    parser.add_argument("--root", required=True, help="the dataset folder")
    parser.add_argument("--instructions", nargs="*", default=[
        "Find the person described: ", "Represent the given person image: "],
        help="instruction prefixes to include in the corpus")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="size of the BPE vocabulary learnt on the captions (default: 512)")
    parser.add_argument("--min-pixels", type=int, default=56 * 56,
                        help="smallest image area the image processor resizes to, in pixels (default: 56 * 56)")
    parser.add_argument("--max-pixels", type=int, default=112 * 112,
                        help="largest image area the image processor resizes to, in pixels (default: 112 * 112)")
    args = parser.parse_args(argv)
    splits = load_text_dataset(args.dataset, args.root)
    corpus = [c for record in splits.train for c in record.captions] + list(args.instructions)
    out = build_offline_processor(args.out, corpus, vocab_size=args.vocab_size, min_pixels=args.min_pixels,
                                  max_pixels=args.max_pixels)
    print(f"wrote {out} (digest {processor_digest(out)}; {len(corpus)} texts, vocabulary {args.vocab_size})")
    return 0
