"""VLMEncoder (a tiny Qwen2-VL from a config): inputs, pooling, rebuilding from its spec, LoRA through peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reid_lab.data.text.vlm_processor import END_TOKEN, IMAGE_TEMPLATE, PAD_TOKEN, load_processor
from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.encoder import build_encoder
from reid_lab.models.vlm import VLMEncoder, last_token_pool, left_padding_mask, mean_pool
from tests.models.vlm_fixtures import CAPTIONS, build_processor, save_release_layout, tiny_cfg


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return build_processor(tmp_path_factory.mktemp("vlm") / "processor")


@pytest.fixture
def encoder(processor_dir):
    torch.manual_seed(0)
    return VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir), context_length=24).eval()


def _normalised(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def test_pooling_against_a_loop():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # left, none, right padding
    for i, last in enumerate([4, 4, 2]):
        assert torch.equal(last_token_pool(hidden, mask)[i], hidden[i, last])
        rows = hidden[i][mask[i].bool()]
        assert torch.allclose(mean_pool(hidden, mask)[i], rows.mean(0))
    assert left_padding_mask(torch.tensor([[7, 7, 3, 7, 5]]), pad_id=7).tolist() == [[0, 0, 1, 1, 1]]


def test_caption_ids_are_instruction_caption_end_left_padded(encoder, processor_dir):
    tokenizer = encoder.tokenizer()
    ids = tokenizer(["a man in a red coat", "a person in a green jacket carrying a backpack " * 4])
    hf = load_processor(processor_dir).tokenizer
    end, pad = hf.convert_tokens_to_ids(END_TOKEN), hf.convert_tokens_to_ids(PAD_TOKEN)
    assert ids.shape == (2, 24) and (ids[:, -1] == end).all()
    first = ids[0][ids[0] != pad]
    assert hf.decode(first[:-1]) == "Find the person described: a man in a red coat"
    assert (ids[0][: 24 - len(first)] == pad).all()  # left padding
    assert (ids[1] != pad).all()  # truncated to the context, the end token kept


def test_a_caption_embeds_the_same_alone_and_left_padded_in_a_batch(encoder):
    tokenizer = encoder.tokenizer()
    short, long = "a tall man", "a woman wearing a blue skirt and a white bag"
    ids = tokenizer([long, short])
    n = int((ids[1] != encoder.pad_id).sum())
    assert n < ids.shape[1]  # the short caption is padded in the batch
    with torch.no_grad():
        batch = encoder.encode({"text": ids})["text"]
        alone = encoder.encode({"text": tokenizer([short], context_length=n)})["text"]
    # position ids and the pooled position must skip the padding: otherwise the two differ
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=1e-5)


def test_images_reach_the_model_through_its_own_processor(encoder, processor_dir):
    torch.manual_seed(1)
    pixels = torch.rand(3, 3, 96, 48)
    inputs = encoder.image_inputs(_normalised(pixels))
    prompt = IMAGE_TEMPLATE.format(instruction="Represent the given person image: ")
    direct = load_processor(processor_dir)(text=[prompt] * 3, images=list(pixels), return_tensors="pt",
                                           do_rescale=False)
    torch.testing.assert_close(inputs["pixel_values"], direct["pixel_values"], atol=1e-5, rtol=1e-5)
    assert torch.equal(inputs["input_ids"], direct["input_ids"])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 4]] * 3  # 96 x 48 -> 84 x 56: 6 x 4 patches of 14
    with torch.no_grad():
        reference = encoder.base.model(**direct, use_cache=False).last_hidden_state[:, -1]
        ours = encoder.encode({"image": _normalised(pixels)})["image"]
        one = encoder.encode({"image": _normalised(pixels[1:2])})["image"]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[0], ours[1], atol=1e-5, rtol=1e-5)


def test_the_spec_rebuilds_the_encoder_and_refuses_a_changed_processor(encoder, processor_dir, tmp_path):
    ids = encoder.tokenizer()(CAPTIONS[:2])
    images = torch.randn(2, 3, 64, 32)
    spec = encoder.spec()
    assert spec["init_args"]["model_path"] is None and spec["init_args"]["model_cfg"]["model_type"] == "qwen2_vl"
    rebuilt = build_encoder(spec)
    rebuilt.load_state_dict(encoder.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        for batch in ({"text": ids}, {"image": images}):
            (key,) = batch
            torch.testing.assert_close(rebuilt.encode(batch)[key], encoder.encode(batch)[key])
    other = build_processor(tmp_path / "other")  # another vocabulary under the recorded folder name
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(processor_dir, moved)
    shutil.rmtree(processor_dir)
    shutil.copytree(other, processor_dir)
    (processor_dir / "tokenizer_config.json").write_text(
        (processor_dir / "tokenizer_config.json").read_text().replace('"left"', '"right"'))
    try:
        with pytest.raises(ValueError, match="differs from the one this model was trained with"):
            build_encoder(spec)
    finally:
        shutil.rmtree(processor_dir)
        shutil.copytree(moved, processor_dir)


def test_a_model_folder_loads_offline_and_embeds_like_the_model(processor_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    built = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir)).eval()
    folder = tmp_path / "model"
    built.base.save_pretrained(folder)
    loaded = VLMEncoder(model_path=str(folder), processor_path=str(processor_dir)).eval()
    reference = AutoModelForImageTextToText.from_pretrained(folder, config=AutoConfig.from_pretrained(folder)).eval()
    ids = loaded.tokenizer()(["a man in a red coat"], context_length=12)
    n = int((ids != loaded.pad_id).sum())
    with torch.no_grad():
        ours = loaded.encode({"text": ids})["text"]
        theirs = reference.model(input_ids=ids[:, -n:], attention_mask=torch.ones(1, n, dtype=torch.long),
                                 use_cache=False).last_hidden_state[:, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert loaded.spec()["init_args"]["model_path"] is None  # the checkpoint rebuilds from the recorded config


def test_lora_trains_only_the_adapter_and_merges_and_saves_like_peft(processor_dir, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    encoder = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir),
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}).eval()
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("v_proj.lora_B" in n for n in trainable) and not any("k_proj" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect to merge
        for n, p in encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = encoder.tokenizer()(CAPTIONS[:3])
    with torch.no_grad():
        adapted = encoder.encode({"text": ids})["text"]
    folder = encoder.save_adapter(tmp_path / "adapter")
    base = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir)).eval()
    base_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in encoder.state_dict().items() if "lora_" not in k}
    base.load_state_dict(base_state)
    with torch.no_grad():
        plain = base.encode({"text": ids})["text"]
        peft_model = PeftModel.from_pretrained(base.model, str(folder)).eval()
        theirs = last_token_pool(peft_model.get_base_model().model(
            input_ids=ids, attention_mask=left_padding_mask(ids, encoder.pad_id), use_cache=False).last_hidden_state,
            left_padding_mask(ids, encoder.pad_id))
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the embedding
    torch.testing.assert_close(theirs, adapted, atol=1e-5, rtol=1e-5)
    encoder.merge_lora()
    assert encoder.spec()["init_args"]["lora"] is None
    with torch.no_grad():
        merged = encoder.encode({"text": ids})["text"]
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_bad_configs_name_the_problem(processor_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one of model_path"):
        VLMEncoder(processor_path=str(processor_dir))
    with pytest.raises(ValueError, match="pooling must be one of"):
        VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir), pooling="cls")
    with pytest.raises(ValueError, match="does not exist"):
        VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no config.json"):
        VLMEncoder(model_path=str(tmp_path), processor_path=str(processor_dir))
    with pytest.raises(ValueError, match=r"lora has unknown key\(s\) \['rank'\]"):
        VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir), lora={"rank": 4})


def test_pair_items_embed_like_the_single_modality_paths(encoder):
    """A text-only item = encode_text with the same instruction; an image item's tokens = the image template's;
    mixing text, image and image+text items in one left-padded batch changes no item's embedding."""
    torch.manual_seed(2)
    pixels = _normalised(torch.rand(2, 3, 96, 48))
    side = {"instruction": ["Find the person described: ", "Represent the given person image: ", "Q: "],
            "text": ["a man in a red coat", None, "is the bag white?"],
            "image": torch.stack([torch.zeros(3, 96, 48), pixels[0], pixels[1]]),
            "has_image": torch.tensor([False, True, True])}
    with torch.no_grad():
        mixed = encoder.embed_items(side)
        text = encoder.encode({"text": encoder.tokenizer()(["a man in a red coat"])})["text"]
        image = encoder.encode({"image": pixels[:1]})["image"]
        alone = encoder.embed_items({k: v[2:] for k, v in side.items()})
    torch.testing.assert_close(mixed[0], text[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], image[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], alone[0], atol=1e-5, rtol=1e-5)


