"""CLIP-ReID: prompts through open_clip's text transformer, the two stages' losses and frozen parts, and a
two-stage run through the real LightningCLI (fit, resume, fit stage 2, test)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from reid_lab.cli import main
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.losses.clip_reid import prototype_cross_entropy
from reid_lab.models.clip import CLIPEncoder
from reid_lab.models.prompt_learner import PromptLearner, encode_text_embeddings, open_clip_text_model
from reid_lab.modules.clip_reid import CLIPReIDModule
from tests.conftest import save_module_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load(open(REPO / "configs/model/clip_tiny.yaml"))["model"]["init_args"]["model_cfg"]
NUM_CLASSES = 5


def module(stage: int = 1, **kwargs) -> CLIPReIDModule:
    torch.manual_seed(0)
    return CLIPReIDModule(stage=stage, model_cfg=TINY, num_classes=NUM_CLASSES, **kwargs)


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(6, 3, 128, 64, generator=g), "pid": torch.tensor([0, 0, 1, 1, 3, 3])}


def steps(m: CLIPReIDModule, n: int = 2) -> None:
    optimizer = m.configure_optimizers()["optimizer"]
    m.train()
    for _ in range(n):
        optimizer.zero_grad()
        m.training_output(batch()).loss.backward()
        optimizer.step()


def snapshot(named) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in named}


# ------------------------------------------------------------------------------------------------ prompts
def test_prompts_of_real_words_encode_as_open_clip_encode_text():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval()  # the reference: open_clip's own encode_text on token ids
    tokenize = open_clip.tokenizer.SimpleTokenizer(context_length=TINY["text_cfg"]["context_length"])
    learner = PromptLearner(3, TINY["text_cfg"]["width"], tokenize)
    sentences = {0: ["tall", "man", "red", "coat"], 2: ["woman", "with", "white", "bag"]}
    with torch.no_grad():
        for pid, words in sentences.items():
            ids = tokenize([" ".join(words)])[0, 1:5]
            assert tokenize(words)[:, 2].eq(tokenize.eot_token_id).all()  # each word is one token
            learner.cls_ctx[pid] = model.token_embedding(ids)
        got = learner.encode(model, torch.tensor([0, 2, 0]))
        want = model.encode_text(tokenize([f"A photo of a {' '.join(sentences[p])} person." for p in (0, 2, 0)]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # and from arbitrary embeddings of a tokenized sentence
    tokens = tokenize(["a man in a red coat"])
    with torch.no_grad():
        torch.testing.assert_close(encode_text_embeddings(model, model.token_embedding(tokens), tokens),
                                   model.encode_text(tokens), rtol=0, atol=1e-6)


def test_a_hugging_face_text_tower_is_refused():
    encoder = CLIPEncoder(model_cfg={"embed_dim": 32, "vision_cfg": TINY["vision_cfg"]}, text_tower="minilm_l6")
    with pytest.raises(ValueError, match="open_clip's own text transformer.*minilm_l6"):
        open_clip_text_model(encoder.model)


# ----------------------------------------------------------------------------------------------- stage 1
def naive_supcon(anchor, contrast, a_pids, c_pids):
    total = 0.0
    for a in range(len(anchor)):
        logits = [float(anchor[a] @ contrast[k]) for k in range(len(contrast))]
        log_norm = math.log(sum(math.exp(s) for s in logits))
        positives = [k for k in range(len(contrast)) if int(c_pids[k]) == int(a_pids[a])]
        total += -sum(logits[k] - log_norm for k in positives) / len(positives)
    return total / len(anchor)


def test_stage1_loss_is_the_supcon_formula_in_both_directions():
    m = module(stage=1, stage1_features="batch").eval()
    b = batch()
    with torch.no_grad():
        out = m.training_output(b)
        image = m.encoder.encode_image(b["image"])
        text = torch.stack([m.prompt_learner.encode(m.encoder.model, p.view(1))[0] for p in b["pid"]])
    expected = naive_supcon(image, text, b["pid"], b["pid"]) + naive_supcon(text, image, b["pid"], b["pid"])
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert float(out.parts["supcon_i2t"]) == pytest.approx(naive_supcon(image, text, b["pid"], b["pid"]), rel=1e-5)


def test_stage1_trains_only_the_prompts():
    m = module(stage=1, weight_decay=0.0, stage1_features="batch")  # (weight decay would shrink every identity's words)
    before, ctx = snapshot(m.encoder.state_dict().items()), m.prompt_learner.cls_ctx.detach().clone()
    steps(m)
    after = m.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every encoder weight (and buffer) bit-identical
    assert not m.encoder.training  # frozen towers stay in eval mode
    changed = (m.prompt_learner.cls_ctx - ctx).abs().sum(dim=(1, 2)) > 0
    assert changed.tolist() == [True, True, False, True, False]  # the batch's identities (0, 1, 3) only


def test_stage1_caches_the_unaugmented_features_once_and_draws_each_once_per_epoch(tiny_synthetic, tmp_path):
    """Official stage 1: the training set's features are computed once, un-augmented, then permuted per epoch."""
    import lightning as L
    from PIL import Image

    from reid_lab.data import ReIDDataModule

    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), batch_size=8,
                        num_instances=2, eval_batch_size=16, num_workers=0)
    torch.manual_seed(0)
    m = CLIPReIDModule(stage=1, model_cfg=TINY, force_image_size=[64, 32], num_classes=dm.num_classes)
    calls, drawn = [], []
    encode_image = m.encoder.encode_image

    def counting(images):
        calls.append(images.shape[0])
        return encode_image(images)

    m.encoder.encode_image = counting  # counts the image tower's calls; computes what it computed
    rows = m.cached_stage1_rows
    m.cached_stage1_rows = lambda n: drawn.append(rows(n)) or drawn[-1]
    steps_per_epoch = len(dm.train_records) // 8
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, limit_train_batches=steps_per_epoch, enable_progress_bar=False,
                        use_distributed_sampler=False)
    trainer.fit(m, datamodule=dm)
    num = len(dm.train_records)
    assert sum(calls) == num and len(calls) == -(-num // 16)  # one pass over the training set, in eval batches
    # the cache is the embedding of every training image under the evaluation transform, in order
    images = torch.stack([dm.test_transform(Image.open(r.path).convert("RGB")) for r in dm.train_records])
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m._cached_image, encode_image(images), rtol=1e-5, atol=1e-5)
    assert m._cached_pids.tolist() == [r.pid for r in dm.train_records]
    # each epoch draws distinct rows (a permutation), and the two epochs draw different orders
    epochs = [torch.cat(drawn[:steps_per_epoch]), torch.cat(drawn[steps_per_epoch:])]
    assert all(len(set(e.tolist())) == len(e) == steps_per_epoch * 8 for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])


