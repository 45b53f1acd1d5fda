"""``VLMEncoder``: a ``transformers`` vision-language model (Qwen2-VL family) as an embedding encoder, VLM2Vec-style.

VLM2Vec (Jiang et al., ICLR'25, "VLM2Vec: Training Vision-Language Models for Massive Multimodal Embedding
Tasks") turns a generative VLM into an embedder: the input is an instruction plus a text and / or an image,
the embedding is the last layer's hidden state at the final token (last-token pooling; the batch is
left-padded so the final position is that token), L2-normalised, trained with InfoNCE.

Inputs follow the encoder contract, so a VLM embedder trains and evaluates on the same data modules as the
ReID and CLIP models and can be the new (or the old) model of an upgrade:

* ``batch["image"]`` ``(B, 3, H, W)``: images normalised with ``input_mean`` / ``input_std`` (the data modules'
  ImageNet statistics). They are un-normalised to ``[0, 1]`` and given to the model's own image processor
  (resize to a multiple of ``patch_size * merge_size`` inside its pixel budget, the model's normalisation),
  inside :data:`~reid_lab.data.text.vlm_processor.IMAGE_TEMPLATE` with ``instructions["image"]``.
* ``batch["text"]`` ``(B, L)``: token ids from :class:`~reid_lab.data.text.VLMTextTokenizer` (instruction +
  caption + ``<|im_end|>``, left-padded). The attention mask is rebuilt from the left padding.

Outputs: ``{"image": (B, D), "text": (B, D)}`` with ``D`` the language model's hidden size, not normalised
(``prompt_format: reid_lab``) or L2-normalised (``vlm2vec``).

``prompt_format`` (:data:`~reid_lab.data.text.vlm_processor.PROMPT_FORMATS`) chooses how inputs are laid out:

* ``reid_lab``: ``[<|vision_start|><|image_pad|><|vision_end|>] instruction text <|im_end|>``, pooled at
  ``<|im_end|>``, embeddings returned as they are.
* ``vlm2vec``: VLM2Vec's own encode path (TIGER-AI-Lab/VLM2Vec ``MMEBModel.encode_input`` with
  ``Qwen2_VL_process_fn``), so that a released VLM2Vec checkpoint gives its own embeddings:
  ``[<|image_pad|>\\n] instruction text`` with no chat template and no end token, the last layer's hidden
  state (after the final norm) at the last real token, L2-normalised (``--pooling last --normalize True``).
  Caption ids of :class:`VLMTextTokenizer` end in ``<|im_end|>``: that id is dropped here, which leaves exactly
  VLM2Vec's ids of ``instruction + caption`` truncated to ``context_length - 1`` tokens (``max_len``).
  Not reproduced: VLM2Vec's upscaling of images under 28 pixels a side to 56 x 56 with PIL before the
  processor (here the processor's own ``min_pixels`` resize applies).

The model comes from a local folder (``model_path``: ``config.json`` + ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` shards with their ``model.safetensors.index.json``, never the hub) or from a
config (``model_cfg``: ``model_type`` plus its sub-configs; random init, e.g. a tiny Qwen2-VL for tests). The
vocabulary size and the vision token ids are filled in from the processor when a config leaves them out. The
spec of a built encoder records the whole resolved config, so a checkpoint rebuilds without the model folder.

A released adapter (``adapter_path``: a peft folder, ``adapter_config.json`` + ``adapter_model.safetensors``, e.g.
VLM2Vec's LoRA / DoRA releases on their Qwen2-VL base in ``model_path``) is loaded and merged into the weights,
as VLM2Vec's ``MMEBModel.load(..., is_trainable=False)`` does; the checkpoint then holds the merged weights.

LoRA / DoRA (peft): ``lora: {r, alpha, dropout, target_modules, use_dora, init}`` wraps the model; only adapter
weights train. ``init: gaussian`` draws LoRA A from a Gaussian (peft's ``init_lora_weights="gaussian"``);
VLM2Vec trains with ``use_dora: true, init: gaussian`` (r 16, alpha 64, dropout 0.1 by default). :meth:`VLMEncoder.merge_lora` folds them into the base weights; :meth:`save_adapter` writes the
peft adapter folder. ``gradient_checkpointing`` recomputes activations in the backward pass (non-reentrant).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.data.options import typed_options
from reid_lab.data.text.tokenizers import VLMTextTokenizer
from reid_lab.data.text.vlm_processor import (
    END_TOKEN,
    PAD_TOKEN,
    PROMPT_FORMATS,
    item_prompt,
    load_processor,
    processor_digest,
)
from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.encoder import Encoder

DEFAULT_INSTRUCTIONS = {"image": "Represent the given person image: ", "text": "Find the person described: "}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POOLINGS = ("last", "mean")
LORA_INITS = ("default", "gaussian")


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, L, D), (B, L) -> (B, D)``: the hidden state of each row's last attended position (left or right
    padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, L, D), (B, L) -> (B, D)``: the mean over attended positions."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def left_padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """``(B, L)`` int64 mask: 0 on the leading pad ids of each row, 1 from its first real token on."""
    return (ids != pad_id).long().cummax(dim=1).values


class VLMEncoder(Encoder):
    """A Qwen2-VL-family model with last-token (or mean) pooling behind the encoder contract.

    Args:
        model_path: a local folder with the model (``AutoModelForImageTextToText.from_pretrained``, offline).
        model_cfg: a config instead (``{"model_type": "qwen2_vl", "text_config": {...}, "vision_config": {...}}``,
            as in a model's ``config.json``); random init. Exactly one of the two.
        adapter_path: a local peft adapter folder to load onto the model and merge (a VLM2Vec release).
        processor_path: the processor folder (default: ``model_path``).
        processor_digest: the processor's digest recorded at training time (filled in automatically; a rebuild
            from a checkpoint refuses a processor folder whose files changed).
        pooling: ``last`` (VLM2Vec) or ``mean``.
        instructions: ``{"image": ..., "text": ...}`` task instructions; the text one must equal the data
            tokenizer's (checked by the module).
        context_length: ids per caption of :meth:`tokenizer`.
        prompt_format: ``reid_lab`` or ``vlm2vec`` (VLM2Vec's inputs, pooling token and normalisation).
        lora: peft LoRA options ``{r, alpha, dropout, target_modules, use_dora, init}`` (``init``: ``default`` or
            ``gaussian``); None: full fine-tuning.
        gradient_checkpointing: recompute the language model's activations in backward.
        input_mean / input_std: the normalisation of ``batch["image"]`` to undo before the image processor.
    """

    modalities = ("image", "text")
    init_only_args = ("model_path", "adapter_path")

    def __init__(
        self,
        model_path: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        processor_path: str | None = None,
        processor_digest: str | None = None,
        pooling: str = "last",
        instructions: dict[str, str] | None = None,
        context_length: int = 48,
        lora: dict[str, Any] | None = None,
        prompt_format: str = "reid_lab",
        adapter_path: str | None = None,
        gradient_checkpointing: bool = False,
        input_mean: tuple[float, float, float] = IMAGENET_MEAN,
        input_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForImageTextToText

        if (model_path is None) == (model_cfg is None):
            raise ValueError("give exactly one of model_path (a local model folder) or model_cfg (a config)")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if prompt_format == "vlm2vec" and pooling != "last":
            raise ValueError(f"prompt_format vlm2vec pools the last token (VLM2Vec's --pooling last), got pooling "
                             f"{pooling!r}")
        folder = _model_folder(model_path) if model_path is not None else None  # before the processor found in it
        processor_path = processor_path or model_path
        if processor_path is None:
            raise ValueError("processor_path is needed with model_cfg (make one with `reid-lab vlm-processor`)")
        digest = _processor_digest(processor_path)
        if processor_digest is not None and processor_digest != digest:
            raise ValueError(f"the processor in {processor_path} (digest {digest}) differs from the one this "
                             f"model was trained with ({processor_digest}): its token ids would be wrong")
        self.processor = load_processor(processor_path)
        tokenizer = self.processor.tokenizer
        self.pad_id = int(tokenizer.convert_tokens_to_ids(PAD_TOKEN))
        if folder is not None:
            try:
                model = AutoModelForImageTextToText.from_pretrained(str(folder), local_files_only=True)
            except Exception as err:  # noqa: BLE001 - transformers raises many types; none names the folder
                raise ValueError(f"cannot load the VLM in model_path {folder}: {type(err).__name__}: {err}") from err
        else:
            cfg = _with_processor_ids(typed_options(model_cfg), tokenizer)  # dotted overrides arrive as strings
            if "model_type" not in cfg:
                raise ValueError("model_cfg needs model_type (e.g. qwen2_vl), as in a model's config.json")
            config = AutoConfig.for_model(**cfg)
            model = AutoModelForImageTextToText.from_config(config)
        if adapter_path is not None:
            model = _merged_adapter(model, adapter_path)
        resolved_cfg = json.loads(model.config.to_json_string(use_diff=False))
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = typed_options(lora) if lora else None
        self.model = _with_lora(model, self.lora) if self.lora else model
        self.pooling = pooling
        self.prompt_format = prompt_format
        self.end_id = int(tokenizer.convert_tokens_to_ids(END_TOKEN))
        self.instructions = {**DEFAULT_INSTRUCTIONS, **(instructions or {})}
        self.context_length = int(context_length)
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, 3, 1, 1), persistent=False)
        self.record_init_args(model_path=model_path, model_cfg=resolved_cfg, processor_path=str(processor_path),
                              processor_digest=digest, pooling=pooling, instructions=self.instructions,
                              context_length=self.context_length, lora=self.lora,
                              gradient_checkpointing=bool(gradient_checkpointing), input_mean=tuple(input_mean),
                              input_std=tuple(input_std), prompt_format=prompt_format, adapter_path=adapter_path)

    # ------------------------------------------------------------------------------------ properties
    @property
    def base(self) -> nn.Module:
        """The ``transformers`` model (inside the peft wrapper when there is one)."""
        return self.model.get_base_model() if self.lora else self.model

    @property
    def embedding_dim(self) -> int:
        config = self.base.config
        return int(getattr(config, "text_config", config).hidden_size)

    def tokenizer(self) -> VLMTextTokenizer:
        """The caption tokenizer matching this encoder (its processor, text instruction and context length)."""
        return VLMTextTokenizer(self._init_args["processor_path"], instruction=self.instructions["text"],
                                context_length=self.context_length)

    # ------------------------------------------------------------------------------------- embedding
    def _pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return last_token_pool(hidden, attention_mask) if self.pooling == "last" else mean_pool(hidden, attention_mask)

    def _forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        # The base model (no LM head): (B, L, D) last hidden states, after the final norm (= the
        # ``hidden_states[-1]`` VLM2Vec reads from the full model's output).
        out = self.base.model(**inputs, use_cache=False)
        reps = self._pool(out.last_hidden_state, inputs["attention_mask"])
        return torch.nn.functional.normalize(reps, p=2, dim=-1) if self.prompt_format == "vlm2vec" else reps

    def encode_text(self, ids: Tensor) -> Tensor:
        """``(B, L)`` left-padded ids of :class:`VLMTextTokenizer` ``-> (B, D)``."""
        if self.prompt_format == "vlm2vec":
            ids = self._without_end(ids)
        mask = left_padding_mask(ids, self.pad_id)
        return self._forward({"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": torch.zeros_like(ids)})

    def _without_end(self, ids: Tensor) -> Tensor:
        """Caption ids without their closing ``<|im_end|>``, still left-padded to ``L`` (VLM2Vec ends on the text)."""
        if ids.shape[1] == 0 or not bool((ids[:, -1] == self.end_id).all()):
            raise ValueError(f"caption ids must end in the <|im_end|> id {self.end_id} (VLMTextTokenizer's layout); "
                             "got rows ending in other ids")
        return torch.cat([ids.new_full((ids.shape[0], 1), self.pad_id), ids[:, :-1]], dim=1)

    def _pixels(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` normalised images as ``[0, 1]`` CPU tensors for the model's image processor."""
        return list((images.float() * self.input_std + self.input_mean).clamp(0, 1).cpu())

    def image_inputs(self, images: Tensor) -> dict[str, Tensor]:
        """The processor's inputs for ``(B, 3, H, W)`` normalised images (on the images' device)."""
        prompt = item_prompt(self.prompt_format, self.instructions["image"], None, True)
        inputs = self.processor(text=[prompt] * len(images), images=self._pixels(images), return_tensors="pt",
                                do_rescale=False, padding=True)
        return {k: v.to(images.device) for k, v in inputs.items()}

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)``."""
        return self._forward(self.image_inputs(images))

    def embed_items(self, side: Mapping[str, Any]) -> Tensor:
        """Items of a pair batch (:class:`~reid_lab.data.PairDataModule`: ``instruction``, ``text`` (str or None),
        ``image`` ``(B, 3, H, W)`` and ``has_image`` ``(B,)``) ``-> (B, D)``: each item's
        :func:`~reid_lab.data.text.vlm_processor.item_prompt` in this encoder's format, one forward for the whole
        (mixed) batch. A text-only item embeds as :meth:`encode_text` of the same instruction and text does
        (under ``vlm2vec``: when its tokens fit in ``context_length - 1``, as VLM2Vec's ``max_len``)."""
        has_image = side["has_image"].bool()
        prompts = [item_prompt(self.prompt_format, instruction, text, img)
                   for instruction, text, img in zip(side["instruction"], side["text"], has_image.tolist())]
        images = side["image"][has_image]
        extra: dict[str, Any] = {}
        if len(images):
            extra = {"images": self._pixels(images), "do_rescale": False}
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, **extra)
        return self._forward({k: v.to(side["image"].device) for k, v in inputs.items()})

    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        out = {}
        for modality in self.check_batch(batch):
            out[modality] = self.encode_image(batch["image"]) if modality == "image" else self.encode_text(batch["text"])
        return out

    # ------------------------------------------------------------------------------------------- LoRA
    def merge_lora(self) -> None:
        """Fold the LoRA / DoRA weights into the base weights (same outputs; no adapter left to train)."""
        if not self.lora:
            raise ValueError("this encoder has no LoRA adapter to merge")
        self.model = self.model.merge_and_unload()
        self.lora = None
        self._init_args["lora"] = None

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the peft adapter (``adapter_config.json`` + weights) to ``folder``."""
        if not self.lora:
            raise ValueError("this encoder has no LoRA adapter to save")
        self.model.save_pretrained(str(folder))
        return Path(folder)


def _model_folder(model_path: str) -> Path:
    """``model_path`` as a folder that holds ``config.json`` and readable ``*.safetensors`` weights.

    Checked before anything is loaded, so the error names the model folder or the weights file that is wrong
    (a missing model folder is otherwise reported as a missing processor folder, the processor's default
    location; a truncated ``model.safetensors`` as a bare ``SafetensorError`` without a file name).
    """
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"VLM model_path {folder} does not exist; expected a local transformers model folder "
                         "(config.json + *.safetensors)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model_path {folder} holds no config.json (a transformers model folder)")
    from safetensors import SafetensorError, safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            # The header (names, dtypes, offsets) is checked against the file's size: truncation shows here.
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"VLM weights file {weights} is not a readable safetensors file ({err}); "
                             "it may be truncated: copy it again from its source") from err
    return folder


def _processor_digest(path: str | Path) -> str:
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"VLM processor folder {path} does not exist (make one with `reid-lab vlm-processor`)")
    return processor_digest(Path(path).expanduser())


def _with_processor_ids(cfg: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Fill the vocabulary size and the vision token ids from the processor's tokenizer where ``cfg`` omits them."""
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
           "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for key, token in ids.items():
        cfg.setdefault(key, int(tokenizer.convert_tokens_to_ids(token)))
    text = dict(cfg.get("text_config") or {})
    text.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        text.setdefault(key, int(tokenizer.convert_tokens_to_ids(PAD_TOKEN)))
    cfg["text_config"] = text
    return cfg


