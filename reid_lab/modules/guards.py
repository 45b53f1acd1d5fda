"""Training guards: stop a diverging run at once, before its weights or its checkpoints are spoiled.

:class:`DivergenceGuard` is a Lightning callback that looks at every training loss in
``on_before_backward``, i.e. before the backward pass and the optimiser step that a bad loss would poison:

* a non-finite loss (NaN / inf) stops training at that step;
* an exploding loss (on by default, ``explosion_factor``) stops training when the loss exceeds
  ``explosion_factor`` times a reference: the smallest running median (over ``window`` steps) of the losses
  seen so far, never below ``min_reference`` (a reference of ~0, e.g. a hinge loss on easy batches, must
  not make every ordinary loss look like an explosion).

Under manual optimisation (GradCache) ``backward`` runs on per-chunk surrogate scalars (``rep · rep.grad``), not
on the training loss, so the hook does nothing there; such a module calls :func:`check_training_loss` with its
real loss after computing it and before any backward pass (:class:`~reid_lab.modules.vlm.VLMEmbeddingModule`
does). Reading the surrogates instead would stop a sound run (a first surrogate of ~1e-6 makes the next one an
"explosion") or let a real explosion through.

Either raises :class:`TrainingDiverged`, whose message names the global step, the epoch, the loss and its
logged parts, the learning rate(s) and the last checkpoint written before the divergence. Lightning then
ends the run (``on_exception``): no checkpoint is written after the divergent step, and ``reid-lab`` exits
with a non-zero status.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

from lightning.pytorch.callbacks import Callback

__all__ = ["DivergenceGuard", "TrainingDiverged", "check_training_loss"]


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite or exploded; the message says where and what to do."""


class DivergenceGuard(Callback):
    """Stop training on a non-finite or exploding loss, before the step that would apply it.

    Args:
        explosion_factor: stop when ``loss > explosion_factor * reference``; ``None`` turns the explosion
            check off (non-finite losses always stop training).
        window: number of recent steps whose median is a candidate reference (robust to one easy batch).
        min_reference: lower bound of the reference, so a loss that was ~0 does not make any loss an
            "explosion".

    The check reads one scalar per step (``float(loss)``, a device sync on GPU). In distributed training
    the decision is shared by all ranks, so every rank stops together.
    """

    def __init__(self, explosion_factor: float | None = 1e3, window: int = 5, min_reference: float = 1e-2) -> None:
        if explosion_factor is not None and not explosion_factor > 1:
            raise ValueError(f"explosion_factor must be > 1 (or null to turn the check off), got {explosion_factor}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not min_reference > 0:
            raise ValueError(f"min_reference must be > 0, got {min_reference}")
        self.explosion_factor = explosion_factor
        self.window = window
        self.min_reference = min_reference
        self._recent: deque[float] = deque(maxlen=window)
        self.reference: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # A new fit starts afresh; a resumed one gets its state back afterwards (load_state_dict).
        self._recent.clear()
        self.reference = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if pl_module.automatic_optimization:
            self.check(trainer, loss)
        # manual optimisation: the module reports its loss itself (check_training_loss), see the module docstring

    def check(self, trainer, loss) -> None:
        """Check one step's training loss; raise :class:`TrainingDiverged` if it is non-finite or exploded."""
        value = float(loss.detach())
        problem = None
        if not math.isfinite(value):
            problem = f"the training loss is {value}"
        elif self.explosion_factor is not None and self.reference is not None:
            bound = self.explosion_factor * max(self.reference, self.min_reference)
            if value > bound:
                problem = (
                    f"the training loss exploded: {value:.4g} > {self.explosion_factor:g} x {self.reference:.4g} "
                    f"(the smallest running median of the {self.window} previous losses; "
                    f"explosion_factor={self.explosion_factor:g})"
                )
        if trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            raise TrainingDiverged(_message(trainer, problem or "another rank's training loss diverged"))
        self._recent.append(value)
        median = statistics.median(self._recent)
        self.reference = median if self.reference is None else min(self.reference, median)

    def state_dict(self) -> dict:
        return {"recent": list(self._recent), "reference": self.reference}

    def load_state_dict(self, state_dict: dict) -> None:
        self._recent = deque(state_dict.get("recent", []), maxlen=self.window)
        self.reference = state_dict.get("reference")


def check_training_loss(trainer, loss) -> None:
    """Give one step's training loss to every :class:`DivergenceGuard` of ``trainer``: for modules with manual
    optimisation, called after the loss is computed and before any backward pass of the step."""
    for callback in trainer.callbacks:
        if isinstance(callback, DivergenceGuard):
            callback.check(trainer, loss)


def _message(trainer, problem: str) -> str:
    parts = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("train/") and getattr(value, "numel", lambda: 1)() == 1
    }
    lines = [
        f"training diverged at global step {trainer.global_step} (epoch {trainer.current_epoch + 1}, "
        f"batch {trainer.fit_loop.epoch_loop.batch_idx}): {problem}; training stopped before this step's "
        f"backward pass and optimiser step.",
    ]
    if parts:
        lines.append("  logged loss parts: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(parts.items())))
    lrs = sorted({group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups})
    if lrs:
        lines.append("  learning rate(s) at this step: " + ", ".join(f"{lr:.3g}" for lr in lrs))
    lines.append("  " + _last_good_checkpoint(trainer))
    lines.append("  Lower the learning rate (or check the data and the loss weights), then rerun; "
                 "resume from the checkpoint above to keep the good epochs.")
    return "\n".join(lines)


def _last_good_checkpoint(trainer) -> str:
    callback = trainer.checkpoint_callback
    if callback is None:
        return "no checkpoint callback: no checkpoint was written."
    found = []
    for kind in ("last_model_path", "best_model_path"):
        path = getattr(callback, kind, "")
        if path and Path(path).is_file() and path not in found:
            found.append(path)
    if not found:
        return "last good checkpoint: none written before the divergence."
    return "last good checkpoint(s), written before the divergence: " + ", ".join(found)