def test_stage1_without_cached_features_says_how_to_get_them():
    with pytest.raises(RuntimeError, match="cache_stage1_features"):
        module(stage=1).training_output(batch())
    with pytest.raises(ValueError, match="stage1_features must be 'cached'"):
        module(stage=1, stage1_features="augmented")


# ----------------------------------------------------------------------------------------------- stage 2
def test_prototype_cross_entropy_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    prototypes = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
    pids, eps = torch.tensor([2, 1]), 0.1
    expected = 0.0
    for f, y in zip(features.tolist(), pids.tolist(), strict=True):
        logits = [f[0] * p[0] + f[1] * p[1] for p in prototypes.tolist()]
        log_p = [s - math.log(sum(math.exp(t) for t in logits)) for s in logits]
        expected += -(1 - eps) * log_p[y] - eps * sum(log_p) / 3
    assert float(prototype_cross_entropy(features, prototypes, pids, eps)) == pytest.approx(expected / 2, rel=1e-6)


def stage1_checkpoint(tmp_path) -> Path:
    m = module(stage=1, stage1_features="batch")
    steps(m, 1)
    return save_module_checkpoint(m, tmp_path / "stage1.ckpt")


def test_stage2_loads_stage1_and_trains_only_the_image_tower(tmp_path):
    path = stage1_checkpoint(tmp_path)
    m = module(stage=2, stage1_checkpoint=str(path))
    m.setup("fit")
    stage1 = torch.load(path, weights_only=True)["state_dict"]
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stage1.items())  # towers and prompts came from stage 1

    b = batch()
    out = m.training_output(b)
    bank = torch.cat([m.prompt_learner.encode(m.encoder.model, torch.tensor([c])) for c in range(NUM_CLASSES)])
    image = m.encoder.encode_image(b["image"])
    i2t = prototype_cross_entropy(image, bank, b["pid"], 0.1)
    assert float(out.parts["i2t_ce"]) == pytest.approx(float(i2t), rel=1e-5)
    total = 0.25 * out.parts["ce"] + out.parts["triplet"] + i2t
    assert float(out.loss) == pytest.approx(float(total), rel=1e-5)

    before = snapshot(m.named_parameters())
    steps(m)
    after = dict(m.named_parameters())
    visual = [k for k in before if k.startswith("encoder.model.visual.")]
    frozen = [k for k in before if k.startswith("prompt_learner.") or
              (k.startswith("encoder.") and not k.startswith("encoder.model.visual."))]
    assert visual and frozen
    assert any(not torch.equal(before[k], after[k]) for k in visual)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # text tower, projection, temperature, prompts


