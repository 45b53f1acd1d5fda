"""Training-step throughput: ``ReIDModule`` under the Lightning ``Trainer`` against a hand-written PyTorch loop.

    python benchmarks/train_throughput.py --backbone resnet18 --image-size 64 32 --batch-size 32 \
        --steps 8 --warmup 2 --workers 0 2                                       # CPU smoke run
    python benchmarks/train_throughput.py --backbone resnet50 --image-size 256 128 --batch-size 64 \
        --device cuda --precision bf16 --channels-last --workers 4 8 --steps 50  # one GPU, BoT setting

Modes, all on the same model config, the same synthetic data and the same PK batches:

* ``lightning``: ``Trainer.fit`` of a ``ReIDModule`` with a ``ReIDDataModule`` (what ``reid-lab fit`` runs);
  timed by a callback from the end of the last warm-up step to the end of the last step.
* ``plain``: a hand-written loop over ``dm.train_dataloader()``: ``module.model`` forward,
  ``module.compute_losses``, backward, the module's own optimiser step, zero_grad. Target:
  ``lightning / plain >= 0.95``.
* ``compute``: the plain loop on one pre-loaded batch repeated: the compute ceiling without data loading.
* ``data w=N``: the training DataLoader alone (JPEG decode + BoT augmentation) with N worker processes. If
  it is above ``compute`` the data pipeline is not the bottleneck.

The modes run interleaved, in reverse order every other round (lightning, plain, compute, data...; then
data..., compute, plain, lightning; ...), so drift and position cancel out. The table shows each mode's
median images/s over the rounds and its spread ((max - min) / median); a noisy machine shifts every mode
alike, and only the ratios are meant to carry over between machines. The synthetic set is
generated once under ``benchmarks/.cache/`` (about 15 s on two cores) unless ``--data`` names one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.synthetic import generate_synthetic
from reid_lab.modules.reid import ReIDModule

CACHE = Path(__file__).resolve().parent / ".cache"
SYNTHETIC = {"num_ids": 200, "num_cameras": 6, "seed": 0, "image_size": (128, 64), "train_fraction": 0.8,
             "num_distractors": 0, "num_junk": 0}
"""Market-like 128x64 JPEGs, 160 training identities (about 2,900 images: 45 batches of 64 per epoch)."""


class StepTimer(L.Callback):
    """Records ``time.perf_counter()`` at the end of every training batch (after the optimiser step)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.ends: list[float] = []
        self.images: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sync()
        self.ends.append(time.perf_counter())
        self.images.append(batch["image"].shape[0])


class ChannelsLastReIDModule(ReIDModule):
    """``ReIDModule`` whose batches are made channels-last on the device, as the plain loop makes them."""

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch


def images_per_second(ends: list[float], images: list[int], warmup: int) -> float:
    """Images per second from the end of step ``warmup`` (1-based) to the end of the last step."""
    if len(ends) <= warmup:
        raise RuntimeError(f"only {len(ends)} steps ran, expected more than the {warmup} warm-up steps")
    return sum(images[warmup:]) / (ends[-1] - ends[warmup - 1])


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def make_datamodule(args: argparse.Namespace, num_workers: int) -> ReIDDataModule:
    return ReIDDataModule(dataset="synthetic", root=str(args.data), image_size=tuple(args.image_size),
                          batch_size=args.batch_size, num_instances=args.num_instances, num_workers=num_workers,
                          seed=args.seed)


def make_module(args: argparse.Namespace, num_classes: int) -> ReIDModule:
    L.seed_everything(args.seed, verbose=False)  # identical initial weights in every mode and round
    cls = ChannelsLastReIDModule if args.channels_last else ReIDModule
    return cls(backbone=args.backbone, num_classes=num_classes)


def autocast(args: argparse.Namespace, device: torch.device):
    """The autocast Lightning's ``bf16-mixed`` opens around ``training_step``; a no-op in fp32."""
    if args.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_lightning(args: argparse.Namespace, device: torch.device, num_classes: int) -> float:
    dm = make_datamodule(args, args.train_workers)
    module = make_module(args, num_classes)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)  # Trainer's .to(device) preserves the format
    timer = StepTimer(make_sync(device))
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        benchmark=device.type == "cuda" or None,
        use_distributed_sampler=False,  # the PK sampler shards itself, as in the configs
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    result = images_per_second(timer.ends, timer.images, args.warmup)
    del trainer, module, dm
    return result


