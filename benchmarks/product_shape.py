"""Benchmark: how much of evaluate_features' overhead over one full product is the product's row-block shape, and
whether a block's distances have the bits of the full product.

    .venv/bin/python benchmarks/product_shape.py [--scale market] [--threads 1] [--repeat 3] [--rows 256 842 1684]

``evaluate_features`` computes distances in products of up to ``PRODUCT_ROWS`` (2,048) query rows, in near-equal
blocks (Market's 3,368 queries: two of 1,684), never fewer than 16 rows (thin products take other BLAS kernels
that round differently), so that a pair's distance has the same bits whatever the memory budget, the blocks and
the thread count. This times, on the cached Market-scale features of ``eval_rank.py`` (``q_feats.npy`` /
``g_feats.npy``, 2048-d float32), one full ``torch.mm(query, gallery.T)`` (the floor of ``eval_features.py``)
against the same product in blocks of ``--rows`` query rows into the same output buffer, in one process,
interleaved, min of ``--repeat``, and checks each blocked product bit for bit against the full one (also 8 blocks
of 1-16 rows each, to show which are thin). It prints the load average and the thread count it ran with.
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
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 842, 1684])
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

    full = torch.mm(q, g.T)
    identical = {}
    for rows in (*range(1, 17), *args.rows):  # 1-16 rows: 8 blocks on the first 8 x rows queries (cheap)
        limit = q.shape[0] if rows in args.rows else 8 * rows
        part = torch.cat([torch.mm(q[s : min(s + rows, limit)], g.T) for s in range(0, limit, rows)])
        identical[rows] = torch.equal(part, full[:limit])
    del full
    runs = {"full": lambda: torch.mm(q, g.T, out=out), **{str(r): blocks(r) for r in args.rows}}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.scale}: {q.shape[0]} x {g.shape[0]} x {q.shape[1]}; threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}; min of {args.repeat}")
    print("| product | seconds | / one full torch.mm | bits of the full product |\n|---|---|---|---|")
    for name, seconds in best.items():
        label = "one full torch.mm" if name == "full" else f"blocks of {name} query rows"
        same = "-" if name == "full" else ("yes" if identical[int(name)] else "NO")
        print(f"| {label} | {seconds:.3f} | {seconds / best['full']:.3f}x | {same} |")
    thin = ", ".join(f"{rows}: {'same' if same else 'differ'}" for rows, same in identical.items() if rows < 17)
    print(f"8 blocks of 1-16 query rows against the full product: {thin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
