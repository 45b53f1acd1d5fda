"""VLMEncoder (a tiny Qwen2-VL from a config): inputs, pooling, rebuilding from its spec, LoRA through peft."""

from __future__ import annotations

import pytest
import torch

from reid_lab.data.text.vlm_processor import END_TOKEN, IMAGE_TEMPLATE, PAD_TOKEN, load_processor
from reid_lab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from reid_lab.embedding.encoder import build_encoder
from reid_lab.models.vlm import VLMEncoder, last_token_pool, left_padding_mask, mean_pool
from tests.models.vlm_fixtures import CAPTIONS, build_processor, tiny_cfg


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