def test_a_missing_or_truncated_model_is_named_by_its_folder_or_file(processor_dir, tmp_path):
    # Without processor_path the processor is looked up in model_path: the error must name the model folder.
    with pytest.raises(ValueError, match=f"VLM model_path {tmp_path / 'nope'} does not exist"):
        VLMEncoder(model_path=str(tmp_path / "nope"))
    torch.manual_seed(0)
    folder = tmp_path / "model"
    VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir)).base.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=f"VLM weights file {weights} is not a readable safetensors file"):
        VLMEncoder(model_path=str(folder), processor_path=str(processor_dir))


# --------------------------------------------------------------------------------------------------------------
# VLM2Vec's Qwen2-VL encode path, re-implemented here from TIGER-AI-Lab/VLM2Vec (never reid_lab's code):
# src/model/processor.py ``Qwen2_VL_process_fn`` (each item through the processor alone, ``truncation=True`` with
# ``max_length`` for text-only items, then ``processor.tokenizer.pad``), ``VLM_IMAGE_TOKENS[QWEN2_VL]`` for MMEB's
# ``<|image_1|>``, and src/model/model.py ``MMEBModel.encode_input`` / ``_pooling`` (``hidden_states[-1]`` of
# the full model, last token under left or right padding, ``normalize=True``).
VLM2VEC_QWEN2_IMAGE_TOKEN = "<|image_pad|>"


