"""A VLM2Vec-style embedder through the real LightningCLI: fit with GradCache, test (caption -> image), predict."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from reid_lab.data.text.vlm_processor import build_offline_processor
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.features import FeatureSet
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.metrics.rank import evaluate_rank_reference

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def processor(tmp_path_factory, tiny_synthetic):
    from reid_lab.data.text.parsers import load_text_dataset

    corpus = [c for r in load_text_dataset("synthetic", tiny_synthetic).train for c in r.captions]
    return build_offline_processor(tmp_path_factory.mktemp("vlm") / "processor", corpus + ["Find the person "],
                                   vocab_size=300)


def _args(root: Path, tmp: Path, processor: Path) -> list[str]:
    return [
        "--config", str(REPO / "configs/experiments/synthetic_vlm_text2person.yaml"),
        f"--data.init_args.root={root}", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=32", f"--data.init_args.tokenizer.init_args.processor_path={processor}",
        f"--model.init_args.processor_path={processor}", "--model.init_args.grad_cache_chunk=3",
        "--model.init_args.lora={r: 4, dropout: 0.1}",
        "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=2",
        "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        f"--trainer.default_root_dir={tmp}",
    ]


def test_fit_with_grad_cache_then_test_and_predict(tiny_synthetic, tmp_path, cli_argv, processor, capsys):
    args = _args(tiny_synthetic, tmp_path, processor)
    fit = run_lightning_cli(["fit", *args])
    fit.trainer.logger.experiment.finish()
    assert not fit.model.automatic_optimization and fit.trainer.global_step == 2  # one optimiser step per batch
    best = fit.trainer.checkpoint_callback.last_model_path  # validated on the test split: last.ckpt only
    assert fit.trainer.checkpoint_callback.best_model_path == ""
    checkpoint = read_checkpoint(best)
    assert checkpoint["encoder"]["init_args"]["lora"] == {"r": 4, "dropout": 0.1}
    assert checkpoint["embedding_space"]["modalities"] == ["image", "text"]
    test = run_lightning_cli(["test", *args, "--ckpt_path", best])
    test.trainer.logger.experiment.finish()
    metrics = test.trainer.callback_metrics
    epoch = checkpoint["epoch"] + 1  # Lightning stores the 0-based index; lines count epochs from 1
    assert f"[test, checkpoint of epoch {epoch}] test/t2i: R1" in capsys.readouterr().out
    outs = {}
    for modality in ("text", "image"):
        out = tmp_path / f"{modality}.pt"
        cli = run_lightning_cli(["predict", *args, "--ckpt_path", best, f"--data.init_args.predict_modality={modality}",
                                 f"--predict_writer.output={out}"])
        assert cli.trainer.logger is None  # predict opens no logger run
        outs[modality] = FeatureSet.load(out)
    captions, images = outs["text"], outs["image"]
    assert captions.space == images.space and captions.features.shape[1] == 64
    q = torch.nn.functional.normalize(captions.features, dim=1)
    g = torch.nn.functional.normalize(images.features, dim=1)
    reference = evaluate_rank_reference(1 - q @ g.T, captions.pids, images.pids)
    assert float(metrics["test/t2i/R1"]) == pytest.approx(100 * reference.cmc[0], abs=1e-3)
    assert float(metrics["test/t2i/mAP"]) == pytest.approx(100 * reference.mAP, abs=1e-3)


def test_a_caption_tokenizer_with_another_instruction_is_refused(tiny_synthetic, tmp_path, cli_argv, processor):
    with pytest.raises(ValueError, match="differ from the text tower's"):
        run_lightning_cli(["fit", *_args(tiny_synthetic, tmp_path, processor),
                           "--data.init_args.tokenizer.init_args.instruction=Describe: "])


def test_fit_and_test_on_instruction_pairs(tiny_synthetic, tmp_path, cli_argv, processor, capsys):
    """MMEB-style pairs: GradCache training with hard negatives; test/pairs/P@1 equals a per-item recomputation."""
    from reid_lab.data.pairs import load_pairs, synthetic_pairs, write_pairs
    from reid_lab.modules.vlm import VLMEmbeddingModule

    train = write_pairs(synthetic_pairs(tiny_synthetic, num_negatives=1), tmp_path / "train.jsonl")
    test = write_pairs(synthetic_pairs(tiny_synthetic, num_negatives=4, split="test")[:24], tmp_path / "test.jsonl")
    args = ["--config", str(REPO / "configs/experiments/synthetic_vlm_pairs.yaml"),
            f"--data.init_args.train_pairs={train}", f"--data.init_args.test_pairs={test}",
            f"--data.init_args.image_root={tiny_synthetic}", "--data.init_args.batch_size=6",
            "--data.init_args.num_workers=0", f"--model.init_args.processor_path={processor}",
            "--model.init_args.grad_cache_chunk=4", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
            "--trainer.limit_train_batches=2", "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}"]
    fit = run_lightning_cli(["fit", *args])
    fit.trainer.logger.experiment.finish()
    assert fit.model.monitor == "val/pairs/P@1" and "val/pairs/P@1" in fit.trainer.callback_metrics
    # no val_pairs: validation scored the test pairs, so no checkpoint was chosen on them
    assert fit.trainer.checkpoint_callback.best_model_path == ""
    best = fit.trainer.checkpoint_callback.last_model_path
    out = capsys.readouterr().out
    assert "validation (val/pairs/*): the test pairs" in out
    # the setup line: every distinct item prompt of the training pairs, tokenized here by the processor folder
    records = load_pairs(train, image_root=tiny_synthetic)
    from transformers import AutoTokenizer

    from reid_lab.data.text.vlm_processor import item_prompt
    prompts = {item_prompt("reid_lab", i.instruction, i.text, i.image is not None)
               for r in records for i in (r.query, r.target, *r.negatives)}
    longest = max(len(AutoTokenizer.from_pretrained(processor)(p)["input_ids"]) for p in prompts)
    assert (f"pairs (train): {len(records)} pairs, {len(prompts)} distinct item prompts, the longest {longest} tokens"
            in out) and "pair items are embedded whole" in out
    result = run_lightning_cli(["test", *args, "--ckpt_path", best])
    result.trainer.logger.experiment.finish()
    assert re.search(r"\[test, checkpoint of epoch 1\] test/pairs: P@1 [\d.]+ over 24 queries, 5 candidates each "
                     r"\(chance 20\.00\)", capsys.readouterr().out)
    module = VLMEmbeddingModule.load_from_checkpoint(best, map_location="cpu").eval()
    dm = result.datamodule
    hits = 0
    with torch.no_grad():
        for record in load_pairs(test, image_root=tiny_synthetic):
            def one(item):
                from reid_lab.data.pair_datamodule import PairDataset, collate_pairs  # one item, no padding

                row = PairDataset([], dm.test_transform, dm.image_size)._item(item)
                side = collate_pairs([{"query": row, "target": row, "negatives": [], "pid": 0, "index": 0}])["query"]
                return torch.nn.functional.normalize(module.encoder.embed_items(side), dim=1)[0]
            q = one(record.query)
            scores = [float(q @ one(c)) for c in (record.target, *record.negatives)]
            hits += scores[0] > max(scores[1:])
    assert float(result.trainer.callback_metrics["test/pairs/P@1"]) == pytest.approx(100 * hits / 24, abs=1e-3)


def _ddp_step(root: Path, tmp: Path, processor: Path, chunk: int | None) -> dict[str, torch.Tensor]:
    """One 2-rank DDP optimiser step (SGD, lr 1, no weight decay, no dropout): the update is minus the gradient."""
    import os
    import subprocess
    import sys

    tmp.mkdir(parents=True, exist_ok=True)
    args = [a for a in _args(root, tmp, processor) if not a.startswith((
        "--model.init_args.grad_cache_chunk", "--model.init_args.lora", "--trainer.logger"))]
    args += ["--model.init_args.lora={r: 4, dropout: 0.0}", "--model.init_args.optimizer=sgd",
             "--model.init_args.lr=1.0", "--model.init_args.weight_decay=0.0", "--model.init_args.scheduler=none",
             "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0", "--trainer.devices=2",
             "--trainer.strategy=ddp", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
             f"--trainer.logger.init_args.save_dir={tmp}", "--trainer.callbacks=[]",
             "--trainer.enable_checkpointing=true"]
    if chunk is not None:
        args.append(f"--model.init_args.grad_cache_chunk={chunk}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "reid_lab.cli", "fit", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = next(tmp.rglob("*.ckpt"))
    return read_checkpoint(ckpt)["state_dict"]


def test_grad_cache_under_ddp_equals_the_plain_ddp_step(tiny_synthetic, tmp_path, processor):
    """Two gloo ranks, 8 captions + 8 images each, negatives from both ranks: GradCache in chunks of 3 (no_sync
    until the last chunk, then one all-reduce of the accumulated gradients) takes the same SGD step as plain DDP
    on the whole per-rank batch, which all-reduces once after one backward."""
    from reid_lab.modules.vlm import VLMEmbeddingModule  # noqa: F401  (the module class the configs name)

    plain = _ddp_step(tiny_synthetic, tmp_path / "plain", processor, None)
    cached = _ddp_step(tiny_synthetic, tmp_path / "cached", processor, 3)
    trained = [k for k in plain if "lora_" in k or "logit_scale" in k]
    assert trained and set(plain) == set(cached)
    # LoRA's B starts at zero: after the step it is minus its gradient, so the comparison is not of zeros
    assert any(float(plain[k].abs().max()) > 0 for k in trained if "lora_B" in k)
    for key in trained:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)


def test_pair_precision_at_1_of_two_ranks_equals_one_process(tiny_synthetic, tmp_path, cli_argv, processor, capsys):
    """MMEB-style pair evaluation under DDP: 2 gloo ranks each score their own contiguous block of the 23 test
    pairs (6 batches of 4, the last one short) and the hit counts are summed across ranks, so the printed
    Precision@1 and its query count equal one process's on the same checkpoint. Before the counts were reduced,
    each rank would have printed the P@1 of its own half."""
    import os
    import subprocess
    import sys

    from reid_lab.data.pairs import synthetic_pairs, write_pairs

    train = write_pairs(synthetic_pairs(tiny_synthetic, num_negatives=1), tmp_path / "train.jsonl")
    test = write_pairs(synthetic_pairs(tiny_synthetic, num_negatives=4, split="test")[:23], tmp_path / "test.jsonl")
    args = ["--config", str(REPO / "configs/experiments/synthetic_vlm_pairs.yaml"),
            f"--data.init_args.train_pairs={train}", f"--data.init_args.test_pairs={test}",
            f"--data.init_args.image_root={tiny_synthetic}", "--data.init_args.batch_size=6",
            "--data.init_args.eval_batch_size=4", "--data.init_args.num_workers=0",
            f"--model.init_args.processor_path={processor}", "--trainer.accelerator=cpu"]
    fit = run_lightning_cli(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
                             "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.callbacks=[]",
                             f"--trainer.default_root_dir={tmp_path}"])
    ckpt = tmp_path / "trained.ckpt"
    fit.trainer.save_checkpoint(ckpt)
    test_args = ["test", *args, "--ckpt_path", str(ckpt), "--trainer.logger=false", "--trainer.callbacks=[]"]

    def p1_line(output: str) -> str:
        lines = [line for line in output.splitlines() if re.match(r"^\[test[^\]]*\] test/pairs: P@1", line)]
        assert len(lines) == 1, output[-3000:]  # printed once, by rank 0
        return lines[0]

    capsys.readouterr()
    run_lightning_cli([*test_args, "--trainer.devices=1"])
    one = p1_line(capsys.readouterr().out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "reid_lab.cli", *test_args, "--trainer.devices=2",
                           "--trainer.strategy=ddp"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = p1_line(done.stdout + done.stderr)
    assert "over 23 queries, 5 candidates each" in one
    assert one == two


def test_the_divergence_guard_reads_each_grad_cache_step_loss_not_its_chunk_surrogates(tiny_synthetic, tmp_path,
                                                                                       cli_argv, processor):
    """GradCache back-propagates one surrogate scalar per chunk (rep · rep.grad); the guard (on by default) must
    see the step's loss instead: one value per step, equal to the logged train/loss. Reading the surrogates
    stopped a sound run of synthetic_vlm_pairs.yaml at step 1 (a first surrogate of 9e-7 made the loss of 28
    look like an explosion)."""
    from reid_lab.modules.guards import DivergenceGuard

    args = [a for a in _args(tiny_synthetic, tmp_path, processor) if not a.startswith("--trainer.logger")]
    fit = run_lightning_cli(["fit", *args, "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
                             "--trainer.logger=false", "--trainer.callbacks=[]"])
    guard = next(c for c in fit.trainer.callbacks if isinstance(c, DivergenceGuard))
    assert fit.trainer.global_step == 3
    assert len(guard._recent) == 3  # 3 steps x 3 chunks of 3 (batch 8): surrogates would have filled the window of 5
    assert guard._recent[-1] == pytest.approx(float(fit.trainer.callback_metrics["train/loss"]), rel=1e-6)
    assert all(v > 1.0 for v in guard._recent)  # InfoNCE over 8 candidates starts near ln 8 = 2.08


def test_bf16_mixed_grad_cache_step_follows_the_fp32_step(tiny_synthetic, tmp_path, cli_argv, processor):
    """The Trainer's bf16-mixed precision (CPU autocast here; the same path as on a GPU) through GradCache: one SGD
    step at lr 1 from the same initialisation, LoRA dropout off. LoRA's B starts at zero, so after the step it is
    minus the gradient: bf16 must give the fp32 gradient's direction (cosine > 0.99; bf16 keeps ~3 significant
    digits) and a loss within 2 %. A dtype slip (fp32 pixels into a bf16 tower, the loss in bf16) breaks it."""
    def step(precision: str) -> tuple[float, torch.Tensor]:
        args = [a for a in _args(tiny_synthetic, tmp_path / precision, processor)
                if not a.startswith(("--model.init_args.lora", "--trainer.logger"))]
        fit = run_lightning_cli(["fit", *args, "--model.init_args.lora={r: 4, dropout: 0.0}",
                                 "--model.init_args.optimizer=sgd", "--model.init_args.lr=1.0",
                                 "--model.init_args.weight_decay=0.0", "--model.init_args.scheduler=none",
                                 "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
                                 "--trainer.logger=false", "--trainer.callbacks=[]",
                                 f"--trainer.precision={precision}"])
        b = torch.cat([p.detach().float().flatten() for n, p in fit.model.named_parameters() if "lora_B" in n])
        return float(fit.trainer.callback_metrics["train/loss"]), b

    loss32, b32 = step("32-true")
    loss16, b16 = step("bf16-mixed")
    assert b32.abs().max() > 0 and torch.isfinite(b16).all()
    assert loss16 != loss32 and not torch.equal(b16, b32)  # bf16 did run: rounding moved both
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert float(torch.nn.functional.cosine_similarity(b16, b32, dim=0)) > 0.99
