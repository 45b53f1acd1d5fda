"""CLIP training-step throughput: ``CLIPModule`` under the Lightning ``Trainer`` against open_clip in a plain loop.

    python benchmarks/clip_train_step.py --threads 2                      # tiny CLIP, batch 64, 3 rounds
    python benchmarks/clip_train_step.py --batch-size 8 --steps 2 --warmup 1 --rounds 1   # smoke run

Both modes train the same open_clip model (the inline config of ``configs/model/clip_tiny.yaml``, read at run
time: a 2-layer ViT at 128 x 64 and a 2-layer text transformer, random init, CPU) from the same seed on the
same synthetic in-memory batches (random images, random token ids ending in the end-of-text token, pids),
with AdamW (open_clip's parameter groups: no weight decay on gains, biases, the temperature) and a per-step
cosine learning-rate schedule:

* ``lightning``: ``Trainer.fit`` of a ``reid_lab.modules.clip.CLIPModule`` with the ``clip`` image–text loss
  (what ``reid-lab fit`` runs, logging included; no logger, checkpoints, progress bar or validation), timed
  by a callback from the end of the last warm-up step to the end of the last step.
* ``plain``: open_clip's own training step, located at run time in the installed ``open_clip`` package:
  ``open_clip.model.CLIP(**cfg)`` forward, ``open_clip.loss.ClipLoss``, backward, AdamW step, scheduler step,
  ``logit_scale`` clamped to ``log(100)`` (as open_clip's trainer does), zero_grad.

The first-step losses of both modes are printed: equal losses show both run the same model on the same data.
Target: Lightning's time per step at most 5% above the plain loop's. The modes run interleaved, in reverse
order every other round (ABBA), so drift and position cancel out; the table shows each mode's median steps/s
over the rounds, its spread ((max - min) / median) and the median duration of a single timed step over all
rounds. The verdict uses the ratio of the median step durations: on a shared box another job's burst slows a
few steps of one round, which moves a round's mean rate but hardly the median step (the ratio of the median
rates and the median of per-round ratios are printed too). Only the ratio is meant to carry over between
machines.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import open_clip
import torch
import yaml
from open_clip.loss import ClipLoss

from reid_lab.modules.clip import MAX_LOGIT_SCALE, CLIPModule

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "clip_tiny.yaml"


def tiny_clip_args() -> dict[str, Any]:
    """``CLIPModule`` init args of ``configs/model/clip_tiny.yaml`` (model config, optimiser, learning rate)."""
    return yaml.safe_load(CONFIG.read_text())["model"]["init_args"]


def synthetic_batches(cfg: dict[str, Any], batch_size: int, count: int, num_ids: int, seed: int) -> list[dict]:
    """``count`` training batches: ``image`` ``(B, 3, H, W)``, ``text`` ``(B, L)`` token ids, ``pid`` ``(B,)``."""
    gen = torch.Generator().manual_seed(seed + 1)
    height, width = cfg["vision_cfg"]["image_size"]
    context, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    batches = []
    for _ in range(count):
        text = torch.zeros(batch_size, context, dtype=torch.long)
        lengths = torch.randint(4, context, (batch_size,), generator=gen)
        for row, n in enumerate(lengths.tolist()):  # start token, words, end token (the argmax pooled one)
            text[row, 0] = vocab - 2
            text[row, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=gen)
            text[row, n - 1] = vocab - 1
        batches.append({"image": torch.randn(batch_size, 3, height, width, generator=gen), "text": text,
                        "pid": torch.randint(0, num_ids, (batch_size,), generator=gen)})
    return batches


def loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    """The batches as a DataLoader (already batched, no workers), the same for both modes."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def cosine(total: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class StepTimer(L.Callback):
    """``time.perf_counter()`` at the end of every training batch (after the optimiser step), first loss."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        if self.first_loss is None:
            self.first_loss = float(outputs["loss"])


def steps_per_second(ends: list[float], warmup: int) -> float:
    """Steps per second from the end of step ``warmup`` (1-based) to the end of the last step."""
    if len(ends) <= warmup:
        raise RuntimeError(f"only {len(ends)} steps ran, expected more than the {warmup} warm-up steps")
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def run_lightning(args: argparse.Namespace, init: dict[str, Any], batches: list[dict]) -> tuple[list[float], float]:
    L.seed_everything(args.seed, verbose=False)  # the same initial weights as the plain model
    module = CLIPModule(model_cfg=init["model_cfg"], losses=[{"name": "clip"}], optimizer="adamw", lr=init["lr"],
                        weight_decay=init["weight_decay"], scheduler="cosine", warmup_epochs=0)
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader(batches))
    return timer.ends, timer.first_loss


def run_plain(args: argparse.Namespace, init: dict[str, Any], batches: list[dict]) -> tuple[list[float], float]:
    L.seed_everything(args.seed, verbose=False)
    model = open_clip.model.CLIP(**init["model_cfg"])
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "bias" in name or "logit_scale" in name or "ln" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": init["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=init["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(len(batches)))
    clip_loss = ClipLoss()
    ends: list[float] = []
    first_loss = None
    for batch in loader(batches):
        image_features, text_features, logit_scale = model(batch["image"], batch["text"])
        loss = clip_loss(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        ends.append(time.perf_counter())
        if first_loss is None:
            first_loss = float(loss.detach())
    return ends, first_loss


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every mode")
    parser.add_argument("--num-ids", type=int, default=16, help="identities the synthetic pids are drawn from")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the timer starts at the end of the last warm-up step")

    load = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()
    init = tiny_clip_args()
    cfg = init["model_cfg"]
    batches = synthetic_batches(cfg, args.batch_size, args.warmup + args.steps, args.num_ids, args.seed)
    params = sum(p.numel() for p in open_clip.model.CLIP(**cfg).parameters())
    print(f"open_clip {open_clip.__version__} CLIP from {CONFIG.name} ({params / 1e6:.2f}M parameters, image "
          f"{cfg['vision_cfg']['image_size'][0]}x{cfg['vision_cfg']['image_size'][1]}, context "
          f"{cfg['text_cfg']['context_length']}); batch {args.batch_size}; AdamW lr {init['lr']}; torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; {args.warmup} warm-up + {args.steps} timed steps x "
          f"{args.rounds} rounds", flush=True)

    runs = {"lightning": run_lightning, "plain": run_plain}
    results: dict[str, list[float]] = {name: [] for name in runs}
    step_times: dict[str, list[float]] = {name: [] for name in runs}
    first_losses: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]  # ABBA: cancels drift and order
        for name, run in order:
            ends, first_losses[name] = run(args, init, batches)
            rate = steps_per_second(ends, args.warmup)
            results[name].append(rate)
            step_times[name] += [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:])]
            print(f"round {r + 1}: {name:<10} {rate:>8.3f} steps/s", flush=True)

    medians = {name: statistics.median(values) for name, values in results.items()}
    step = {name: statistics.median(values) for name, values in step_times.items()}
    print(f"\n{'mode':<10} {'steps/s':>9} {'images/s':>9} {'spread':>8} {'median step s':>14}   rounds (steps/s)")
    for name, values in results.items():
        spread = (max(values) - min(values)) / medians[name]
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:<10} {medians[name]:>9.3f} {medians[name] * args.batch_size:>9.1f} {spread:>7.1%} "
              f"{step[name]:>14.4f}   {rounds}")
    print(f"\nfirst-step loss: lightning {first_losses['lightning']:.6f}, plain {first_losses['plain']:.6f}")
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    overhead = step["lightning"] / step["plain"] - 1
    of_rates = medians["plain"] / medians["lightning"] - 1
    paired = statistics.median(p / lt - 1 for lt, p in zip(results["lightning"], results["plain"]))
    verdict = "meets" if overhead <= 0.05 else "misses"
    print(f"lightning overhead: {overhead:+.1%} time per step (median step times; {of_rates:+.1%} from the median "
          f"steps/s, {paired:+.1%} median of per-round ratios); {verdict} the <= 5% target")


if __name__ == "__main__":
    main()
