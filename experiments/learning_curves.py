"""Learning curves on the synthetic set: val R1 / mAP after every epoch, for a pretrained and a random-init BoT.

Each recipe is one real LightningCLI ``fit`` (as a study stage trains) on ``configs/data/synthetic.yaml`` at
96x48, batches of 32 (8 ids x 4 images), all training identities, the CPU schedule of the demo
(``configs/trainer/cpu_demo.yaml``: Adam 1e-3, half an epoch of warm-up, cosine decay that reaches its end
at the last epoch of the run, so a longer run is a different schedule, not a continuation). Validation on
the test split (query vs gallery) runs after every epoch and a CSVLogger writes it to ``metrics.csv``; one
``validate`` of the initial weights gives the epoch-0 point. Recipes:

* ``mobilenetv2_imagenet``: ImageNet MobileNetV2 BoT (``configs/model/bot_mobilenetv2.yaml``), the demo's
  new-model recipe;
* ``r18_random``: random-init ResNet-18 BoT (``configs/model/bot_r18.yaml``), same trainer and schedule.

Writes ``<out>/curves.json`` (epochs, R1, mAP, mINP per recipe, seconds per epoch, load average, the
command) and a PNG of both curves against epochs with the raw-pixel baseline and the demo's 4-epoch budget
marked. A recipe whose ``curves.json`` entry has the same settings is not trained again, so a rerun only
re-plots; a killed recipe starts over (runs are minutes long)::

    python experiments/learning_curves.py --epochs 3
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from reid_lab.atomic import atomic_write_text
from reid_lab.lightning_cli import run_lightning_cli
from reid_lab.studies.raw_pixels import raw_pixel_baseline
from reid_lab.studies.stage_keys import code_version, file_digest

REPO = Path(__file__).resolve().parents[1]
DEMO_EPOCHS = 4  # experiments/synthetic_upgrade.yaml trains every model for 4 epochs
METRICS = ("R1", "mAP", "mINP")
VAL_PREFIXES = ("val/i2i/", "val/")  # the key of ReID validation, then its legacy form (older metrics.csv files)

RECIPES: dict[str, dict[str, Any]] = {
    "mobilenetv2_imagenet": {
        "label": "ImageNet MobileNetV2 BoT",
        "configs": ["configs/data/synthetic.yaml", "configs/model/bot_mobilenetv2.yaml",
                    "configs/trainer/cpu_demo.yaml"],
    },
    "r18_random": {
        "label": "random-init ResNet-18 BoT",
        "configs": ["configs/data/synthetic.yaml", "configs/model/bot_r18.yaml", "configs/trainer/cpu_demo.yaml"],
    },
}


def recipe_overrides(data: Path, epochs: int, limit_train_batches: int | None) -> dict[str, Any]:
    """The demo's data settings (96x48, batch 32, all training ids) and an evaluation after every epoch."""
    overrides: dict[str, Any] = {
        "data.init_args.root": str(data),
        "data.init_args.image_size": [96, 48],
        "data.init_args.padding": 6,
        "data.init_args.batch_size": 32,
        "trainer.max_epochs": epochs,
        "trainer.check_val_every_n_epoch": 1,
    }
    if limit_train_batches is not None:
        overrides["trainer.limit_train_batches"] = limit_train_batches
    return overrides


def compose(configs: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge config files (later ones win) and dotted overrides, as ``Study.compose`` does."""
    merged = OmegaConf.create({})
    for path in configs:
        merged = OmegaConf.merge(merged, OmegaConf.load(REPO / path))
    for key, value in overrides.items():
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    return OmegaConf.to_container(merged, resolve=True)


def read_val_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """``{epoch: {"R1": ..., "mAP": ..., "mINP": ...}}`` from a CSVLogger ``metrics.csv``.

    The CSVLogger writes one row per logging call with every column seen so far, empty where the call did not
    log that key; the rows holding ``val/i2i/mAP`` (image -> image ReID validation; ``val/mAP`` in files
    written before keys named their protocol) are the validation ends. ``epoch`` is Lightning's 0-based
    ``current_epoch``, so the row of epoch ``e`` is the model after ``e + 1`` training epochs. A metric missing
    from the file is left out of the row.
    """
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            prefix = next((p for p in VAL_PREFIXES if row.get(f"{p}mAP")), None)
            if prefix is None:
                continue
            values = {m: float(row[f"{prefix}{m}"]) for m in METRICS if row.get(f"{prefix}{m}")}
            rows.setdefault(int(float(row["epoch"])), {}).update(values)
    return rows


class LoadSampler:
    """Samples the 1-minute load average every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 15.0) -> None:
        self.interval, self.samples = interval, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": round(max(self.samples), 2),
                "samples": len(self.samples)}