def vlm2vec_process(processor, texts, images, max_length=None):
    input_ids, pixel_values, image_grid_thw = [], [], []
    for text, image in zip(texts, images):
        if image is None:
            inputs = processor(text=[text], images=None, return_tensors="np", max_length=max_length, truncation=True)
        else:
            inputs = processor(text=[text], images=[image], return_tensors="np", max_length=max_length,
                               truncation=(max_length is not None))
            pixel_values.append(torch.from_numpy(inputs["pixel_values"]))
            image_grid_thw.append(torch.from_numpy(inputs["image_grid_thw"]))
        input_id = inputs["input_ids"].squeeze().tolist()
        input_ids.append([input_id] if isinstance(input_id, int) else input_id)
    batch = processor.tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
    out = {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}
    # VLM2Vec's vendored Qwen2-VL takes per-row lists; transformers' takes the rows' patches concatenated, and
    # (v5) the token types: 1 on the image tokens.
    if pixel_values:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pixel_values), torch.cat(image_grid_thw)
    image_id = processor.tokenizer.convert_tokens_to_ids(VLM2VEC_QWEN2_IMAGE_TOKEN)
    out["mm_token_type_ids"] = (out["input_ids"] == image_id).long()
    return out


def vlm2vec_pooling(last_hidden_state, attention_mask):
    left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
    batch_size = last_hidden_state.shape[0]
    if left_padding:
        reps = last_hidden_state[torch.arange(batch_size), -1, :]
    else:
        eos_indices = attention_mask.sum(dim=1) - 1
        reps = last_hidden_state[torch.arange(batch_size, device=last_hidden_state.device), eos_indices]
    return torch.nn.functional.normalize(reps, p=2, dim=-1)


def vlm2vec_encode(model, inputs):
    hidden_states = model(**inputs, return_dict=True, output_hidden_states=True).hidden_states[-1]
    return vlm2vec_pooling(hidden_states, inputs["attention_mask"])


def _pil_and_tensor(seed, height, width):
    """A uint8 PIL image (what VLM2Vec reads) and the same image as the data modules give it (normalised)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(array.numpy()), _normalised(array.permute(2, 0, 1).float().unsqueeze(0) / 255)[0]


@pytest.fixture
def vlm2vec_encoder(processor_dir):
    torch.manual_seed(0)
    return VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir), context_length=12,
                      prompt_format="vlm2vec").eval()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_vlm2vec_format_items_embed_as_vlm2vec_does(vlm2vec_encoder, processor_dir, padding_side):
    """An MMEB image query, a text-only caption query and an image target in one batch: the same embeddings as
    VLM2Vec's own processing of the same strings and PIL images (left- or right-padded by its tokenizer)."""
    (pil0, img0), (pil1, img1) = _pil_and_tensor(0, 84, 56), _pil_and_tensor(1, 84, 56)
    side = {"instruction": ["", "Find the person described: ", "Represent the given person image: "],
            "text": ["Represent the given image for classification", "a man in a red coat", None],
            "image": torch.stack([img0, torch.zeros_like(img0), img1]), "has_image": torch.tensor([True, False, True])}
    texts = ["<|image_pad|>\nRepresent the given image for classification",  # MMEB's "<|image_1|>\n..." rewritten
             "Find the person described: a man in a red coat", "<|image_pad|>\nRepresent the given person image: "]
    processor = load_processor(processor_dir)
    processor.tokenizer.padding_side = padding_side
    with torch.no_grad():
        reference = vlm2vec_encode(vlm2vec_encoder.base, vlm2vec_process(processor, texts, [pil0, None, pil1]))
        ours = vlm2vec_encoder.embed_items(side)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3))  # VLM2Vec's --normalize True


