"""The ``reid-lab`` command (also ``python -m reid_lab``): the project's own subcommands, else the LightningCLI.

``reid-lab fit | validate | test | predict`` runs :mod:`reid_lab.lightning_cli`; ``synth``, ``upgrade``,
``index``, ``export`` ... are plain argparse programs of their own layers, dispatched before LightningCLI starts
(options spelled with dashes). ``reid-lab --help`` is the overview of :func:`overview`: every command on one
line and the encoders a run can pick.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _synth(argv: list[str]) -> int:
    from reid_lab.data.synthetic import main

    return main(argv)


def _upgrade(argv: list[str]) -> int:
    from reid_lab.studies.study import main

    return main(argv)


def _index(argv: list[str]) -> int:
    from reid_lab.retrieval.cli import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from reid_lab.modules.export import main

    return main(argv)


def _pairs(argv: list[str]) -> int:
    from reid_lab.data.pairs import main

    def load_features(path: str):  # feature files live a layer above data: hand their reader down
        from reid_lab.embedding.features import FeatureSet

        return FeatureSet.load(path)

    return main(argv, load_features=load_features)


def _baseline(argv: list[str]) -> int:
    from reid_lab.studies.baseline import main

    return main(argv)


def _visualize(argv: list[str]) -> int:
    from reid_lab.studies.visualize import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from reid_lab.studies.html_report import main

    return main(argv)


def _merge_features(argv: list[str]) -> int:
    import argparse

    from reid_lab.embedding.features import merge_feature_files

    parser = argparse.ArgumentParser(prog="reid-lab merge-features", description="Merge the per-rank parts of a "
                                     "distributed `reid-lab predict` (<stem>.rank<k>-of-<W>.pt) into one file.")
    parser.add_argument("parts", nargs="+", help="every part, e.g. predictions/features.rank*-of-4.pt")
    parser.add_argument("--out", required=True, help="the merged feature file")
    args = parser.parse_args(argv)
    merged = merge_feature_files(args.parts)
    print(f"merged {len(args.parts)} parts: {len(merged.items)} embeddings to {merged.save(args.out)}")
    return 0


def _vlm_processor(argv: list[str]) -> int:
    from reid_lab.data.text.vlm_processor import main

    return main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"synth": _synth, "upgrade": _upgrade, "index": _index,
                                                      "vlm-processor": _vlm_processor, "baseline": _baseline,
                                                      "pairs": _pairs, "export": _export,
                                                      "visualize": _visualize, "report": _report,
                                                      "merge-features": _merge_features}

# The LightningCLI commands, then the project's own: one line each (what it does), then an example.
LIGHTNING_COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("train a model (logs, checkpoints and the resolved config in its run folder)",
            "reid-lab fit --config configs/experiments/synthetic_bot_r18.yaml"),
    "validate": ("rank the validation query / gallery with a checkpoint",
                 "reid-lab validate --config <config> --ckpt_path <ckpt>"),
    "test": ("rank the test query / gallery with a checkpoint (R1, mAP, mINP)",
             "reid-lab test --config <config> --ckpt_path <ckpt>"),
    "predict": ("embed a split into a feature file (embeddings, ids, camids, paths, embedding space)",
                "reid-lab predict --config <config> --ckpt_path <ckpt> --predict_writer.output f.pt"),
}
PROJECT_COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("generate a synthetic ReID dataset (a Market-1501 tree, with captions)",
              "reid-lab synth --out data/synthetic"),
    "upgrade": ("run a whole compatible-upgrade study in resumable stages",
                "reid-lab upgrade --config experiments/synthetic_upgrade.yaml"),
    "baseline": ("raw-pixel (and untrained backbone) R1 / mAP of a dataset, before any training",
                 "reid-lab baseline --config configs/data/synthetic.yaml --backbone mobilenet_v2 --pretrained imagenet"),
    "index": ("build and search faiss gallery indexes over feature files",
              "reid-lab index build --features f.pt --kind hnsw --out indexes/gallery"),
    "export": ("a checkpoint's image embedder as ONNX or TorchScript, with a parity check",
               "reid-lab export --ckpt-path model.ckpt --format onnx --out model.onnx"),
    "visualize": ("ranked lists (query + top-k, marked correct / junk / wrong) as PNG + HTML",
                  "reid-lab visualize --ckpt-path model.ckpt --worst 50 --out reports/ranked"),
    "report": ("one self-contained HTML page of an upgrade study",
               "reid-lab report --study reports/synthetic_upgrade"),
    "merge-features": ("one feature file from the per-rank parts of a multi-node predict",
                       "reid-lab merge-features predictions/f.rank*-of-8.pt --out predictions/f.pt"),
    "pairs": ("MMEB-style instruction pairs (caption->person, person->person, ...) of a synthetic set",
              "reid-lab pairs --root data/synthetic --split train --negatives 1"),
    "vlm-processor": ("write a small offline Qwen2-VL processor (BPE on a dataset's captions)",
                      "reid-lab vlm-processor --out data/vlm_processor --root data/synthetic"),
}
# What ``--model`` can be (``class_path``) and what a ReID model's ``backbone`` can be; tests keep these lists
# equal to reid_lab.modules' EmbeddingModule subclasses and reid_lab.models.backbones.BACKBONE_NAMES (listed
# here rather than imported so that ``reid-lab --help`` does not load torch).
MODEL_CLASSES: dict[str, str] = {
    "reid_lab.modules.ReIDModule": "CNN / ViT ReID model (backbone + pooling + BNNeck)",
    "reid_lab.modules.CLIPReIDModule": "CLIP-ReID: prompt learning then image-encoder fine-tuning",
    "reid_lab.modules.clip.CLIPModule": "CLIP-style dual encoder (open_clip towers) for text-to-person",
    "reid_lab.modules.vlm.VLMEmbeddingModule": "VLM2Vec-style embedder (Qwen2-VL with pooling)",
}
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet50_ibn_a", "mobilenet_v2", "timm:<model_name>",
                               "clip:<open_clip model name>", "clip")
PRETRAINED = "mobilenet_v2, timm:efficientnet_lite0, timm:tf_efficientnet_lite0"


def overview() -> str:
    """``reid-lab --help``: every command on one line, then the encoders a run can pick."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS])) + 2

    def rows(commands: dict[str, tuple[str, str]]) -> list[str]:
        return [f"  {name:<{width}}{what}\n  {'':<{width}}  {example}" for name, (what, example) in commands.items()]

    models = [f"  {path:<41} {what}" for path, what in MODEL_CLASSES.items()]
    return "\n".join([
        "usage: reid-lab <command> [options]        reid-lab <command> --help: that command's options",
        "",
        "Person ReID and multi-modal embeddings with compatible model upgrades, on PyTorch Lightning.",
        "",
        "training and evaluation (LightningCLI: repeat --config to stack configs/ files, dotted overrides last,",
        "--print_config shows the resolved config):",
        *rows(LIGHTNING_COMMANDS),
        "",
        "project commands:",
        *rows(PROJECT_COMMANDS),
        "",
        "encoders (--model <class_path>; `reid-lab fit --model.help <class_path>` lists its options):",
        *models,
        f"  ReID backbones (--model.init_args.backbone): {', '.join(BACKBONES)}",
        f"  ImageNet weights from installed packages (--model.init_args.pretrained imagenet): {PRETRAINED}",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reid-lab`` console script."""
    import os

    # Idle OpenMP threads sleep instead of spinning: on a shared box spinning threads fight other jobs for the
    # cores (benchmarks/README.md, busy-machine runs). Read when torch loads, i.e. after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(SUBCOMMANDS[argv[0]](argv[1:]) or 0)
    # our own overview: LightningCLI's lists only its four commands, with their descriptions cut off
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from reid_lab.data.sampler import TooFewIdentities
    from reid_lab.lightning_cli import CheckpointUnreadable, RunFolderTaken, run_lightning_cli
    from reid_lab.modules.guards import TrainingDiverged
    from reid_lab.run_lock import FolderInUse

    try:
        run_lightning_cli(argv)
    # the messages say which file or folder and what to do; a traceback adds nothing
    except CheckpointUnreadable as error:  # a bad argument, as argparse exits for one
        print(error, file=sys.stderr)
        return 2
    except TooFewIdentities as error:  # a data option that cannot work, found before anything ran
        print(f"reid-lab {argv[0]}: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, FolderInUse, RunFolderTaken) as error:
        print(error if str(error).startswith("reid-lab") else f"reid-lab: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
