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
    ids = open_clip.SimpleTokenizer(context_length=32)(["a man in a red coat", "a woman with a bag"])
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