def test_vlm2vec_format_captions_and_images_embed_as_vlm2vec_does(vlm2vec_encoder, processor_dir):
    """Caption ids of the data's tokenizer (``instruction caption <|im_end|>`` in 12 ids) embed as VLM2Vec embeds
    ``instruction + caption`` cut at ``max_len`` 11, a long caption truncated at its end; images embed as
    ``<|image_pad|>\\n`` + the image instruction."""
    captions = ["a tall man", "a person in a green jacket carrying a backpack"]
    ids = vlm2vec_encoder.tokenizer()(captions)
    processor = load_processor(processor_dir)
    instruction = vlm2vec_encoder.instructions["text"]
    (pil0, img0), (pil1, img1) = _pil_and_tensor(2, 56, 84), _pil_and_tensor(3, 56, 84)
    with torch.no_grad():
        text_reference = vlm2vec_encode(vlm2vec_encoder.base, vlm2vec_process(
            processor, [instruction + c for c in captions], [None, None], max_length=11))
        text = vlm2vec_encoder.encode({"text": ids})["text"]
        image_reference = vlm2vec_encode(vlm2vec_encoder.base, vlm2vec_process(
            processor, ["<|image_pad|>\nRepresent the given person image: "] * 2, [pil0, pil1]))
        image = vlm2vec_encoder.encode({"image": torch.stack([img0, img1])})["image"]
    assert len(processor.tokenizer(instruction + captions[1])["input_ids"]) > 11  # the long one is truncated
    torch.testing.assert_close(text, text_reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image, image_reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must end in the <\\|im_end\\|> id"):
        vlm2vec_encoder.encode({"text": ids[:, :-1]})
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir), prompt_format="chat")


