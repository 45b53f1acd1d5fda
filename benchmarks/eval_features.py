"""Benchmark: ``reid_lab.metrics.evaluate_features`` (distances + evaluation in chunks) vs the distance alone.

    .venv/bin/python benchmarks/eval_features.py --scale market|msmt [--device cpu|cuda] [--repeat 3]
        [--threads 1] [--metric euclidean|cosine] [--mem-gb 16]

Target: evaluating from features costs at most 1.3x computing the distances alone: the matrix multiply is the
floor. Same cached inputs as ``benchmarks/eval_rank.py`` (``q_feats.npy`` / ``g_feats.npy``, L2-normalised
2048-d float32; generated on first use). Implementations, each in a fresh subprocess (``_harness.py``):

* ``matmul``: the floor, the fastest plain product at the same threads: ONE ``torch.mm(query, gallery.T,
  out=buffer)`` of the whole matrix (no distance arithmetic, no evaluation). An earlier version ran it in
  ``evaluate_features``' 131-row blocks, which is slower than ``compute_distance`` and flattered the ratio.
* ``compute_distance``: ``reid_lab.metrics.compute_distance`` (the full ``num_query x num_gallery`` matrix).
* ``evaluate_features``: ``reid_lab.metrics.evaluate_features`` (never holds the full matrix).
* ``distance+rank``: ``compute_distance`` then ``evaluate_rank`` on the full matrix (the two-step route).

Timed: the call only (features already loaded and on ``--device``; one untimed warm-up on the first 32 queries;
CUDA is synchronised). The table shows the min of ``--repeat`` interleaved runs and ratios measured in the same
run; ``gate`` checks that ``evaluate_features`` and ``distance+rank`` agree within ``--tol`` points.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import _harness
import eval_rank
import numpy as np

IMPLS = ("matmul", "compute_distance", "evaluate_features", "distance+rank")
WARMUP_ROWS = 32


def _impl(name: str, q, g, ids, metric: str, budget: int | None):
    """A zero-argument callable running implementation ``name`` on query / gallery features ``q``, ``g``."""
    import torch

    from reid_lab.metrics import compute_distance, evaluate_features, evaluate_rank

    def summary(r) -> dict[str, Any]:
        return {"R1": 100 * float(r.cmc[0]), "mAP": 100 * r.mAP, "mINP": 100 * r.mINP}

    if name == "matmul":
        buf = torch.empty((q.shape[0], g.shape[0]), dtype=q.dtype, device=q.device)

        def run() -> dict[str, Any]:
            torch.mm(q, g.T, out=buf)
            return {"shape": list(buf.shape)}
    elif name == "compute_distance":
        def run() -> dict[str, Any]:
            d = compute_distance(q, g, metric=metric, normalize=False)
            return {"shape": list(d.shape)}
    elif name == "evaluate_features":
        def run() -> dict[str, Any]:
            return summary(evaluate_features(q, g, *ids, metric=metric, normalize=False, memory_budget=budget))
    else:
        def run() -> dict[str, Any]:
            d = compute_distance(q, g, metric=metric, normalize=False)
            return summary(evaluate_rank(d, *ids))
    return run


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    device = torch.device(args.device)
    q = torch.from_numpy(np.load(data / "q_feats.npy")).to(device)
    g = torch.from_numpy(np.load(data / "g_feats.npy")).to(device)
    q_pids, g_pids, q_camids, g_camids = eval_rank.load_ids(data)
    ids = (q_pids, g_pids, q_camids, g_camids)
    budget = args.budget_mb << 20 if args.budget_mb else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    w = min(WARMUP_ROWS, q.shape[0])
    _impl(args.child, q[:w], g, (q_pids[:w], g_pids, q_camids[:w], g_camids), args.metric, budget)()
    sync()
    run = _impl(args.child, q, g, ids, args.metric, budget)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_gpu = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def timed() -> dict[str, Any]:
        out = run()
        sync()
        return out

    record = _harness.measure(timed, impl=args.child, device=str(device), torch=torch.__version__,
                              torch_threads=torch.get_num_threads())
    if device.type == "cuda":
        record["extra_gpu_gb"] = (torch.cuda.max_memory_allocated(device) - base_gpu) / _harness.GB
    _harness.emit(record)


def driver(args: argparse.Namespace) -> None:
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    data = eval_rank.ensure_data(args.scale, args.seed)
    meta = json.loads((data / "meta.json").read_text())
    env = _harness.child_env(args.threads)
    load0 = _harness.load_average()
    print(f"scale {args.scale}: {meta['num_query']:,} x {meta['num_gallery']:,} features dim {meta['dim']}; metric "
          f"{args.metric}; device {args.device}; threads {args.threads} (OMP_WAIT_POLICY "
          f"{env.get('OMP_WAIT_POLICY', 'unset')}, $REID_LAB_RANK_THREADS {env.get('REID_LAB_RANK_THREADS', 'auto')}); "
          f"repeat {args.repeat}; load {os.getloadavg()} on "
          f"{os.cpu_count()} cpus" + ("  [WARNING: load > cpus, timings noisy]" if load0 > (os.cpu_count() or 1) else ""),
          flush=True)
    records = []
    for rep in range(args.repeat):
        for impl in impls:
            argv = [str(Path(__file__).resolve()), "--child", impl, "--data", str(data), "--threads",
                    str(args.threads), "--device", args.device, "--metric", args.metric]
            if args.budget_mb:
                argv += ["--budget-mb", str(args.budget_mb)]
            rec = _harness.spawn(argv, mem_gb=args.mem_gb, env=env, timeout_s=args.timeout,
                                 label={"impl": impl, "repeat": rep, "scale": args.scale})
            print(_harness.MARKER + json.dumps(rec), flush=True)
            records.append(rec)
    best = _harness.best_of(records)

    def ratio(impl: str, base: str) -> str:
        """Wall (CPU) time of ``impl`` over ``base``'s, mins of the same run."""
        a, b = best.get(impl, {}), best.get(base, {})
        if "wall_s" not in a or "wall_s" not in b:
            return "-"
        return f"{a['wall_s'] / b['wall_s']:.2f}x ({a['cpu_min_s'] / max(b['cpu_min_s'], 1e-9):.2f}x)"

    header = ["impl", "wall s (min)", "wall max", "CPU s (min)", "peak RSS GB", "extra RSS GB", "R1", "mAP", "mINP",
              "/ compute_distance wall (CPU)", "/ matmul wall (CPU)", "runs"]
    rows = []
    for impl, r in best.items():
        if "error" in r:
            rows.append([impl, "error: " + r["error"][-160:]] + [""] * (len(header) - 2))
            continue
        extra = f"{r['extra_rss_gb']:.3f}" + (f" (+{r['extra_gpu_gb']:.2f} GPU)" if "extra_gpu_gb" in r else "")
        rows.append([impl, f"{r['wall_s']:.3f}", f"{r['wall_max_s']:.3f}", f"{r['cpu_min_s']:.2f}",
                     f"{r['peak_rss_gb']:.2f}", extra] + [f"{r[m]:.4f}" if m in r else "-" for m in ("R1", "mAP", "mINP")]
                    + [ratio(impl, "compute_distance"), ratio(impl, "matmul"), r["runs"]])
    print()
    print(f"## evaluate_features, {args.scale} {meta['num_query']:,} x {meta['num_gallery']:,} x {meta['dim']}, "
          f"{args.device} (load {load0:.2f} -> {_harness.load_average():.2f})")
    print(_harness.format_table(header, rows))
    ef = best.get("evaluate_features", {})
    if "wall_s" in ef and "wall_s" in best.get("compute_distance", {}):
        cd = best["compute_distance"]
        r, rc = ef["wall_s"] / cd["wall_s"], ef["cpu_min_s"] / max(cd["cpu_min_s"], 1e-9)
        print(f"target evaluate_features <= 1.3x compute_distance: wall {r:.2f}x, CPU {rc:.2f}x -> "
              f"{'met' if max(r, rc) <= 1.3 else 'NOT met'}")
    scored = {k: v for k, v in best.items() if "mAP" in v}
    if len(scored) > 1:
        worst = max(max(v[m] for v in scored.values()) - min(v[m] for v in scored.values()) for m in ("R1", "mAP", "mINP"))
        print(f"gate: {'ok' if worst <= args.tol else 'MISMATCH'}  (max abs diff {worst:.2e} points over "
              f"{', '.join(scored)}; tol {args.tol})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(eval_rank.SCALES), default="market")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/torch threads of every child (on a loaded box extra OpenMP threads spin)")
    parser.add_argument("--budget-mb", type=int, help="memory_budget of evaluate_features in MiB (default: its own)")
    parser.add_argument("--mem-gb", type=float, help="RLIMIT_AS per child (GB); not with --device cuda")
    parser.add_argument("--tol", type=float, default=0.01, help="gate tolerance in percentage points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
