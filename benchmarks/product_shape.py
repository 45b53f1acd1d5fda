"""Benchmark: how much of evaluate_features' overhead over one full product is the product's row-block shape.

    .venv/bin/python benchmarks/product_shape.py [--scale market] [--threads 1] [--repeat 3] [--rows 256 512 1024]

``evaluate_features`` computes distances in products of a fixed ``BLOCK_ROWS`` (256) query rows, so that a pair's
distance has the same bits whatever the memory budget and thread count. This times, on the cached Market-scale
features of ``eval_rank.py`` (``q_feats.npy`` / ``g_feats.npy``, 2048-d float32), one full
``torch.mm(query, gallery.T)`` (the floor of ``eval_features.py``) against the same product in blocks of
``--rows`` query rows into the same output buffer, in one process, interleaved, min of ``--repeat``. It prints
the load average and the thread count it ran with.
"""

from __future__ import annotations

import argparse
import os
import time

import eval_rank
import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="market", choices=sorted(eval_rank.SCALES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = eval_rank.ensure_data(args.scale)
    q = torch.from_numpy(np.load(folder / "q_feats.npy"))
    g = torch.from_numpy(np.load(folder / "g_feats.npy"))
    out = torch.empty(q.shape[0], g.shape[0])

    def blocks(rows: int):
        def run() -> None:
            for start in range(0, q.shape[0], rows):
                block = q[start : start + rows]
                torch.mm(block, g.T, out=out[start : start + block.shape[0]])
        return run

    runs = {"full": lambda: torch.mm(q, g.T, out=out), **{str(r): blocks(r) for r in args.rows}}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.scale}: {q.shape[0]} x {g.shape[0]} x {q.shape[1]}; threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}; min of {args.repeat}")
    print("| product | seconds | / one full torch.mm |\n|---|---|---|")
    for name, seconds in best.items():
        label = "one full torch.mm" if name == "full" else f"blocks of {name} query rows"
        print(f"| {label} | {seconds:.3f} | {seconds / best['full']:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
