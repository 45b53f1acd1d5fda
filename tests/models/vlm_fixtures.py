"""A tiny Qwen2-VL (random init, from a config) and an offline processor, for the VLM tests."""

from __future__ import annotations

from pathlib import Path

CAPTIONS = [
    "a man in a red coat with black shoes", "a woman wearing a blue skirt and a white bag",
    "a person in a green jacket carrying a backpack", "a tall man with grey trousers",
    "Find the person described: ", "Represent the given person image: ",
]


def tiny_cfg(hidden: int = 32, layers: int = 1, dtype: str | None = None) -> dict:
    """A Qwen2-VL config small enough to train on a CPU in seconds (head_dim 8: mrope_section sums to 4)."""
    cfg = {
        "model_type": "qwen2_vl",
        "text_config": {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [1, 1, 2] if hidden == 32 else [2, 3, 3]}},
        "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
                          "patch_size": 14, "spatial_merge_size": 2},
    }
    return cfg


def build_processor(folder: Path) -> Path:
    from reid_lab.data.text.vlm_processor import build_offline_processor

    return build_offline_processor(folder, CAPTIONS * 4, vocab_size=320)


def save_release_layout(model, processor_dir: Path, folder: Path, shard_size: str = "40KB") -> Path:
    """Write ``model`` the way a Qwen2-VL release folder is laid out: ``config.json``, ``generation_config.json``,
    ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``, and the processor's files
    (tokenizer, ``preprocessor_config.json``, ...) in the same folder."""
    import shutil

    model.save_pretrained(folder, max_shard_size=shard_size)
    for file in processor_dir.iterdir():
        shutil.copy(file, folder / file.name)
    assert (folder / "model.safetensors.index.json").is_file(), "the tiny model must be sharded"
    return folder
