"""`make demo`: the whole reid_lab story on the built-in synthetic dataset, on CPU.

1. Build (or reuse) the synthetic Market-1501-format dataset (`reid-lab synth`).
2. Score the raw-pixel baseline: flattened pixels + cosine distance, Market-1501 protocol.
3. Run the upgrade study `experiments/synthetic_upgrade.yaml` (`reid-lab upgrade`): an old ImageNet
   EfficientNet-Lite0 fine-tuned on half of the identities, then a new ImageNet MobileNetV2 fine-tuned on all
   of them, independently, with BCT (4 and 8 epochs), RACT and BT², plus FastFill on top of the independent model; compatibility
   matrix, backfill curves and flips. The printed labels name the backbones the study config trains.
4. Print R1 / mAP / mINP of the trained old model next to the raw-pixel baseline, the study table, and
   where the wandb runs, checkpoints and report are.

Every stage is cached or resumable: a second `make demo` only re-prints the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reid_lab.data.synthetic import generate_synthetic
from reid_lab.studies.raw_pixels import raw_pixel_baseline
from reid_lab.studies.study import Study, StudyConfig

REPO = Path(__file__).resolve().parents[1]

# Printed names of the backbones the demo may train; any other backbone is printed as configured.
BACKBONE_NAMES = {
    "mobilenet_v2": "MobileNetV2",
    "timm:tf_efficientnet_lite0": "EfficientNet-Lite0",
    "timm:efficientnet_lite0": "EfficientNet-Lite0",
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
}


def model_label(study: Study, stage: str) -> str:
    """``ImageNet MobileNetV2`` etc.: the backbone (and init) the study trains for ``stage`` (old / new)."""
    config = study.config
    spec = config.old if stage == "old" else config.new
    cfg = study.compose(list(spec.get("configs") or []), dict(spec.get("overrides") or {}))
    args = dict((cfg.get("model") or {}).get("init_args") or {})
    args.update((config.scenario.old_model if stage == "old" else config.scenario.new_model) or {})
    backbone = str(args.get("backbone"))
    name = BACKBONE_NAMES.get(backbone, backbone)
    return f"ImageNet {name}" if args.get("pretrained") == "imagenet" else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--study", type=Path, default=REPO / "experiments" / "synthetic_upgrade.yaml")
    parser.add_argument("--ids", type=int, default=300)
    parser.add_argument("--cameras", type=int, default=6)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    t0 = time.perf_counter()
    manifest = generate_synthetic(args.data, num_ids=args.ids, num_cameras=args.cameras, seed=0)
    print(f"[demo] synthetic dataset at {args.data}: {manifest['counts']} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    raw = raw_pixel_baseline(args.data)
    print(f"[demo] raw-pixel baseline: R1 {raw['R1']:.1f}  mAP {raw['mAP']:.1f}  mINP {raw['mINP']:.1f} "
          f"({time.perf_counter() - t0:.1f} s)")

    config = StudyConfig.load(args.study)
    study = Study(config)
    old_label, new_label = model_label(study, "old"), model_label(study, "new")
    summary = study.run()
    matrix = summary["matrix"]
    out = config.out

    def cell(q: str, g: str) -> str:
        return "  ".join(f"{m} {matrix.cell(q, g, m):5.1f}" for m in ("R1", "mAP", "mINP"))

    print("\n================ reid_lab demo ================")
    rows = [("raw pixels (cosine)", "  ".join(f"{m} {raw[m]:5.1f}" for m in ("R1", "mAP", "mINP"))),
            (f"old {old_label}, half the identities", cell("old", "old"))]
    for method in config.trained_methods:
        rows.append((f"new {new_label} [{method:>11}] self-test", cell(method, method)))
        rows.append((f"new {new_label} [{method:>11}] new->old ", cell(method, "old")))
    width = max(len(label) for label, _ in rows) + 2
    for label, values in rows:
        print(f"{label:<{width}}{values}")
    results = summary["results"]  # the study's one record: the same decisions as report.md / report.html
    print(f"claim rule: {results.rule.describe(results.metric)}")
    print("claims: " + ", ".join(f"{m.method} {m.claim.short if m.claim else 'n/a'}" for m in results.methods)
          + " (written into the checkpoint and feature file of each trained method that passes)")
    print(f"report:      {out / 'report.md'} (+ report.html, PNG plots, report.json)")
    for version in ["old", *config.trained_methods]:
        done = json.loads((out / "train" / version / "done.json").read_text())
        print(f"{version:>12}: checkpoint {done['checkpoint']}")
    if (out / "wandb").is_dir():
        print(f"wandb runs:  {out / 'wandb'} (one per stage + the report; upload: wandb sync {out / 'wandb'}/offline-run-*)")
    print(f"total demo time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