def _with_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    allowed = {"r", "alpha", "dropout", "target_modules", "use_dora", "init"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"lora has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    init = str(options.get("init", "default"))
    if init not in LORA_INITS:
        raise ValueError(f"lora init must be one of {LORA_INITS} (gaussian: VLM2Vec's init_lora_weights), got {init!r}")
    config = LoraConfig(r=int(options.get("r", 8)), lora_alpha=float(options.get("alpha", 16)),
                        lora_dropout=float(options.get("dropout", 0.0)),
                        target_modules=list(options.get("target_modules") or DEFAULT_LORA_TARGETS),
                        use_dora=bool(options.get("use_dora", False)),
                        init_lora_weights="gaussian" if init == "gaussian" else True)
    return get_peft_model(model, config)


# Adapters trained before transformers 4.52 name Qwen2-VL's modules ``model.layers.*`` (language model) and
# ``visual.*`` (vision tower); 4.52 moved them under ``model.language_model`` and ``model.visual``. VLM2Vec's Qwen2-VL
# releases use the older names. Regexes over the adapter's keys without peft's ``base_model.model.`` prefix
# (peft's ``key_mapping``), the renaming transformers 4.52 applied to full checkpoints; keys already in the
# current layout match neither pattern.
QWEN2_VL_LEGACY_KEYS = {r"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}
LEGACY_KEY_MAPPINGS = {"qwen2_vl": QWEN2_VL_LEGACY_KEYS, "qwen2_5_vl": QWEN2_VL_LEGACY_KEYS}


def _merged_adapter(model: nn.Module, adapter_path: str) -> nn.Module:
    """``model`` with the peft adapter of the local folder ``adapter_path`` loaded and merged into its weights.

    Adapter keys in the module names of earlier transformers versions are renamed (:data:`LEGACY_KEY_MAPPINGS`);
    an adapter whose tensors do not all land on the model's adapter weights, or that leaves some of them unset,
    is refused naming the keys (peft only warns and would merge nothing: the base model's embeddings).
    """
    from peft import PeftModel, get_peft_model_state_dict, load_peft_weights

    folder = Path(adapter_path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"adapter_path {folder} holds no adapter_config.json (a peft adapter folder with "
                         "adapter_model.safetensors, e.g. a VLM2Vec release)")
    key_mapping = LEGACY_KEY_MAPPINGS.get(getattr(getattr(model, "config", None), "model_type", None))
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False, local_files_only=True,
                                               key_mapping=key_mapping)
        stored = set(load_peft_weights(str(folder), device="cpu", key_mapping=key_mapping,
                                       local_files_only=True))
    except Exception as err:  # noqa: BLE001 - peft / safetensors raise many types; none names the folder
        raise ValueError(f"cannot load the peft adapter in adapter_path {folder}: {type(err).__name__}: {err}") from err
    expected = set(get_peft_model_state_dict(peft_model))
    unused, unset = sorted(stored - expected), sorted(expected - stored)
    if unused or unset:
        raise ValueError(
            f"the peft adapter in adapter_path {folder} does not fit this {type(model).__name__}: "
            f"{len(unused)} of its tensors match no adapter weight of the model (e.g. {unused[:3]}) and "
            f"{len(unset)} of the model's adapter weights are not in it (e.g. {unset[:3]}); was it trained on "
            "another base model, or with other target_modules?")
    return peft_model.merge_and_unload()
