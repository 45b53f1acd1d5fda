"""Benchmark: evaluation from features under different thread settings, on whatever load the box has now.

    .venv/bin/python benchmarks/busy_threads.py [--queries 3368 --gallery 15913 --dim 2048] [--repeat 3]

Why: on a 2-core box shared with other jobs, torch's default (one OpenMP thread per core, threads spin-waiting
for each other) made ``evaluate_features`` 1.7-2x slower than one thread. Settings, each in a fresh subprocess
(the OpenMP wait policy is read when torch loads), interleaved over ``--repeat`` rounds, min of rounds:

* ``1 thread``: ``OMP_NUM_THREADS=1``.
* ``2 threads default``: torch's default on 2 cores (``OMP_WAIT_POLICY`` unset: libgomp spins a while
  before it sleeps), ranking pinned to 2 (``REID_LAB_RANK_THREADS=2``).
* ``2 threads passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (what ``reid-lab`` sets when unset).
* ``2 threads auto``: ``REID_LAB_RANK_THREADS=auto`` (the library default: ``min(torch threads, cores left
  free by the 1-minute load average)``), passive waiting.

Data: Market-sized synthetic unit features (random pids over 750 identities, 6 cameras), cosine; generation
not timed; one untimed warm-up. Prints the load average before and after each run and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1", "REID_LAB_RANK_THREADS": "1"},
    "2 threads default": {"OMP_NUM_THREADS": "2", "REID_LAB_RANK_THREADS": "2"},
    "2 threads passive": {"OMP_NUM_THREADS": "2", "REID_LAB_RANK_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "2 threads auto": {"OMP_NUM_THREADS": "2", "REID_LAB_RANK_THREADS": "auto", "OMP_WAIT_POLICY": "PASSIVE"},
}
MARKER = "BUSY_JSON "


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from reid_lab.metrics import evaluate_features
    from reid_lab.metrics.ranking_engine import shared_machine_threads

    gen = torch.Generator().manual_seed(0)
    g = F.normalize(torch.randn(args.gallery, args.dim, generator=gen), dim=1)
    q = F.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    g_pids = torch.randint(0, 750, (args.gallery,), generator=gen)
    q_pids = torch.randint(0, 750, (args.queries,), generator=gen)
    g_camids = torch.randint(0, 6, (args.gallery,), generator=gen)
    q_camids = torch.randint(0, 6, (args.queries,), generator=gen)

    def run(n: int):
        return evaluate_features(q[:n], g, q_pids[:n], g_pids, q_camids[:n], g_camids, metric="cosine",
                                 normalize=False)

    run(64)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = run(args.queries)
    wall = time.perf_counter() - t0
    print(MARKER + json.dumps({"wall_s": wall, "load1": load, "torch_threads": torch.get_num_threads(),
                               "rank_threads": shared_machine_threads(), "mAP": result.mAP}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    print(f"busy threads: {args.queries} x {args.gallery} x {args.dim}, {os.cpu_count()} cpus, load "
          f"{os.getloadavg()} at start", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.repeat):
        for name in names:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",)}
            env.update(SETTINGS[name])
            argv_child = [sys.executable, os.path.abspath(__file__), "--child", "--queries", str(args.queries),
                          "--gallery", str(args.gallery), "--dim", str(args.dim)]
            out = subprocess.run(argv_child, capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARKER)]
            if out.returncode or not lines:
                raise SystemExit(f"{name}: child failed: {out.stderr[-1000:]}")
            rec = json.loads(lines[-1][len(MARKER):])
            runs[name].append(rec)
            print(f"round {rnd} {name}: {rec['wall_s']:.3f} s (load {rec['load1']:.2f}, torch threads "
                  f"{rec['torch_threads']}, ranking threads {rec['rank_threads']})", flush=True)
    base = min(r["wall_s"] for r in runs[names[0]])
    print()
    print(f"## evaluate_features by thread setting (load at end {os.getloadavg()})")
    print(f"| setting | env | wall s (min of {args.repeat}) | wall max | load1 | / {names[0]} |")
    print("|---|---|---|---|---|---|")
    for name in names:
        walls = [r["wall_s"] for r in runs[name]]
        env_text = " ".join(f"{k}={v}" for k, v in SETTINGS[name].items())
        load = sum(r["load1"] for r in runs[name]) / len(walls)
        print(f"| {name} | `{env_text}` | {min(walls):.3f} | {max(walls):.3f} | {load:.2f} | "
              f"{min(walls) / base:.2f}x |")
    maps = {round(r["mAP"], 12) for rs in runs.values() for r in rs}
    print(f"gate: {'ok' if len(maps) == 1 else 'MISMATCH'} (mAP identical under every setting: {sorted(maps)})")


if __name__ == "__main__":
    main()
