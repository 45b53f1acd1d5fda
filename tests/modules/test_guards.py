"""DivergenceGuard on real Trainer fits of a ResNet-18 ReIDModule over the tiny synthetic set."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.modules.checkpointing import EmbeddingCheckpoint
from reid_lab.modules.guards import DivergenceGuard, TrainingDiverged
from reid_lab.modules.reid import ReIDModule

pytestmark = pytest.mark.slow


class LossRecorder(Callback):
    """Records ``(global_step, epoch, loss)`` of every step that reaches the backward pass hook."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, int, float]] = []
        self.weights: list[torch.Tensor] = []  # all parameters, flattened, as they were at that step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.losses.append((trainer.global_step, trainer.current_epoch, float(loss.detach())))
        self.weights = [torch.cat([p.detach().flatten() for p in pl_module.parameters()])]


def _fit(root, tmp_path, guard, *, optimizer="adam", lr=3.5e-4, max_epochs=1, limit_train_batches=5,
         checkpoint=False, **module_kw):
    L.seed_everything(0)
    dm = ReIDDataModule(dataset="synthetic", root=str(root), image_size=(64, 32), batch_size=8, num_instances=2,
                        eval_batch_size=64, num_workers=0)
    module = ReIDModule(backbone="resnet18", num_classes=dm.num_classes, optimizer=optimizer, lr=lr,
                        losses=[{"name": "ce", "epsilon": 0.1}, {"name": "triplet", "margin": 0.3}],
                        **{"scheduler": "none", "warmup_epochs": 0, **module_kw})
    recorder = LossRecorder()
    callbacks = [recorder, *([guard] if guard is not None else [])]
    if checkpoint:
        callbacks.append(EmbeddingCheckpoint(dirpath=str(tmp_path / "ckpt")))
    trainer = L.Trainer(
        max_epochs=max_epochs, limit_train_batches=limit_train_batches, accelerator="cpu", logger=False,
        enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1.0 if checkpoint else 0, callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    error = None
    try:
        trainer.fit(module, dm)
    except TrainingDiverged as err:
        error = err
    module.weights_at_last_step = recorder.weights[-1]
    return trainer, module, recorder.losses, error


def _weights_unchanged_since_last_step(module) -> None:
    now = torch.cat([p.detach().flatten() for p in module.parameters()])
    torch.testing.assert_close(now, module.weights_at_last_step, rtol=0, atol=0, equal_nan=True)


def test_nan_loss_stops_training_at_its_step(tiny_synthetic, tmp_path):
    # SGD at lr 1e6 reaches a NaN loss inside epoch 0; the explosion check is off to see the NaN check alone.
    trainer, module, losses, error = _fit(tiny_synthetic, tmp_path, DivergenceGuard(explosion_factor=None),
                                          optimizer="sgd", lr=1e6)
    assert error is not None, f"training went on through a non-finite loss: {losses}"
    bad = [(step, epoch) for step, epoch, loss in losses if not math.isfinite(loss)]
    step, epoch = bad[0]
    assert epoch == 0 and losses[-1][0] == step  # nothing ran after the first non-finite loss
    message = str(error)
    assert f"global step {step} (epoch 1," in message and "loss is nan" in message  # epochs count from 1
    assert re.search(r"train/ce=nan", message) and "train/triplet=" in message
    assert "learning rate(s) at this step: 1e+06" in message
    assert "no checkpoint was written" in message  # this fit has no checkpoint callback
    # Stopped before the backward pass and the optimiser step: the NaN loss changed no weight.
    assert trainer.global_step == step
    _weights_unchanged_since_last_step(module)


def test_explosion_guard_stops_adam_at_lr_1e6(tiny_synthetic, tmp_path):
    # Adam at lr 1e6 stays finite (loss ~5 -> ~1e9 -> ~1e13), so only the explosion guard (default) stops it.
    trainer, module, losses, error = _fit(tiny_synthetic, tmp_path, DivergenceGuard(), lr=1e6,
                                          limit_train_batches=3)
    assert error is not None, f"an exploding run was not stopped: {losses}"
    assert all(math.isfinite(loss) for _, _, loss in losses)
    first_loss, (step, _, loss) = losses[0][2], losses[-1]
    assert loss > 1e3 * first_loss and step == 1
    assert f"global step {step} (epoch 1," in str(error) and "exploded" in str(error)
    assert trainer.global_step == step
    _weights_unchanged_since_last_step(module)


def test_last_good_checkpoint_is_named_and_nothing_is_saved_after(tiny_synthetic, tmp_path):
    # Epoch 0 trains at lr 1e-3; the multistep schedule then multiplies the lr by 1e9 (lr 1e6 from epoch 1).
    trainer, module, losses, error = _fit(
        tiny_synthetic, tmp_path, DivergenceGuard(), lr=1e-3, max_epochs=3, limit_train_batches=3,
        checkpoint=True, scheduler="multistep", milestones=[1], gamma=1e9,
    )
    assert error is not None, f"an exploding run was not stopped: {losses}"
    assert losses[-1][1] == 1  # stopped in epoch 1, after epoch 0's checkpoint
    # validated on the test split (no held-out identities): last.ckpt only, no checkpoint chosen on test data
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and last["global_step"] == 3
    assert str(Path(tmp_path / "ckpt" / "last.ckpt")) in str(error)


def test_normal_run_passes_with_the_guard_on(tiny_synthetic, tmp_path):
    guard = DivergenceGuard()
    trainer, module, losses, error = _fit(tiny_synthetic, tmp_path, guard, max_epochs=2, limit_train_batches=3)
    assert error is None and trainer.global_step == 6 and len(losses) == 6
    # The reference is the smallest median of the last `window` (5) losses, over every step seen.
    values = [loss for _, _, loss in losses]
    assert guard.reference == pytest.approx(min(statistics.median(values[max(0, i - 4): i + 1])
                                                for i in range(len(values))))
