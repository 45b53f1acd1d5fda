"""Benchmark: text → image evaluation (cross-modal protocol) at a 100k+ gallery, chunked engine vs full argsort.

    .venv/bin/python benchmarks/text_to_image_eval.py                       # 2,000 captions x 100,000 images x 256
    .venv/bin/python benchmarks/text_to_image_eval.py --queries 200 --gallery 5000 --repeat 1   # seconds

Data: random unit embeddings with planted identities. ``gallery / images_per_id`` identity centres (Gaussian,
unit); each gallery image is ``normalize(centre + noise * n / sqrt(dim))`` and each caption query the same
around a randomly drawn gallery identity, so the caption's own images are its positives (``images_per_id`` per
query), a same-identity cosine is about ``1 / (1 + noise^2)`` (0.2 at the default 2.0) and other pairs
0 ± 1/sqrt(dim). Every child regenerates them from ``--seed`` (identical on CPU); generation is not timed.

Implementations, each in a fresh subprocess (``_harness.py``), same threads:

* ``reid_lab``: :func:`reid_lab.metrics.evaluate_features` with ``q_camids = g_camids = None`` (the cross-modal
  protocol ``CLIPModule`` evaluates with: no camera filtering, every same-pid image a positive), cosine
  distance: the similarity of one block of query rows at a time, ranked by the sort-free
  ``GalleryRanker`` (``reid_lab/metrics/ranking_engine.py``); never the full matrix.
* ``matmul``: the floor (issue #27): ONE ``torch.mm(q, g.T, out=buffer)`` of the whole similarity matrix at the
  same threads, no ranking; its row shows how far the evaluation sits above the product it cannot avoid.
* ``full_argsort``: the obvious plain-torch reference: the full ``(num_query, num_gallery)`` similarity matrix
  ``q @ gᵀ``, a full stable descending ``torch.argsort`` of every row (an int64 index matrix), the gathered
  gallery pids compared with the query's, then R@k from the first positive's rank, AP = mean over positives
  of precision at their rank, INP = #positives / rank of the last positive.

Timed: the call only (embeddings already in memory; one untimed warm-up on the first 16 queries). Memory is
resident memory (RSS), not tracemalloc: tracemalloc only sees Python's own allocator, not torch's tensor
buffers. ``extra RSS`` is the peak resident memory during the call minus the resident memory before it (the
kernel's VmHWM, reset through ``/proc/self/clear_refs`` just before the call; see ``_harness.measure``), i.e.
what the implementation allocates beyond its inputs; each implementation runs in its own process so memory
freed by an earlier one cannot hide in the allocator. ``gate`` checks that both give the same R1 / R5 / R10 /
mAP / mINP within ``--tol`` percentage points (the two orders can differ only where two similarities tie
after float32 rounding of ``1 - cos``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import _harness

IMPLS = ("reid_lab", "full_argsort", "matmul")
WARMUP_QUERIES = 16
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def planted_embeddings(args: argparse.Namespace):
    """``(q, g, q_pids, g_pids)``: unit caption / image embeddings around shared identity centres."""
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    num_ids = max(1, args.gallery // args.images_per_id)
    centres = torch.nn.functional.normalize(torch.randn(num_ids, args.dim, generator=gen), dim=1)
    g_pids = torch.arange(args.gallery) % num_ids
    q_pids = torch.randint(0, num_ids, (args.queries,), generator=gen)
    sigma = args.noise / args.dim**0.5

    def draw(pids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        out = torch.empty(len(pids), args.dim)
        for start in range(0, len(pids), chunk):
            p = pids[start:start + chunk]
            x = centres[p] + sigma * torch.randn(len(p), args.dim, generator=gen)
            out[start:start + len(p)] = torch.nn.functional.normalize(x, dim=1)
        return out

    return draw(q_pids), draw(g_pids), q_pids, g_pids


def full_argsort_metrics(q, g, q_pids, g_pids) -> dict[str, float]:
    """R1 / R5 / R10 / mAP / mINP (percent) from the full similarity matrix and a full argsort of every row."""
    import torch

    sim = q @ g.T  # (num_query, num_gallery)
    order = torch.argsort(sim, dim=1, descending=True, stable=True)  # (num_query, num_gallery) int64
    del sim
    matches = g_pids[order] == q_pids[:, None]  # (num_query, num_gallery) bool, in rank order
    del order
    num_pos = matches.sum(dim=1)
    rows, ranks = matches.nonzero(as_tuple=True)  # row-major: each query's positives in rank order
    del matches
    starts = torch.cumsum(num_pos, 0) - num_pos
    kth = torch.arange(len(rows)) - starts[rows] + 1  # 1-based index of the positive among its query's
    precision = kth.double() / (ranks.double() + 1)
    ap = torch.zeros(len(q), dtype=torch.float64).index_add_(0, rows, precision) / num_pos
    first = ranks[starts]
    last = ranks[starts + num_pos - 1]
    inp = num_pos.double() / (last.double() + 1)
    out = {f"R{k}": 100 * float((first < k).double().mean()) for k in (1, 5, 10)}
    out["mAP"], out["mINP"] = 100 * float(ap.mean()), 100 * float(inp.mean())
    return out


def _impl(name: str):
    from reid_lab.metrics import evaluate_features

    buffers: dict[int, Any] = {}  # the floor's output, allocated in the warm-up's size and the full size once

    if name == "matmul":
        def run(q, g, q_pids, g_pids) -> dict[str, Any]:
            import torch

            torch.mm(q, g.T, out=buffers.setdefault(len(q), torch.empty(len(q), len(g))))
            return {}
    elif name == "reid_lab":
        def run(q, g, q_pids, g_pids) -> dict[str, Any]:
            result = evaluate_features(q, g, q_pids, g_pids, None, None, metric="cosine", normalize=False,
                                       max_rank=10)
            return result.summary()
    else:
        run = full_argsort_metrics
    return run


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    q, g, q_pids, g_pids = planted_embeddings(args)
    run = _impl(args.child)
    w = min(WARMUP_QUERIES, len(q))
    run(q[:w], g, q_pids[:w], g_pids)
    if args.child == "matmul":
        run(q, g, q_pids, g_pids)  # the floor's output buffer allocated and touched before the timed call
    record = _harness.measure(lambda: run(q, g, q_pids, g_pids), impl=args.child, torch=torch.__version__,
                              torch_threads=torch.get_num_threads())
    _harness.emit(record)


def driver(args: argparse.Namespace) -> None:
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    env = _harness.child_env(args.threads)
    load0 = _harness.load_average()
    data = (f"{args.queries:,} caption queries x {args.gallery:,} gallery images x {args.dim}, "
            f"{max(1, args.gallery // args.images_per_id):,} identities ({args.images_per_id} images each), "
            f"noise {args.noise}")
    print(f"{data}; cosine, no camera filtering; threads {args.threads}; repeat {args.repeat}; load {load0:.2f} on "
          f"{os.cpu_count()} cpus" + ("  [WARNING: load > cpus, timings noisy]" if load0 > (os.cpu_count() or 1) else ""),
          flush=True)
    records = []
    for rep in range(args.repeat):
        for impl in impls if rep % 2 == 0 else impls[::-1]:  # alternate the order: drift cancels
            argv = [str(Path(__file__).resolve()), "--child", impl]
            for flag in ("queries", "gallery", "dim", "images_per_id", "noise", "seed", "threads"):
                argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            rec = _harness.spawn(argv, mem_gb=args.mem_gb, env=env, timeout_s=args.timeout,
                                 label={"impl": impl, "repeat": rep})
            print(_harness.MARKER + json.dumps(rec), flush=True)
            records.append(rec)
    best = _harness.best_of(records)

    header = ["impl", "wall s (min)", "wall max", "CPU s (min)", "extra RSS GB", "peak RSS GB", *METRICS, "runs"]
    rows = []
    for impl, r in best.items():
        if "error" in r:
            rows.append([impl, "error: " + r["error"][-160:]] + [""] * (len(header) - 2))
            continue
        rows.append([impl, f"{r['wall_s']:.3f}", f"{r['wall_max_s']:.3f}", f"{r['cpu_min_s']:.2f}",
                     f"{r['extra_rss_gb']:.3f}", f"{r['peak_rss_gb']:.2f}",
                     *(f"{r[m]:.4f}" if m in r else "-" for m in METRICS), r["runs"]])
    print()
    print(f"## text -> image evaluation, {data} (load {load0:.2f} -> {_harness.load_average():.2f})")
    print(_harness.format_table(header, rows))
    ours, ref = best.get("reid_lab", {}), best.get("full_argsort", {})
    if "wall_s" in ours and "wall_s" in ref:
        print(f"reid_lab vs full_argsort: {ref['wall_s'] / ours['wall_s']:.2f}x faster (wall), "
              f"{ref['cpu_min_s'] / max(ours['cpu_min_s'], 1e-9):.2f}x (CPU); extra RSS "
              f"{ours['extra_rss_gb']:.3f} GB vs {ref['extra_rss_gb']:.3f} GB")
        worst = max(abs(ours[m] - ref[m]) for m in METRICS)
        print(f"gate: {'ok' if worst <= args.tol else 'MISMATCH'}  (max abs diff {worst:.2e} points; tol {args.tol})")
    floor = best.get("matmul", {})
    if "wall_s" in ours and "wall_s" in floor:
        print(f"reid_lab / matmul floor: {ours['wall_s'] / floor['wall_s']:.2f}x (wall), "
              f"{ours['cpu_min_s'] / max(floor['cpu_min_s'], 1e-9):.2f}x (CPU)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=2000, help="caption queries")
    parser.add_argument("--gallery", type=int, default=100_000, help="gallery images")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--images-per-id", type=int, default=10, help="gallery images per identity")
    parser.add_argument("--noise", type=float, default=2.0,
                        help="noise relative to the centres' norm (same-identity cosine ~ 1 / (1 + noise^2))")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/torch threads of every child (on a loaded box extra OpenMP threads spin)")
    parser.add_argument("--mem-gb", type=float, help="RLIMIT_AS per child (GB)")
    parser.add_argument("--tol", type=float, default=0.01, help="gate tolerance in percentage points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
