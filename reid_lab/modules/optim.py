"""Optimisers and per-step learning-rate schedules shared by the embedding modules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(kind: str, groups: Iterable[dict[str, Any]], lr: float, momentum: float = 0.9):
    """``adam`` / ``adamw`` / ``sgd`` over parameter ``groups`` (each with its own lr / weight decay)."""
    groups = list(groups)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")


def lr_schedule(
    kind: str,
    max_epochs: int,
    milestones: list[int],
    gamma: float,
    warmup_epochs: float,
    warmup_factor: float,
    steps_per_epoch: int = 1,
):
    """Learning-rate multiplier per optimiser step: linear warm-up, then multistep or cosine decay.

    Epoch quantities (``warmup_epochs``, ``milestones``, ``max_epochs``) are converted with
    ``steps_per_epoch``, so the warm-up ramps smoothly over its steps (fast-reid warms up per iteration) and
    short CPU schedules do not lose a whole epoch at 1% of the learning rate.
    """
    if kind not in ("multistep", "cosine", "none"):
        raise ValueError(f"scheduler must be one of multistep, cosine, none; got {kind!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        if epoch < warmup_epochs:
            alpha = epoch / warmup_epochs
            return warmup_factor * (1 - alpha) + alpha
        if kind == "multistep":
            return gamma ** sum(epoch >= m for m in milestones)
        if kind == "cosine":
            span = max(1e-8, max_epochs - warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup_epochs) / span)))
        return 1.0

    return factor


def per_step_scheduler(module, optimizer, kind: str, milestones: list[int], gamma: float, warmup_epochs: float,
                       warmup_factor: float, default_epochs: int = 10) -> dict:
    """Lightning's ``lr_scheduler`` entry: :func:`lr_schedule` on every parameter group, stepped per optimiser
    step, with the trainer's ``max_epochs`` and steps per epoch (``default_epochs`` without a trainer)."""
    trainer = module._trainer
    max_epochs = trainer.max_epochs if trainer is not None and trainer.max_epochs else default_epochs
    total_steps = trainer.estimated_stepping_batches if trainer is not None else max_epochs
    steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
    schedule = lr_schedule(kind, max_epochs, milestones, gamma, warmup_epochs, warmup_factor,
                           steps_per_epoch=steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
    return {"scheduler": scheduler, "interval": "step"}
