"""`reid_lab.load_embedder`: a checkpoint as a callable, equal to what `reid-lab predict` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reid_lab
from reid_lab.data.text.tokenizers import OpenCLIPTokenizer
from reid_lab.embedding.features import FeatureSet
from reid_lab.lightning_cli import run_lightning_cli
from tests.conftest import save_module_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_paths_pil_and_tensors_embed_as_predict_does(tiny_synthetic, tmp_path, cli_argv):
    args = ["--config", str(REPO / "configs/experiments/synthetic_bot_r18.yaml"), f"--data.init_args.root={tiny_synthetic}",
            "--data.init_args.image_size=[64,32]", "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
            "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}"]
    fit = run_lightning_cli(["fit", *args])
    fit.trainer.logger.experiment.finish()
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    out = tmp_path / "test.pt"
    predict = run_lightning_cli(["predict", *args, "--ckpt_path", ckpt, f"--predict_writer.output={out}"])
    assert predict.trainer.logger is None  # predict opens no logger run
    features = FeatureSet.load(out)

    embed = reid_lab.load_embedder(ckpt, batch_size=7)  # batches that do not divide the set
    ours = embed(features.items)
    assert ours.shape == features.features.shape and embed.space == features.space
    torch.testing.assert_close(ours, torch.nn.functional.normalize(features.features, dim=1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(ours)), atol=1e-5)
    pil = [Image.open(p).convert("RGB") for p in features.items[:3]]
    tensors = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in pil]
    torch.testing.assert_close(embed(pil), ours[:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embed(torch.stack(tensors)), ours[:3], atol=1e-5, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="nope.jpg does not exist"):
        embed(["nope.jpg"])  # an image-only model: a string that is no file is an error, not a caption


def test_captions_of_a_dual_encoder_use_its_own_tokenizer(tmp_path):
    import yaml

    from reid_lab.modules.clip import CLIPModule

    init = yaml.safe_load((REPO / "configs/model/clip_tiny.yaml").read_text())["model"]["init_args"]
    torch.manual_seed(0)
    module = CLIPModule(model_cfg=init["model_cfg"]).eval()
    ckpt = save_module_checkpoint(module, tmp_path / "clip.ckpt", datamodule_hparams={"image_size": [128, 64]})
    embed = reid_lab.load_embedder(ckpt)
    captions = ["a man in a red coat", "a woman with a white bag"]
    ids = OpenCLIPTokenizer(context_length=init["model_cfg"]["text_cfg"]["context_length"])(captions)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(module.encoder.encode_text(ids), dim=1)
    torch.testing.assert_close(embed(captions), expected, atol=1e-5, rtol=1e-4)
    assert embed(captions).shape == (2, 64) and embed.modalities == ("image", "text")
    with pytest.raises(FileNotFoundError, match=r"image a/typo\.jpg does not exist .*modality='text'"):
        embed(["a/typo.jpg", "b/typo.jpg"])  # typos in image paths are not captions
    torch.testing.assert_close(embed(["a/typo.jpg"], modality="text"), embed.embed_texts(["a/typo.jpg"]))
    with pytest.raises(ValueError, match="records no data image_size"):
        reid_lab.load_embedder(save_module_checkpoint(module, tmp_path / "bare.ckpt"))
