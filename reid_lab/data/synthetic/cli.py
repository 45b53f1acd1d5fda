"""``reid-lab synth``: generate a synthetic ReID set from the command line and print a summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reid_lab.data.synthetic.writer import MANIFEST, generate_synthetic


def build_parser() -> argparse.ArgumentParser:
    """The ``synth`` argument parser (also usable as a sub-parser by the main CLI)."""
    parser = argparse.ArgumentParser(
        prog="reid-lab synth",
        description="Write a Market-1501-format tree of procedurally drawn people, with CUHK-PEDES captions.",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="dataset root (Market folders go directly here)"
    )
    parser.add_argument("--ids", type=int, default=300, help="number of identities (default: 300)")
    parser.add_argument("--cameras", type=int, default=6, help="number of cameras, 2..9 (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    parser.add_argument(
        "--images-per-id",
        type=int,
        nargs=2,
        default=(12, 24),
        metavar=("MIN", "MAX"),
        help="images per identity (default: 12 24)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(128, 64),
        metavar=("H", "W"),
        help="image size (default: 128 64)",
    )
    parser.add_argument(
        "--train-fraction", type=float, default=0.5, help="fraction of training ids (default: 0.5)"
    )
    parser.add_argument(
        "--distractors", type=int, default=200, help="pid-0 gallery distractors (default: 200)"
    )
    parser.add_argument("--junk", type=int, default=100, help="pid -1 junk gallery images (default: 100)")
    parser.add_argument("--workers", type=int, default=0, help="drawing processes, 0 = this one (default: 0)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing set made with other parameters"
    )
    return parser


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``; unchanged after a call means the set was reused, not rewritten."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    """Run ``reid-lab synth``; returns the process exit code (0 on success, 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    manifest_path = args.out / MANIFEST
    before = _identity(manifest_path)
    started = time.perf_counter()
    try:
        manifest = generate_synthetic(
            args.out,
            num_ids=args.ids,
            num_cameras=args.cameras,
            seed=args.seed,
            image_size=tuple(args.size),
            images_per_id=tuple(args.images_per_id),
            train_fraction=args.train_fraction,
            num_distractors=args.distractors,
            num_junk=args.junk,
            workers=args.workers,
            force=args.force,
        )
    except (ValueError, FileExistsError) as err:
        print(f"reid-lab synth: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    counts = manifest["counts"]
    reused = before is not None and _identity(manifest_path) == before
    print(
        f"synthetic ReID set at {args.out} (generator v{manifest['version']})\n"
        f"  ids: {counts['train_ids']} train / {counts['test_ids']} test; cameras: {manifest['parameters']['num_cameras']}\n"
        f"  images: {counts['train_images']} train, {counts['query_images']} query, "
        f"{counts['gallery_images']} gallery (incl. {counts['distractors']} distractors, {counts['junk']} junk)\n"
        f"  captions: {counts['captions']} in reid_raw.json"
    )
    if reused:
        print(
            f"  reused the existing set ({seconds:.2f} s); pass --force with other parameters to regenerate"
        )
    else:
        print(
            f"  {counts['images']} images in {seconds:.1f} s ({counts['images'] / max(seconds, 1e-9):.0f} images/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
