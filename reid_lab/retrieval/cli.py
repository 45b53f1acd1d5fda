"""``reid-lab index build | search``: faiss gallery indexes from feature files.

Examples::

    reid-lab index build --features gallery.pt --kind hnsw --m 32 --out runs/index-hnsw
    reid-lab index search --index runs/index-hnsw --queries query.pt --k 10 --out results.json
    reid-lab index search --index runs/index-hnsw --queries query.pt --exact gallery.pt --out results.json

``build`` indexes the gallery rows of a feature file (``--split all`` for every row); ``search`` searches
with its query rows (``--split all`` for every row), refusing a gallery of another embedding space unless a
verified compatibility claim allows it or ``--allow-unverified`` is given.

``search`` reports R1, R@k, P@k and mAP@k under the protocol of the data, named in the table's header: when
the feature files carry camids (ReID protocol) the hits with the query's pid and camera are junk, dropped
before ranking as ``reid_lab.metrics.evaluate_rank`` does; without camids (cross-modal protocol) nothing is
dropped. With ``--k`` = the gallery size R1 and mAP@k are ``evaluate_rank``'s R1 and mAP; with a smaller ``--k``
mAP@k is the truncated AP of the top-k list (``reid_lab.metrics.topk``). Queries without a positive in the
gallery are skipped; when none has one (a gallery of one identity under the ReID protocol) the metrics are
undefined and ``search`` says so and exits 2.

With ``--exact FILE`` (the feature file the index was built from, checked against the items, ids, space and,
for flat / hnsw indexes, vectors that the index recorded) ``search`` also runs exact brute-force search (chunked
torch matrix multiply) and reports the index's neighbour overlap with it (``overlap@1`` / ``overlap@k``: the
share of the exact top-k neighbours that the index returns, what ANN benchmarks call recall; not the retrieval
R@k) and the queries/s of both. Bad input (also a feature file with NaN or infinite rows) ends with a one-line
error and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import IncompatibleSpacesError
from reid_lab.retrieval.index import DEVICES, KINDS, GalleryIndex, l2_normalize, torch_search
from reid_lab.retrieval.search import (
    PROTOCOL_DESCRIPTIONS,
    SearchResult,
    neighbour_overlap_at_k,
    search_features,
)

PROG = "reid-lab index"


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``reid-lab index`` argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="Build and search faiss gallery indexes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,search}")

    build = sub.add_parser("build", help="index the gallery rows of a feature file")
    build.add_argument("--features", required=True, type=Path, help="feature file (.pt, FeatureSet.save)")
    build.add_argument("--split", choices=("gallery", "all"), default="gallery",
                       help="rows to index: is_query == False (default) or all")
    build.add_argument("--kind", choices=KINDS, default="flat", help="faiss index kind (default: flat)")
    build.add_argument("--nlist", type=int, help="ivf/ivfpq: number of k-means cells (default 4 sqrt(N))")
    build.add_argument("--nprobe", type=int, help="ivf/ivfpq: cells visited per query (default min(nlist, 32))")
    build.add_argument("--m", type=int, help="hnsw: links per node (default 32)")
    build.add_argument("--ef-construction", type=int, help="hnsw: build beam width (default 80)")
    build.add_argument("--ef-search", type=int, help="hnsw: search beam width (default 64)")
    build.add_argument("--pq-m", type=int, help="ivfpq: sub-quantisers, must divide the dimension")
    build.add_argument("--device", choices=DEVICES, default="auto", help="faiss device (default: auto)")
    build.add_argument("--out", required=True, type=Path, help="index folder to write")

    search = sub.add_parser("search", help="search an index with the query rows of a feature file")
    search.add_argument("--index", required=True, type=Path, help="index folder (reid-lab index build)")
    search.add_argument("--queries", required=True, type=Path, help="feature file (.pt, FeatureSet.save)")
    search.add_argument("--split", choices=("query", "all"), default="query",
                        help="rows to search with: is_query == True (default) or all")
    search.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--nprobe", type=int, help="ivf/ivfpq: override the stored nprobe")
    search.add_argument("--ef-search", type=int, help="hnsw: override the stored ef_search")
    search.add_argument("--device", choices=DEVICES, default="cpu", help="faiss device (default: cpu)")
    search.add_argument("--out", required=True, type=Path, help="results file: .json or .pt")
    search.add_argument("--allow-unverified", action="store_true",
                        help="search even without a verified compatibility claim between the spaces")
    search.add_argument("--exact", type=Path,
                        help="feature file the index was built from: also run exact torch search on it and "
                             "report the index's neighbour overlap@1/@k with it and its queries/s")
    search.add_argument("--exact-split", choices=("gallery", "all"), default="gallery",
                        help="rows of --exact that were indexed, as in build --split (default: gallery)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``reid-lab index``; returns the exit code (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:  # argparse has printed usage and the error
        return int(exit_.code or 0)
    try:
        if args.command == "build":
            return _build(args)
        return _search(args)
    except (UsageError, IncompatibleSpacesError, FileNotFoundError, ValueError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


def _load_features(path: Path, split: str) -> FeatureSet:
    if not path.is_file():
        raise UsageError(f"feature file {path} does not exist")
    try:
        features = FeatureSet.load(path)
    except ValueError as err:
        raise UsageError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on foreign files
        raise UsageError(f"{path} is not a reid_lab feature file ({type(err).__name__}: {err})") from err
    if features.features.ndim != 2:
        raise UsageError(f"{path}: features must be a (N, D) matrix, got shape {tuple(features.features.shape)}")
    bad = torch.nonzero(~torch.isfinite(features.features).all(dim=1)).flatten()
    if len(bad):
        raise UsageError(f"{path} holds NaN or infinite features in {len(bad)} of {len(features.features)} rows "
                         f"(first: row {int(bad[0])}, {features.items[int(bad[0])]!r}); every row must be finite")
    if split == "all":
        return features
    query, gallery = features.split()
    chosen = query if split == "query" else gallery
    if len(chosen.paths) == 0:
        raise UsageError(f"{path} has no {split} rows (is_query is all {split != 'query'}); use --split all")
    return chosen


def _build(args: argparse.Namespace) -> int:
    features = _load_features(args.features, args.split)
    names = ("nlist", "nprobe", "m", "ef_construction", "ef_search", "pq_m")
    params = {key: getattr(args, key) for key in names if getattr(args, key) is not None}
    for key, value in params.items():
        if value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {value}")
    start = time.perf_counter()
    try:
        index = GalleryIndex.build(features, args.kind, device=args.device, **params)
    except ValueError as err:
        raise UsageError(f"cannot build the {args.kind} index from {args.features}: {err}") from err
    seconds = time.perf_counter() - start
    index.save(args.out)
    print(f"indexed {index.ntotal} x {index.dim} vectors of {args.features} ({args.split} rows, space "
          f"{index.space.get('space_id', '<unknown>')!r}) as {args.kind} {_params(index)} in {seconds:.2f} s "
          f"-> {args.out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    if args.out.suffix not in (".json", ".pt"):
        raise UsageError(f"--out must end in .json or .pt, got {args.out}")
    index = GalleryIndex.load(args.index, device=args.device)
    queries = _load_features(args.queries, args.split)
    if queries.features.shape[1] != index.dim:
        raise UsageError(f"queries in {args.queries} have dim {queries.features.shape[1]} but the index "
                         f"{args.index} holds {index.dim}-d vectors")
    if not 1 <= args.k <= index.ntotal:
        raise UsageError(f"--k {args.k} must be between 1 and the gallery size {index.ntotal} of {args.index}")
    if args.nprobe is not None or args.ef_search is not None:
        index.set_search_params(nprobe=args.nprobe, ef_search=args.ef_search)
    gallery = _exact_source(args, index) if args.exact is not None else None
    start = time.perf_counter()
    try:
        result = search_features(index, queries, args.k, allow_unverified=args.allow_unverified)
    except IncompatibleSpacesError as err:
        raise UsageError(f"queries {args.queries} vs index {args.index}: {err} "
                         "(on the command line: --allow-unverified)") from err
    except ValueError as err:
        raise UsageError(f"queries {args.queries} vs index {args.index}: {err}") from err
    seconds = time.perf_counter() - start
    metrics = result.metrics()
    if metrics.get("num_valid_queries", 1.0) == 0:
        raise UsageError(_no_valid_query(args, index, result))
    if gallery is not None:
        metrics = {**_exact_comparison(args, queries, gallery, result.ids, seconds), **metrics}
    result.save(args.out)
    _print_summary(args, index, result, seconds, metrics)
    return 0


def _no_valid_query(args: argparse.Namespace, index: GalleryIndex, result: SearchResult) -> str:
    identities = len(torch.unique(index.pids[index.pids >= 0]))
    positive = "an item of its pid from another camera" if result.protocol == "reid" else "an item of its pid"
    return (f"no valid query: none of the {len(result.ids)} queries of {args.queries} has a positive in the "
            f"gallery of {args.index} ({positive}; the gallery holds {identities} "
            f"identit{'y' if identities == 1 else 'ies'}), so R1 and mAP are undefined; nothing written")


def _exact_source(args: argparse.Namespace, index: GalleryIndex) -> FeatureSet:
    """The ``--exact`` rows, refused unless they are the rows the index was built from."""
    gallery = _load_features(args.exact, args.exact_split)
    mismatch = index.source_mismatch(gallery)
    if mismatch is not None:
        raise UsageError(f"--exact {args.exact} ({args.exact_split} rows) is not the file the index {args.index} "
                         f"was built from: {mismatch}; pass the file and --exact-split it was built from")
    return gallery


def _exact_comparison(args: argparse.Namespace, queries: FeatureSet, gallery: FeatureSet, ids: torch.Tensor,
                      seconds: float) -> dict[str, float]:
    """Exact top-k of the queries over the ``--exact`` rows; the index's neighbour overlap with it and the speeds."""
    q, g = l2_normalize(queries.features), l2_normalize(gallery.features)
    start = time.perf_counter()
    _, exact = torch_search(q, g, args.k)
    exact_seconds = time.perf_counter() - start
    n = len(queries.paths)
    return {
        "overlap@1": neighbour_overlap_at_k(ids, exact, 1),
        f"overlap@{args.k}": neighbour_overlap_at_k(ids, exact, args.k),
        "exact queries/s": n / max(exact_seconds, 1e-9),
        "speed-up": exact_seconds / max(seconds, 1e-9),
    }


