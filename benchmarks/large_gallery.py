"""Benchmark: ``evaluate_features`` at 1M / 3M / 10M gallery x 256-d within a memory budget, against the GEMM floor.

    .venv/bin/python benchmarks/large_gallery.py --gallery 1000000 3000000 10000000 [--queries 512]
        [--budget-mb MIB] [--threads 1]
    .venv/bin/python benchmarks/large_gallery.py --gallery 20000 --queries 64      # seconds

Data (synthetic, generated in chunks, not timed): ``gallery / 10`` identity centres; each gallery row is
``normalize(centre + noise)`` stored as **float16** (10M x 256 x 2 bytes = 5.1 GB instead of 10.2 GB in float32;
``evaluate_features`` keeps a half gallery half and upcasts it tile by tile, exactly), 6 cameras, queries drawn
around random identities (float32). ReID protocol (camera ids given), cosine on unit features.

Per gallery size, in one process, same threads: the **floor** is the fastest plain product that fits the same
budget: ``torch.mm(all queries, gallery_chunk.float().T)`` over gallery chunks into one reused buffer (no
distance arithmetic, no ranking; the full ``num_query x 10M`` product alone would be 20 GB), at the fastest of a
few chunk widths (picked on the first 1M gallery rows: MKL's speed varies with the width). Then
``evaluate_features(..., memory_budget=budget)``. Memory: peak resident memory during the call minus resident
memory before it (VmHWM reset through ``/proc/self/clear_refs``, see ``_harness.measure``); the inputs are
loaded first. Prints the load average and thread settings it ran with.
"""

from __future__ import annotations

import argparse
import os
import time

import _harness


def make_data(num_gallery: int, num_query: int, dim: int, seed: int, chunk: int = 1 << 18):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    num_ids = max(1, num_gallery // 10)
    centres = F.normalize(torch.randn(num_ids, dim, generator=gen), dim=1).half()
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=gen)
    g_camids = torch.randint(0, 6, (num_gallery,), generator=gen)
    gallery = torch.empty((num_gallery, dim), dtype=torch.float16)
    sigma = 1.5 / dim**0.5
    for s in range(0, num_gallery, chunk):
        e = min(s + chunk, num_gallery)
        x = centres[g_pids[s:e]].float() + sigma * torch.randn(e - s, dim, generator=gen)
        gallery[s:e] = F.normalize(x, dim=1).half()
    q_pids = g_pids[torch.randint(0, num_gallery, (num_query,), generator=gen)]
    q_camids = torch.randint(0, 6, (num_query,), generator=gen)
    query = F.normalize(centres[q_pids].float() + sigma * torch.randn(num_query, dim, generator=gen), dim=1)
    return query, gallery, q_pids, g_pids, q_camids, g_camids


def floor(query, gallery, budget: int, sample: int = 1 << 20) -> tuple[float, int]:
    """``(seconds, chunk rows)`` of the fastest plain product within the budget: gallery chunks upcast, one reused
    output buffer. MKL's speed varies by up to 40 % with the chunk's width on this CPU, so the width is the fastest
    of a few that fit the budget, picked on the first ``sample`` gallery rows (min of 2), then timed over all."""
    import torch

    widest = max(1024, budget // (4 * (query.shape[0] + query.shape[1])))
    widths = sorted({min(w, widest) for w in (widest, 131_072, 100_000, 65_536, 50_000, 32_768, 20_000)})

    def run(rows: int, stop: int) -> float:
        out = torch.empty((query.shape[0], rows))
        t0 = time.perf_counter()
        for s in range(0, stop, rows):
            chunk = gallery[s : min(s + rows, stop)].float()
            torch.mm(query, chunk.T, out=out[:, : chunk.shape[0]])
        return time.perf_counter() - t0

    probe = min(sample, gallery.shape[0])
    best = min(widths, key=lambda rows: min(run(rows, probe) for _ in range(2)))
    return run(best, gallery.shape[0]), best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--budget-mb", type=int,
                        help="memory_budget of evaluate_features (MiB); default: the library's default for the gallery")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from reid_lab.metrics import evaluate_features
    from reid_lab.metrics.distance import default_memory_budget, reserved_bytes

    torch.set_num_threads(args.threads)
    print(f"large gallery: {args.queries} queries x {args.gallery} gallery x {args.dim}-d (gallery float16), "
          f"budget {args.budget_mb or 'default'} MiB; torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, {os.cpu_count()} cpus, load {os.getloadavg()}", flush=True)
    header = ["gallery", "floor s", "evaluate_features s", "/ floor", "s per 1M gallery", "extra RSS MiB",
              "budget MiB", "R1", "mAP", "load1"]
    rows = []
    for num_gallery in args.gallery:
        # the library's default: 256 MiB for tiles and ranking state plus the gallery's pid index (the features
        # here are unit-norm float32 queries and a half gallery with normalize=False: no normalised copies)
        default = default_memory_budget(torch.device("cpu"), reserved_bytes(num_gallery))
        budget = args.budget_mb << 20 if args.budget_mb else default
        budget_mb = budget / 2**20
        data = make_data(num_gallery, args.queries, args.dim, args.seed)
        query, gallery, q_pids, g_pids, q_camids, g_camids = data
        # warm-up (cross-modal: each row finds itself, so the toy call has positives)
        evaluate_features(gallery[:8].float(), gallery[:4096], g_pids[:8], g_pids[:4096], metric="cosine",
                          normalize=False)
        def run(data=data, budget=budget) -> dict:
            return {"r": evaluate_features(*data, metric="cosine", normalize=False, memory_budget=budget)}

        # the evaluation first: the floor's freed buffers would otherwise be reused without raising the peak RSS
        rec = _harness.measure(run)
        r = rec.pop("r")
        t_floor, floor_rows = floor(query, gallery, budget)
        extra_mb = rec["extra_rss_gb"] * 1024
        rows.append([f"{num_gallery:,}", f"{t_floor:.2f}", f"{rec['wall_s']:.2f}", f"{rec['wall_s'] / t_floor:.2f}x",
                     f"{rec['wall_s'] / num_gallery * 1e6:.2f}", f"{extra_mb:.0f}", f"{budget_mb:.0f}",
                     f"{100 * r.cmc[0]:.2f}", f"{100 * r.mAP:.2f}", f"{rec['load1']:.2f}"])
        print(_harness.MARKER + str(dict(zip(header, rows[-1]))), flush=True)
        within = "within" if extra_mb <= budget_mb else "OVER"
        print(f"{num_gallery:,}: {rec['wall_s']:.2f} s (floor {t_floor:.2f} s in {floor_rows:,}-row chunks), extra {extra_mb:.0f} MiB {within} the "
              f"{budget_mb:.0f} MiB budget", flush=True)
        del data, run, query, gallery, g_pids, g_camids
    print()
    print(f"## evaluate_features at large galleries (threads {torch.get_num_threads()}, load at end "
          f"{os.getloadavg()})")
    print(_harness.format_table(header, rows))


if __name__ == "__main__":
    main()
