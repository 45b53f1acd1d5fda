"""Backfilling curves: the whole β grid against one full evaluation (target: at most 3x).

    python benchmarks/backfill.py --scale tiny      # seconds
    python benchmarks/backfill.py --scale market    # 3,368 queries x 15,913 gallery
    python benchmarks/backfill.py --scale msmt      # 11,659 queries x 82,161 gallery (MSMT17 test split)
    python benchmarks/backfill.py --scale msmt --queries 1000 --threads 1   # MSMT gallery, fewer queries

Features are synthetic identities: a Gaussian centre per pid, the old model adds noise ``--old-noise`` times the
centres' scale, the new one ``--new-noise`` (so the old self-test and cross-test are worse than the new one, as
after a compatible upgrade); cameras are drawn uniformly. Timed, interleaved over ``--repeats`` rounds:

* ``evaluate``: one full evaluation, ``evaluate_features(q_new, g_new)`` (distances + ranking);
* ``backfill x1`` / ``backfill x3``: ``backfill_curves`` over the default 11-point β grid with one / three
  orderings (distances to both galleries + every β), no old system;
* ``per-β`` (market/tiny by default): the previous approach, both full distance matrices then ``evaluate_rank`` of
  the mixed matrix at every β, and a check that its numbers equal the incremental curve's.

Ratios are taken within each round (same load), then the median is printed; only ratios carry over between
machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from reid_lab.metrics.backfill import DEFAULT_BACKFILL_RATIOS, backfill_curves, num_refreshed, order_random
from reid_lab.metrics.distance import compute_distance, evaluate_features
from reid_lab.metrics.rank import evaluate_rank

SCALES = {  # (num_query, num_gallery, num_ids, num_cameras)
    "tiny": (400, 2_000, 100, 6),
    "market": (3_368, 15_913, 751, 6),
    "msmt": (11_659, 82_161, 3_060, 15),
}


def synthetic(
    scale: str, dim: int, old_noise: float, new_noise: float, seed: int, num_query: int | None = None
) -> dict[str, torch.Tensor]:
    default_queries, num_gallery, num_ids, num_cams = SCALES[scale]
    num_query = num_query or default_queries
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=gen)
    data = {
        "q_pids": torch.randint(0, num_ids, (num_query,), generator=gen),
        "g_pids": torch.randint(0, num_ids, (num_gallery,), generator=gen),
        "q_camids": torch.randint(0, num_cams, (num_query,), generator=gen),
        "g_camids": torch.randint(0, num_cams, (num_gallery,), generator=gen),
    }
    for side in ("q", "g"):
        pids = data[f"{side}_pids"]
        for version, noise in (("old", old_noise), ("new", new_noise)):
            data[f"{side}_{version}"] = centres[pids] + noise * torch.randn(len(pids), dim, generator=gen)
    return data


def per_beta(data: dict[str, torch.Tensor], order: torch.Tensor) -> list[float]:
    """The previous approach: full distance matrices, mixed matrix by column copies, one evaluation per β."""
    labels = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    mixed = compute_distance(data["q_new"], data["g_old"])
    d_new = compute_distance(data["q_new"], data["g_new"])
    done, maps = 0, []
    for beta in DEFAULT_BACKFILL_RATIOS:
        count = num_refreshed(beta, len(order))
        mixed[:, order[done:count]] = d_new[:, order[done:count]]
        done = count
        maps.append(100.0 * evaluate_rank(mixed, *labels).mAP)
    return maps


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="market")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--old-noise", type=float, default=2.3)
    parser.add_argument("--new-noise", type=float, default=1.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, help="number of queries (default: the scale's); the gallery stays")
    parser.add_argument("--per-beta", choices=("auto", "yes", "no"), default="auto",
                        help="also time the per-β approach (auto: not at msmt, it holds three full matrices)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"REID_LAB_RANK_THREADS {os.environ.get('REID_LAB_RANK_THREADS', 'auto')}; load {os.getloadavg()} on "
          f"{os.cpu_count()} cpus", flush=True)

    data = synthetic(args.scale, args.dim, args.old_noise, args.new_noise, args.seed, args.queries)
    labels = (data["q_pids"], data["g_pids"], data["q_camids"], data["g_camids"])
    num_gallery = len(data["g_pids"])
    orders = {f"random{s}": order_random(num_gallery, seed=s) for s in range(3)}
    first = dict(list(orders.items())[:1])
    run_per_beta = args.per_beta == "yes" or (args.per_beta == "auto" and args.scale != "msmt")
    print(f"scale {args.scale}: {len(data['q_pids'])} queries x {num_gallery} gallery, dim {args.dim}, "
          f"{torch.get_num_threads()} threads, {len(DEFAULT_BACKFILL_RATIOS)} β points")

    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    curve = None
    for _ in range(args.repeats):
        t_eval, result = timed(lambda: evaluate_features(data["q_new"], data["g_new"], *labels))
        t_one, curves = timed(lambda: backfill_curves(data["q_new"], data["g_old"], data["g_new"], *labels, first))
        t_three, _ = timed(lambda: backfill_curves(data["q_new"], data["g_old"], data["g_new"], *labels, orders))
        row = {"evaluate": t_eval, "backfill x1": t_one, "backfill x3": t_three}
        if run_per_beta:
            row["per-β"], maps = timed(lambda: per_beta(data, next(iter(first.values()))))
        curve = next(iter(curves.values()))
        for key, value in row.items():
            times.setdefault(key, []).append(value)
            ratios.setdefault(key, []).append(value / t_eval)

    for key in times:
        print(f"{key:>12}: median {statistics.median(times[key]):8.2f} s   "
              f"x{statistics.median(ratios[key]):5.2f} one evaluation   (rounds: "
              + ", ".join(f"{t:.2f}" for t in times[key]) + ")")
    assert curve is not None
    print(f"new self-test mAP {100 * result.mAP:.2f}; curve mAP β=0 {curve.values['mAP'][0]:.2f} "
          f"-> β=1 {curve.values['mAP'][-1]:.2f}")
    if run_per_beta:
        gap = max(abs(a - b) for a, b in zip(maps, curve.values["mAP"]))
        print(f"per-β vs incremental mAP: max |difference| {gap:.2e} over the grid")


if __name__ == "__main__":
    main()
