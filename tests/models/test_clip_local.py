"""CLIP models from open_clip's local-dir layout and from a JSON config file, equal to open_clip's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import save_file

from reid_lab.embedding.encoder import build_encoder
from reid_lab.models.clip import CLIPEncoder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_cfg():
    return yaml.safe_load((REPO / "configs/model/clip_tiny.yaml").read_text())["model"]["init_args"]["model_cfg"]


def test_local_dir_loads_the_weights_as_open_clip_does(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    source = CLIPEncoder(model_cfg=tiny_cfg).eval()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, folder / "open_clip_model.safetensors")
    ours = CLIPEncoder(model_name=f"local-dir:{folder}").eval()
    theirs = open_clip.create_model(f"local-dir:{folder}", pretrained=None, load_weights=True).eval()
    context = tiny_cfg["text_cfg"]["context_length"]
    ids = open_clip.SimpleTokenizer(context_length=context)(["a man in a red coat", "a woman with a bag"])
    images = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ids), theirs.encode_text(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_image(images), source.encode_image(images), atol=1e-5, rtol=1e-5)
    spec = ours.spec()
    assert spec["init_args"]["model_name"] is None and spec["init_args"]["model_cfg"]["embed_dim"] == 64
    rebuilt = build_encoder(spec)  # from the recorded config: the folder is not needed any more
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in ours.parameters())


def test_a_json_config_file_and_its_errors(tiny_cfg, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(tiny_cfg))
    assert CLIPEncoder(model_cfg=str(path)).embedding_dim == 64
    path.write_text(json.dumps({"vision_cfg": {}}))
    with pytest.raises(ValueError, match="expected an open_clip model config"):
        CLIPEncoder(model_cfg=str(path))
    with pytest.raises(ValueError, match="local-dir .*missing does not exist"):
        CLIPEncoder(model_name=f"local-dir:{tmp_path / 'missing'}")


# ----------------------------------------------------------------------------- OpenAI's published layout
# A tiny ViT CLIP in the shape open_clip's build_model_from_openai_state_dict infers from OpenAI's files (heads =
# width // 64), with QuickGELU as OpenAI's models have.
OPENAI_TINY = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def openai_key_names(vision_layers: int, text_layers: int) -> set[str]:
    """The parameter names of OpenAI's CLIP ViT (openai/CLIP clip/model.py), written out by hand."""
    def blocks(prefix: str, layers: int) -> set[str]:
        return {f"{prefix}transformer.resblocks.{i}.{name}" for i in range(layers) for name in (
            "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
            "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
            "ln_2.weight", "ln_2.bias")}
    visual = {"visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
              "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias"}
    text = {"positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
            "ln_final.bias"}
    return visual | blocks("visual.", vision_layers) | text | blocks("", text_layers)


def write_openai_archive(path: Path, seed: int = 0) -> None:
    """A TorchScript archive as OpenAI publishes ``ViT-B-16.pt``: a traced model, float16 weights, the records
    ``input_resolution`` / ``context_length`` / ``vocab_size``, and the causal mask as a traced constant."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**OPENAI_TINY).eval()
    for key, value in (("input_resolution", 64), ("context_length", 16), ("vocab_size", 49408)):
        model.__dict__.pop(key, None)
        model.register_buffer(key, torch.tensor(value))
    mask = model.attn_mask
    del model._buffers["attn_mask"]
    model.attn_mask = mask  # a plain attribute, as in OpenAI's code: traced as a constant, not a state entry
    expected = openai_key_names(2, 2) | {"input_resolution", "context_length", "vocab_size"}
    assert set(model.state_dict()) == expected  # the file's keys are OpenAI's names
    ids = torch.randint(0, 49408, (2, 16))
    with pytest.warns(Warning):  # torch.jit.trace's own deprecation / tracer warnings
        traced = torch.jit.trace(model, (torch.randn(2, 3, 64, 64), ids), check_trace=False)
    traced.half().save(str(path))


@pytest.fixture
def openai_archive(tmp_path):
    path = tmp_path / "ViT-Tiny.pt"
    write_openai_archive(path)
    return path


def test_openai_archive_loads_as_open_clip_loads_it(openai_archive):
    """Built-in-style config + OpenAI's archive: the same embeddings as open_clip's own OpenAI loader."""
    theirs = open_clip.load_openai_model(str(openai_archive), precision="fp32", device="cpu").eval()
    ours = CLIPEncoder(model_cfg=OPENAI_TINY, weights=str(openai_archive)).eval()
    images, ids = torch.randn(3, 3, 64, 64), open_clip.SimpleTokenizer(context_length=16)(["a man", "red coat"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(ids), theirs.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_openai_archive_at_a_reid_input_size_matches_open_clips_resize(openai_archive, tmp_path):
    """At 96x48 (a 6x3 grid instead of 4x4) the positional embedding is resized as open_clip's load_checkpoint
    does: compared with open_clip's own loader on the same weights in its layout."""
    source = open_clip.load_openai_model(str(openai_archive), precision="fp32", device="cpu")
    folder = tmp_path / "open_clip_layout"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPENAI_TINY}))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, folder / "open_clip_model.safetensors")
    theirs = open_clip.create_model(f"local-dir:{folder}", force_image_size=(96, 48)).eval()
    ours = CLIPEncoder(model_cfg=OPENAI_TINY, image_size=[96, 48], weights=str(openai_archive)).eval()
    assert ours.model.visual.positional_embedding.shape == (1 + 6 * 3, 64)
    images = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), atol=1e-5, rtol=1e-5)


def test_open_clip_training_checkpoint_with_module_prefix(tmp_path):
    torch.manual_seed(1)
    source = CLIPEncoder(model_cfg=OPENAI_TINY).eval()
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in
                                                             source.model.state_dict().items()}}, path)
    ours = CLIPEncoder(model_cfg=OPENAI_TINY, weights=str(path)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), source.encode_image(images))


def test_weights_that_do_not_fit_name_the_file_and_keys(openai_archive, tmp_path):
    wider = {**OPENAI_TINY, "vision_cfg": {**OPENAI_TINY["vision_cfg"], "width": 128}}
    with pytest.raises(ValueError, match=r"ViT-Tiny\.pt.*shape mismatches .*visual\.conv1\.weight"):
        CLIPEncoder(model_cfg=wider, weights=str(openai_archive))
    bad = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match=r"other\.pt.*missing.*unexpected \(e\.g\. \['fc\.weight'\]\)"):
        CLIPEncoder(model_cfg=OPENAI_TINY, weights=str(bad))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        CLIPEncoder(model_cfg=OPENAI_TINY, weights=str(tmp_path / "nowhere.pt"))