def _cutoff_note(k: int, num_gallery: int, result: SearchResult) -> str:
    """What R1 and mAP@k mean at this ``k``; names the queries whose whole top-k list was junk."""
    if k >= num_gallery:
        return f"k = gallery size: R1 and mAP@{k} are evaluate_rank's R1 and mAP."
    note = (f"k < gallery size {num_gallery}: metrics of the top-{k} list after junk removal; mAP@{k} is the "
            f"truncated AP@{k} (Google Landmarks v2), not evaluate_rank's mAP (that needs --k {num_gallery}).")
    if result.num_positives is not None:
        all_junk = int((result.junk().all(dim=1) & (result.num_positives > 0)).sum())
        if all_junk:
            note += f" {all_junk} queries had only junk in their top {k} and count as R1 misses; raise --k."
    return note


def _params(index: GalleryIndex) -> str:
    shown = {k: v for k, v in index.params.items() if k not in ("train_size", "device")}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


def _print_summary(args: argparse.Namespace, index: GalleryIndex, result: SearchResult, seconds: float,
                   metrics: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    num_query = len(result.ids)
    protocol = "ReID protocol" if result.protocol == "reid" else "cross-modal protocol"
    table = Table(title=f"{num_query} queries x {index.ntotal} gallery, {index.kind} index, {protocol}")
    for column in ("queries/s", *metrics):
        table.add_column(column, justify="right")
    row = [f"{num_query / max(seconds, 1e-9):,.0f}"]
    for key, v in metrics.items():
        if key in ("num_valid_queries", "exact queries/s"):
            row.append(f"{v:,.0f}")
        elif key == "speed-up":
            row.append(f"{v:.2f}x")
        elif key.startswith("overlap@"):
            row.append(f"{v:.3f}")
        else:
            row.append(f"{v:.2f}")
    table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    console.print(f"{PROTOCOL_DESCRIPTIONS[result.protocol]}.", soft_wrap=True)
    if "R1" in metrics:
        console.print(_cutoff_note(args.k, index.ntotal, result), soft_wrap=True)
    if any(key.startswith("overlap@") for key in metrics):
        console.print("overlap@k: neighbour overlap with exact search (share of the exact top-k the index returns), "
                      "not the retrieval R@k")
    console.print(f"wrote top-{args.k} results to {args.out}")