def train_steps(args: argparse.Namespace, device: torch.device, module: ReIDModule, optimizer: torch.optim.Optimizer,
                images: torch.Tensor, pids: torch.Tensor) -> None:
    """One hand-written training step."""
    images = images.to(device, non_blocking=True)
    pids = pids.to(device, non_blocking=True)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(args, device):
        outputs = module.model(images)
        loss, _ = module.compute_losses(outputs, pids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def prepare_plain(args: argparse.Namespace, device: torch.device, num_classes: int):
    module = make_module(args, num_classes).to(device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    module.train()
    config = module.configure_optimizers()
    return module, config["optimizer"], config["lr_scheduler"]["scheduler"]


def run_plain(args: argparse.Namespace, device: torch.device, num_classes: int) -> float:
    dm = make_datamodule(args, args.train_workers)
    module, optimizer, scheduler = prepare_plain(args, device, num_classes)
    loader = dm.train_dataloader()
    sync, total = make_sync(device), args.warmup + args.steps
    ends: list[float] = []
    images: list[int] = []
    epoch = 0
    while len(ends) < total:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            train_steps(args, device, module, optimizer, batch["image"], batch["pid"])
            sync()
            ends.append(time.perf_counter())
            images.append(batch["image"].shape[0])
            if len(ends) == total:
                break
        else:
            scheduler.step()  # per epoch, like the module's "interval: epoch"
        epoch += 1
    del loader, module, optimizer, dm
    return images_per_second(ends, images, args.warmup)


def run_compute(args: argparse.Namespace, device: torch.device, num_classes: int) -> float:
    dm = make_datamodule(args, 0)
    batch = next(iter(dm.train_dataloader()))
    images, pids = batch["image"].to(device), batch["pid"].to(device)
    module, optimizer, _ = prepare_plain(args, device, num_classes)
    sync = make_sync(device)
    ends: list[float] = []
    for _ in range(args.warmup + args.steps):
        train_steps(args, device, module, optimizer, images, pids)
        sync()
        ends.append(time.perf_counter())
    del module, optimizer
    return images_per_second(ends, [images.shape[0]] * len(ends), args.warmup)


def run_data(args: argparse.Namespace, num_workers: int) -> float:
    loader = make_datamodule(args, num_workers).train_dataloader()
    total = args.warmup + args.steps
    ends: list[float] = []
    images: list[int] = []
    epoch = 0
    while len(ends) < total:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            ends.append(time.perf_counter())
            images.append(batch["image"].shape[0])
            if len(ends) == total:
                break
        epoch += 1
    del loader
    return images_per_second(ends, images, args.warmup)


def ensure_data(args: argparse.Namespace) -> None:
    if args.data is None:
        size = "x".join(map(str, SYNTHETIC["image_size"]))
        args.data = CACHE / f"synthetic-{SYNTHETIC['num_ids']}ids-{size}-seed{SYNTHETIC['seed']}"
        started = time.perf_counter()
        manifest = generate_synthetic(args.data, **SYNTHETIC, workers=min(4, os.cpu_count() or 1))
        print(f"data: {args.data} ({manifest['counts']['train_images']} training images, "
              f"ready in {time.perf_counter() - started:.1f} s)", flush=True)


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-instances", type=int, default=4, help="K of the PK sampler")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every mode")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to time")
    parser.add_argument("--train-workers", type=int, help="workers of the lightning/plain loader (default: "
                        "the largest --workers)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--data", type=Path, help="a synthetic set (default: generated under benchmarks/.cache)")
    parser.add_argument("--modes", nargs="+", default=["lightning", "plain", "compute", "data"],
                        choices=["lightning", "plain", "compute", "data"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the timer starts at the end of the last warm-up step")
    if args.train_workers is None:
        args.train_workers = max(args.workers)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    load = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what benchmark=True sets for the Trainer
    quiet_lightning()
    ensure_data(args)
    num_classes = make_datamodule(args, 0).num_classes
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting = (f"{args.backbone} {args.image_size[0]}x{args.image_size[1]} batch {args.batch_size} "
               f"(P={args.batch_size // args.num_instances} x K={args.num_instances}), {num_classes} classes; "
               f"{device_name}, precision {args.precision}{', channels_last' if args.channels_last else ''}; "
               f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; train loader workers "
               f"{args.train_workers}; {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds")
    print(setting, flush=True)

    runs: dict[str, Callable[[], float]] = {}
    if "lightning" in args.modes:
        runs["lightning"] = lambda: run_lightning(args, device, num_classes)
    if "plain" in args.modes:
        runs["plain"] = lambda: run_plain(args, device, num_classes)
    if "compute" in args.modes:
        runs["compute"] = lambda: run_compute(args, device, num_classes)
    if "data" in args.modes:
        for w in args.workers:
            runs[f"data w={w}"] = lambda w=w: run_data(args, w)
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]  # ABBA: cancels drift and order
        for name, run in order:
            results[name].append(run())
            gc.collect()  # let finished loaders shut their workers down before the next mode
            print(f"round {r + 1}: {name:<10} {results[name][-1]:>9,.1f} images/s", flush=True)

    medians = {name: statistics.median(values) for name, values in results.items()}
    print_table(args, results, medians, load)


def print_table(args: argparse.Namespace, results: dict[str, list[float]], medians: dict[str, float],
                load: tuple[float, float, float]) -> None:
    plain = medians.get("plain")
    print(f"\n{'mode':<12} {'images/s':>10} {'spread':>8} {'vs plain':>9}   rounds")
    for name, values in results.items():
        spread = (max(values) - min(values)) / medians[name]
        ratio = f"{medians[name] / plain:>8.3f}x" if plain else f"{'-':>9}"
        rounds = " ".join(f"{v:,.1f}" for v in values)
        print(f"{name:<12} {medians[name]:>10,.1f} {spread:>7.1%} {ratio}   {rounds}")
    print(f"\nprecision {args.precision}{' channels_last' if args.channels_last else ''} on {args.device}; "
          f"torch threads {torch.get_num_threads()}; load average at start "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    if "lightning" in results and "plain" in results:
        paired = statistics.median(a / b for a, b in zip(results["lightning"], results["plain"]))
        verdict = "meets" if medians["lightning"] / medians["plain"] >= 0.95 else "misses"
        print(f"lightning / plain: {medians['lightning'] / medians['plain']:.3f} (ratio of medians), "
              f"{paired:.3f} (median of per-round ratios); {verdict} the >= 0.95 target")
    data = {name: m for name, m in medians.items() if name.startswith("data")}
    if data and "compute" in medians:
        for name, m in data.items():
            state = "not the bottleneck" if m >= medians["compute"] else "the bottleneck"
            print(f"{name}: loading alone is {m / medians['compute']:.2f}x the compute ceiling: {state}")


if __name__ == "__main__":
    main()
