"""The ``reid-lab`` command: the project's own subcommands, else the LightningCLI.

``reid-lab fit | validate | test | predict`` runs :mod:`reid_lab.lightning_cli`; ``synth``, ``upgrade``,
``index`` and ``vlm-processor`` are plain argparse programs of their own layers, dispatched before LightningCLI starts.
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

# LightningCLI's own help lists only fit / validate / test / predict; ``reid-lab --help`` adds these.
PROJECT_COMMANDS_HELP = """
reid_lab commands (each has its own --help):
  synth      generate a synthetic ReID dataset (a Market-1501 tree): reid-lab synth --out data/synthetic
  upgrade    run a whole compatible-upgrade study in resumable stages: reid-lab upgrade --config study.yaml
  index      build and search faiss gallery indexes over saved features: reid-lab index build ...
  baseline   raw-pixel (and untrained backbone) R1 / mAP of a dataset, before any training:
             reid-lab baseline --config configs/data/folder.yaml --backbone mobilenet_v2 --pretrained imagenet
  export     a checkpoint's image embedder as ONNX (dynamic batch) or TorchScript, with a parity check:
             reid-lab export --ckpt_path model.ckpt --format onnx --out model.onnx
  visualize  ranked lists (query + top-k, marked correct / junk / wrong / distractor) as PNG + HTML:
             reid-lab visualize --ckpt_path model.ckpt --worst 50 --out reports/ranked
             reid-lab visualize --study reports/synthetic_upgrade --method bct --worst 30
  merge-features  one feature file from the per-rank parts of a multi-node `predict` (order and space kept):
             reid-lab merge-features predictions/features.rank*-of-8.pt --out predictions/features.pt
  report     one self-contained HTML page of an upgrade study: reid-lab report --study reports/synthetic_upgrade
  pairs      write MMEB-style instruction pairs (caption->person, person->person, person->caption) of a
             synthetic set: reid-lab pairs --root data/synthetic --split train --negatives 1
             (hard negatives mined from a model's features: --negative-sampling mined --features f.pt --margin 0.95)
  vlm-processor  write a small offline Qwen2-VL processor (BPE on a dataset's captions) for VLM embedders:
             reid-lab vlm-processor --out data/vlm_processor --root data/synthetic
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reid-lab`` console script."""
    import os

    # Idle OpenMP threads sleep instead of spinning: on a shared box spinning threads fight other jobs for the
    # cores (benchmarks/README.md, busy-machine runs). Read when torch loads, i.e. after this line.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(SUBCOMMANDS[argv[0]](argv[1:]) or 0)
    from reid_lab.lightning_cli import CheckpointUnreadable, RunFolderTaken, run_lightning_cli
    from reid_lab.modules.guards import TrainingDiverged
    from reid_lab.run_lock import FolderInUse

    top_level_help = not argv or argv[0] in ("-h", "--help")
    try:
        run_lightning_cli(argv)
    except SystemExit as exit_:
        if top_level_help:  # after LightningCLI's usage (or its "expected a subcommand" error)
            print(PROJECT_COMMANDS_HELP, file=sys.stdout if not exit_.code else sys.stderr)
        raise
    # the messages say which file or folder and what to do; a traceback adds nothing
    except CheckpointUnreadable as error:  # a bad argument, as argparse exits for one
        print(error, file=sys.stderr)
        return 2
    except (TrainingDiverged, FolderInUse, RunFolderTaken) as error:
        print(error if str(error).startswith("reid-lab") else f"reid-lab: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