def test_stage2_refuses_a_missing_or_foreign_stage1_checkpoint(tmp_path, old_checkpoint):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        module(stage=2, stage1_checkpoint=str(tmp_path / "nowhere.ckpt")).setup("fit")
    with pytest.raises(ValueError, match=r"old.ckpt is not a stage-1 CLIP-ReID checkpoint.*ReIDModel"):
        module(stage=2, stage1_checkpoint=str(old_checkpoint)).setup("fit")
    stage2 = save_module_checkpoint(module(stage=2), tmp_path / "stage2.ckpt")
    with pytest.raises(ValueError, match="is a stage-2 CLIP-ReID checkpoint"):
        module(stage=2, stage1_checkpoint=str(stage2)).setup("fit")
    with pytest.raises(ValueError, match="is a stage-1 CLIP-ReID checkpoint; this module is stage 2"):
        module(stage=2).on_load_checkpoint(torch.load(stage1_checkpoint(tmp_path), weights_only=True))
    torch.manual_seed(0)
    other = CLIPReIDModule(stage=2, model_cfg=TINY, num_classes=4, stage1_checkpoint=str(stage1_checkpoint(tmp_path)))
    with pytest.raises(ValueError, match="does not fit this stage-2 model: num_classes"):
        other.setup("fit")


# ----------------------------------------------------------------------------------------- through the CLI
def _args(stage: int, root: Path, tmp: Path) -> list[str]:
    return [
        "--config", str(REPO / f"configs/experiments/synthetic_clipreid_stage{stage}.yaml"),
        f"--data.init_args.root={root}", "--data.init_args.image_size=[64,32]",
        "--model.init_args.force_image_size=[64,32]", "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0", "--data.init_args.eval_batch_size=64", "--trainer.accelerator=cpu",
        "--trainer.limit_train_batches=2", "--trainer.check_val_every_n_epoch=1",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}", f"--trainer.default_root_dir={tmp}",
    ]


@pytest.mark.slow
def test_two_stages_through_the_cli(tiny_synthetic, tmp_path, cli_argv, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the configs chain the stages through runs/synthetic_clipreid_stage1/last.ckpt
    s1 = _args(1, tiny_synthetic, tmp_path)
    first = run_lightning_cli(["fit", *s1, "--trainer.max_epochs=1"])
    first.trainer.logger.experiment.finish()
    last = tmp_path / "runs/synthetic_clipreid_stage1/last.ckpt"
    ctx_1 = torch.load(last, weights_only=True)["state_dict"]["prompt_learner.cls_ctx"].clone()
    resumed = run_lightning_cli(["fit", *s1, "--trainer.max_epochs=2", "--ckpt_path", str(last)])
    resumed.trainer.logger.experiment.finish()
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 4
    stage1 = torch.load(last, weights_only=True)
    assert stage1["clip_reid"]["stage"] == 1 and not torch.equal(stage1["state_dict"]["prompt_learner.cls_ctx"], ctx_1)

    s2 = [*_args(2, tiny_synthetic, tmp_path), "--trainer.max_epochs=1"]  # the config names stage 1's last.ckpt
    fit = run_lightning_cli(["fit", *s2])
    fit.trainer.logger.experiment.finish()
    assert fit.trainer.checkpoint_callback.best_model_path == ""  # validated on test data: none chosen there
    stage2 = torch.load(fit.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert stage2["clip_reid"] == {**stage1["clip_reid"], "stage": 2,
                                    "stage1_checkpoint": "runs/synthetic_clipreid_stage1/last.ckpt"}
    assert torch.equal(stage2["state_dict"]["prompt_learner.cls_ctx"], stage1["state_dict"]["prompt_learner.cls_ctx"])
    key = "encoder.model.visual.conv1.weight"
    assert not torch.equal(stage2["state_dict"][key], stage1["state_dict"][key])

    last2 = Path(fit.trainer.checkpoint_callback.last_model_path)
    resumed = run_lightning_cli(["fit", *s2[:-1], "--trainer.max_epochs=2", "--ckpt_path", str(last2)])
    resumed.trainer.logger.experiment.finish()
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 4
    assert torch.equal(resumed.model.prompt_learner.cls_ctx, stage1["state_dict"]["prompt_learner.cls_ctx"])

    last2 = resumed.trainer.checkpoint_callback.last_model_path
    assert main(["test", *s2, "--ckpt_path", last2]) == 0
    out = capsys.readouterr().out  # image -> image ReID, the protocol in the key; the checkpoint of epoch 2 of 2
    assert re.search(r"\[test, checkpoint of epoch 2\] test/i2i: R1 [\d.]+ +R5 [\d.]+ +R10 [\d.]+ +mAP [\d.]+", out)