class EpochClock(Callback):
    """Wall time of every training epoch, split into the train loop and the validation that ends it.

    (Lightning's ``Timer`` keeps only the last validation's span, and its train span includes validation.)
    Validation runs before ``on_train_epoch_end``, so the train part is the epoch's span minus its validation.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.validate_seconds: list[float] = []
        self._epoch_start = self._val_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validate_seconds.append(time.perf_counter() - self._val_start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def summary(self) -> dict[str, float]:
        """Mean seconds per epoch: ``train`` (train loop), ``validate``, ``epoch`` (both)."""
        n = len(self.epoch_seconds)
        val = sum(self.validate_seconds[-n:]) if n else 0.0
        total = sum(self.epoch_seconds)
        return {"epoch": round(total / max(n, 1), 1), "validate": round(val / max(n, 1), 1),
                "train": round((total - val) / max(n, 1), 1)}


def train_recipe(name: str, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Validate the initial weights, then fit with a CSVLogger; returns the curves and timings."""
    if run_dir.exists():  # a killed run: start over (no mid-run resume)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    trainer = cfg["trainer"]
    trainer.update({
        "default_root_dir": str(run_dir),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        # by import path, as LightningCLI builds every callback (``__main__`` when run as a script)
        "callbacks": [{"class_path": f"{EpochClock.__module__}.{EpochClock.__qualname__}"}],
    })
    curves: dict[int, dict[str, float]] = {}
    for stage in ("validate", "fit"):
        trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                             "init_args": {"save_dir": str(run_dir), "name": "", "version": stage}}
        config_path = run_dir / f"config.{stage}.yaml"
        atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
        args = [stage, "--config", str(config_path)] + (["--ckpt_path", "random"] if stage == "validate" else [])
        print(f"[learning curves] {name}: {stage} ({cfg['trainer']['max_epochs']} epochs)", flush=True)
        start = time.perf_counter()
        cli = run_lightning_cli(args)
        seconds = time.perf_counter() - start
        rows = read_val_metrics(Path(cli.trainer.logger.log_dir) / "metrics.csv")
        if stage == "validate":
            curves[0] = rows[0]
            validate_seconds = seconds
        else:
            epochs = cli.trainer.current_epoch
            if epochs < int(trainer["max_epochs"]):
                raise RuntimeError(f"{name} stopped early at epoch {epochs}")
            curves.update({epoch + 1: values for epoch, values in rows.items()})
            clock = next(c for c in cli.trainer.callbacks if isinstance(c, EpochClock)).summary()
    order = sorted(curves)
    return {
        "epochs": order,
        **{m: [round(curves[e][m], 2) for e in order] for m in METRICS},
        "seconds": {
            "fit": round(seconds, 1),
            "initial_validate": round(validate_seconds, 1),
            "train_per_epoch": clock["train"],  # the train loop, validation excluded
            "validate_per_epoch": clock["validate"],
            "per_epoch": clock["epoch"],
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """R1 and mAP against epochs for every recipe, raw pixels as a line, the demo's budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    raw = result["raw_pixels"]
    for ax, metric in zip(axes, ("R1", "mAP")):
        for name, entry in result["recipes"].items():
            ax.plot(entry["epochs"], entry[metric], marker="o", markersize=3, label=RECIPES[name]["label"])
        ax.axhline(raw[metric], color="grey", linestyle=":", label=f"raw pixels ({raw[metric]:.1f})")
        ax.axvline(DEMO_EPOCHS, color="black", linestyle="--", linewidth=0.8, label=f"demo budget ({DEMO_EPOCHS} ep.)")
        ax.set_xlabel("epoch (cosine schedule ends at the last one)")
        ax.set_ylabel(f"val {metric} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Synthetic set, 96x48, batch 8x4, Adam 1e-3 cosine (configs/trainer/cpu_demo.yaml)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Measured on the shared 2-core machine (load average ~6): an ImageNet MobileNetV2 epoch (78 steps of 32) took
    # 899 s plus 107 s of validation; a 12-step timing at load ~3 gave 4-5 s per step for either recipe. 3 epochs
    # is what fit one session there, not a plateau; a curve that flattens needs more (--epochs 12 or beyond).
    parser.add_argument("--epochs", type=int, default=3, help="epochs per recipe; the cosine schedule spans them")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "learning_curves")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "learning_curves.png",
                        help="a copy of the plot (the README's); <out>/learning_curves.png is always written")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="a smoke run: batches per epoch")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"no synthetic dataset at {args.data}: reid-lab synth --out {args.data} --ids 300 "
                         "--cameras 6 --seed 0")
    command = shlex.join(["python", "experiments/learning_curves.py", *(sys.argv[1:] if argv is None else argv)])
    curves_path = args.out / "curves.json"
    result = json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    data_digest = file_digest(args.data / "manifest.json")
    if result.get("data_manifest") != data_digest or "raw_pixels" not in result:
        raw = raw_pixel_baseline(args.data)
        result = {"data_manifest": data_digest, "raw_pixels": {m: round(float(raw[m]), 2) for m in METRICS},
                  "recipes": {}}
    result.setdefault("recipes", {})
    for name in args.recipes:
        recipe = RECIPES[name]
        cfg = compose(recipe["configs"], recipe_overrides(args.data, args.epochs, args.limit_train_batches))
        settings = {"configs": recipe["configs"], "config_digests": [file_digest(REPO / p) for p in recipe["configs"]],
                    "resolved": cfg}
        entry = result["recipes"].get(name)
        if entry and entry.get("settings") == json.loads(json.dumps(settings)):
            print(f"[learning curves] {name}: done earlier ({entry['epochs'][-1]} epochs), re-plotting only")
            continue
        with LoadSampler() as load:
            curves = train_recipe(name, json.loads(json.dumps(cfg)), args.out / name)
        result["recipes"][name] = {"label": recipe["label"], **curves, "loadavg_1min": load.summary(),
                                   "command": command, "code_version": code_version(),
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings}
        atomic_write_text(curves_path, json.dumps(result, indent=1))  # one finished recipe survives a later kill
    result["recipes"] = {n: result["recipes"][n] for n in RECIPES if n in result["recipes"]}
    atomic_write_text(curves_path, json.dumps(result, indent=1))
    plot(result, args.out / "learning_curves.png")
    if args.plot.resolve() != (args.out / "learning_curves.png").resolve():
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "learning_curves.png", args.plot)
    raw = result["raw_pixels"]
    print(f"[learning curves] raw pixels: R1 {raw['R1']:.1f}  mAP {raw['mAP']:.1f}")
    for entry in result["recipes"].values():
        points = "  ".join(f"{e}: {r1:.1f}/{ap:.1f}" for e, r1, ap in zip(entry["epochs"], entry["R1"], entry["mAP"]))
        s = entry["seconds"]
        print(f"[learning curves] {entry['label']} (epoch: R1/mAP) {points}")
        print(f"{'':>18} {s['per_epoch']} s/epoch ({s['train_per_epoch']} train + {s['validate_per_epoch']} val), "
              f"load average {entry['loadavg_1min']['mean']} (max {entry['loadavg_1min']['max']})")
    print(f"[learning curves] {curves_path}, {args.plot}")
    return 0 if all(math.isfinite(v) for e in result["recipes"].values() for v in e["mAP"]) else 1


if __name__ == "__main__":
    sys.exit(main())