def test_a_release_folder_and_its_dora_adapter_load_offline_and_embed_as_vlm2vec(processor_dir, tmp_path):
    """A Qwen2-VL base in a release folder (sharded safetensors + index, processor files beside them) and a
    VLM2Vec-style DoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, Gaussian init):
    the encoder equals VLM2Vec's encoder (``PeftModel`` over ``from_pretrained``) on the same inputs."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    base = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir)).base
    folder = save_release_layout(base, processor_dir, tmp_path / "Qwen2-VL-tiny")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                              init_lora_weights="gaussian", use_dora=True))
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter.save_pretrained(tmp_path / "VLM2Vec-tiny")
    assert {f.name for f in (tmp_path / "VLM2Vec-tiny").iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
    ours = VLMEncoder(model_path=str(folder), adapter_path=str(tmp_path / "VLM2Vec-tiny"),
                      prompt_format="vlm2vec").eval()
    reference_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder),
                                                str(tmp_path / "VLM2Vec-tiny")).eval()
    processor = AutoProcessor.from_pretrained(folder)
    pil, img = _pil_and_tensor(4, 84, 56)
    side = {"instruction": ["", "Find the person described: "], "text": ["Represent the given image", "a tall man"],
            "image": torch.stack([img, img]), "has_image": torch.tensor([True, False])}
    with torch.no_grad():
        reference = vlm2vec_encode(reference_model, vlm2vec_process(
            processor, ["<|image_pad|>\nRepresent the given image", "Find the person described: a tall man"],
            [pil, None]))
        plain = vlm2vec_encode(AutoModelForImageTextToText.from_pretrained(folder), vlm2vec_process(
            processor, ["<|image_pad|>\nRepresent the given image", "Find the person described: a tall man"],
            [pil, None]))
        got = ours.embed_items(side)
    assert (reference - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    spec = ours.spec()["init_args"]
    assert spec["model_path"] is None and spec["adapter_path"] is None  # the merged weights are in the state dict
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        VLMEncoder(model_path=str(folder), adapter_path=str(tmp_path))
    # configs/model/vlm_vlm2vec_qwen2.yaml on these folders: its fresh DoRA adapter starts as the identity
    import yaml

    from reid_lab.modules.vlm import VLMEmbeddingModule

    init = yaml.safe_load((Path(__file__).parents[2] / "configs/model/vlm_vlm2vec_qwen2.yaml").read_text())
    module = VLMEmbeddingModule(**{**init["model"]["init_args"], "model_path": str(folder),
                                   "adapter_path": str(tmp_path / "VLM2Vec-tiny")}).eval()
    with torch.no_grad():
        torch.testing.assert_close(module.encoder.embed_items(side), reference, atol=1e-5, rtol=1e-5)


def test_an_adapter_in_the_module_names_of_older_transformers_loads_and_a_foreign_one_is_refused(processor_dir,
                                                                                                   tmp_path):
    """VLM2Vec's Qwen2-VL releases were trained before transformers 4.52 renamed the modules: their adapter keys
    read ``base_model.model.model.layers.*`` and ``base_model.model.visual.*`` where today's model has
    ``...model.language_model.layers.*`` and ``...model.visual.*``. peft alone finds none of them, warns and
    merges nothing (the base model's embeddings); here the keys are renamed and the merge equals the same
    adapter saved in today's names. An adapter of other modules is refused, naming its keys."""
    import json
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir)).base
    folder = save_release_layout(base, processor_dir, tmp_path / "Qwen2-VL-tiny")
    # language-model and vision-tower modules both adapted
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "qkv"]))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter.save_pretrained(tmp_path / "today")
    today = load_file(tmp_path / "today" / "adapter_model.safetensors")
    assert any(".model.visual." in k for k in today) and any(".model.language_model." in k for k in today)

    def rewrite(name, keys):
        (tmp_path / name).mkdir()
        save_file(keys, tmp_path / name / "adapter_model.safetensors", metadata={"format": "pt"})
        shutil.copy(tmp_path / "today" / "adapter_config.json", tmp_path / name / "adapter_config.json")
        return str(tmp_path / name)

    # the layout of transformers < 4.52, written by hand
    older = rewrite("older", {k.replace("base_model.model.model.language_model.", "base_model.model.model.")
                              .replace("base_model.model.model.visual.", "base_model.model.visual."): v
                              for k, v in today.items()})
    assert not any("language_model" in k for k in load_file(Path(older) / "adapter_model.safetensors"))
    plain = VLMEncoder(model_path=str(folder)).state_dict()
    merged_today = VLMEncoder(model_path=str(folder), adapter_path=str(tmp_path / "today")).state_dict()
    merged_older = VLMEncoder(model_path=str(folder), adapter_path=older).state_dict()
    changed = [k for k in plain if not torch.equal(plain[k], merged_today[k])]
    assert any("visual" in k for k in changed) and any("language_model" in k for k in changed)
    for k in plain:
        torch.testing.assert_close(merged_older[k], merged_today[k], rtol=0, atol=0)

    foreign = rewrite("foreign", {k.replace("v_proj", "k_proj"): v for k, v in today.items()})
    with pytest.raises(ValueError, match=r"does not fit this Qwen2VLForConditionalGeneration: 2 of its tensors "
                                         r"match no adapter weight.*k_proj.*2 of the model's adapter weights"):
        VLMEncoder(model_path=str(folder), adapter_path=foreign)
    assert json.loads((tmp_path / "today" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_dora_with_gaussian_init_is_vlm2vecs_adapter(processor_dir):
    """``lora: {use_dora: true, init: gaussian}`` builds peft's DoRA with Gaussian A (std 1/r, where the
    default Kaiming-uniform A has std 1/sqrt(3 fan_in)) and zero B: the embedding starts as the base model's."""
    torch.manual_seed(0)
    base = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir)).eval()
    torch.manual_seed(0)
    dora = VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir),
                      lora={"r": 2, "alpha": 8, "use_dora": True, "init": "gaussian"}).eval()
    config = dora.model.peft_config["default"]
    assert config.use_dora and config.init_lora_weights == "gaussian"
    a = torch.cat([p.detach().flatten() for n, p in dora.named_parameters() if "lora_A" in n])
    assert 0.4 < float(a.std()) < 0.6  # N(0, 1/r = 0.5); Kaiming uniform on fan_in 32 would give 0.10
    assert any("lora_magnitude_vector" in n for n, p in dora.named_parameters() if p.requires_grad)
    ids = base.tokenizer()(CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(dora.encode({"text": ids})["text"], base.encode({"text": ids})["text"],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lora init must be one of"):
        VLMEncoder(model_cfg=tiny_cfg(), processor_path=str(processor_dir), lora={"init": "pissa"})
