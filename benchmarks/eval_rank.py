"""Benchmark: ``reid_lab.metrics.evaluate_rank`` vs fast-reid's and torchreid's Cython evaluators (distance matrix in).

    .venv/bin/python benchmarks/eval_rank.py --scale tiny|market|msmt [--impls ours,fastreid_cy,torchreid_cy,ours_reference]
        [--repeat 3] [--threads 1] [--mem-gb 16] [--nq-limit N]

Data (``shared/reference/reid-toolboxes.md`` §4): synthetic but structured, generated once with a fixed seed and
cached in ``benchmarks/.cache/eval-<scale>-seed<seed>/``: a random centroid per identity (scale 0.25) plus N(0, I)
noise, L2-normalised, 2048-d; ids and cameras drawn uniformly; Market-like (3,368 queries over 750 ids, 15,913
gallery items of which 2,793 pid-0 distractors with their own centroids, 6 cameras) or MSMT17-like (11,659 x
82,161, 3,060 ids, 15 cameras, no distractors). ``distmat.npy`` is float32 squared euclidean from
``torch.cdist`` (independent of our distance code); the features are kept for ``benchmarks/eval_features.py``.
MSMT17 generation (estimate, not yet run): ~4.6 GB on disk, ~2-3 GB of anonymous memory (features 0.8 GB +
1,024-row ``cdist`` blocks; the distmat is written through a memory map). The MSMT17 run itself needs ~11 GB for
``fastreid_cy`` (distmat 3.8 + int64 argsort 7.7): pass ``--mem-gb 16`` on a shared box.

Implementations, each in a fresh subprocess on the same ``distmat.npy`` (see ``_harness.py``):

* ``ours``: ``reid_lab.metrics.evaluate_rank`` (sort-free, chunked; torch threads = ``--threads``).
* ``ours_reference``: ``reid_lab.metrics.evaluate_rank_reference`` (per-row stable argsort; the baseline).
* ``fastreid_cy`` / ``fastreid_py``: fast-reid 1.4.0 ``fastreid.evaluation.rank.evaluate_rank`` with / without
  its Cython extension; ``torchreid_cy`` / ``torchreid_py``: torchreid's (KaiyangZhou/deep-person-reid HEAD).
  Installed by ``_peers.py`` into ``benchmarks/.cache/`` (their own venv with numpy + Cython only) and imported
  as leaf modules. The ``_py`` paths take ~80 s at Market scale: use ``--nq-limit`` (time scaled linearly).

Every implementation does one untimed warm-up call on the first 32 query rows; import and loading are not timed.
Runs are interleaved (repeat r: every implementation once), the table shows the min wall time and the min CPU
time (user + sys) of ``--repeat`` runs, the max peak / extra RSS, and speedups vs ``fastreid_cy`` measured in the
same run (wall and CPU: on a box loaded beyond its cores the CPU ratio is the steadier one). Metrics (percent)
must agree within ``--tol`` points (default 0.01 = 1e-4 as a fraction): the peers' ``np.argsort`` is unstable on float32 ties (ours breaks ties by gallery index) and fast-reid's Cython accumulates
AP in float32, so differences of ~1e-3 points are expected; the gate line prints the max difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _harness
import _peers
import numpy as np

IMPLS = ("ours", "ours_reference", "fastreid_cy", "torchreid_cy", "fastreid_py", "torchreid_py")
BASELINE = "fastreid_cy"
WARMUP_ROWS = 32


@dataclass(frozen=True)
class Scale:
    num_query: int
    num_gallery: int
    num_ids: int
    num_distractors: int
    num_cams: int
    dim: int


SCALES = {
    "tiny": Scale(200, 1_000, 50, 100, 4, 128),
    "market": Scale(3_368, 15_913, 750, 2_793, 6, 2048),
    "msmt": Scale(11_659, 82_161, 3_060, 0, 15, 2048),
}
DEFAULT_IMPLS = {
    "tiny": "ours,ours_reference,fastreid_cy,torchreid_cy,fastreid_py,torchreid_py",
    "market": "ours,fastreid_cy,torchreid_cy,ours_reference",
    # torchreid_cy needs ~20 GB at this scale (full int64 matches matrix) and ours_reference ~2 min.
    "msmt": "ours,fastreid_cy",
}


# ------------------------------------------------------------------------------------------------ data


def data_dir(scale: str, seed: int) -> Path:
    return _peers.CACHE / f"eval-{scale}-seed{seed}"


def ensure_data(scale: str, seed: int = 0) -> Path:
    """Generate the cached inputs of ``scale`` once (our venv: needs torch); return their directory."""
    out = data_dir(scale, seed)
    if (out / "meta.json").exists():
        return out
    import torch  # only the driver in our venv generates data

    s = SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    q_pids = np.resize(np.arange(1, s.num_ids + 1), s.num_query)
    rng.shuffle(q_pids)
    g_pids = np.concatenate(
        [np.resize(np.arange(1, s.num_ids + 1), s.num_gallery - s.num_distractors), np.zeros(s.num_distractors, int)]
    )
    rng.shuffle(g_pids)
    q_camids = rng.integers(0, s.num_cams, s.num_query)
    g_camids = rng.integers(0, s.num_cams, s.num_gallery)

    gen = torch.Generator().manual_seed(seed)
    centroids = 0.25 * torch.randn(s.num_ids + 1, s.dim, generator=gen)

    def features(pids: np.ndarray) -> torch.Tensor:
        x = torch.empty(len(pids), s.dim)
        for start in range(0, len(pids), 8192):
            p = torch.from_numpy(pids[start:start + 8192].astype(np.int64))
            c = centroids[p]
            distractor = p == 0  # each distractor is its own person
            c[distractor] = 0.25 * torch.randn(int(distractor.sum()), s.dim, generator=gen)
            x[start:start + len(p)] = torch.nn.functional.normalize(c + torch.randn(len(p), s.dim, generator=gen), dim=1)
        return x

    q_feats, g_feats = features(q_pids), features(g_pids)
    t_feats = time.perf_counter() - t_start
    t0 = time.perf_counter()
    distmat = np.lib.format.open_memmap(out / "distmat.npy.tmp", mode="w+", dtype=np.float32,
                                        shape=(s.num_query, s.num_gallery))
    for start in range(0, s.num_query, 1024):
        block = torch.cdist(q_feats[start:start + 1024], g_feats).square_()
        distmat[start:start + len(block)] = block.numpy()
    distmat.flush()
    del distmat
    t_dist = time.perf_counter() - t0
    os.replace(out / "distmat.npy.tmp", out / "distmat.npy")
    for name, arr in (("q_pids", q_pids), ("g_pids", g_pids), ("q_camids", q_camids), ("g_camids", g_camids)):
        np.save(out / f"{name}.npy", arr.astype(np.int64))
    np.save(out / "q_feats.npy", q_feats.numpy())
    np.save(out / "g_feats.npy", g_feats.numpy())
    meta = {"scale": scale, "seed": seed, **asdict(s), "features_s": round(t_feats, 2),
            "cdist_s": round(t_dist, 2), "torch_threads": torch.get_num_threads()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"data: generated {out} (features {t_feats:.1f} s, torch.cdist distances {t_dist:.1f} s)", flush=True)
    return out


def load_ids(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q_pids, g_pids, q_camids, g_camids) int64."""
    return tuple(np.load(data / f"{n}.npy") for n in ("q_pids", "g_pids", "q_camids", "g_camids"))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ child


def _percent(r1: float, r5: float, r10: float, mAP: float, mINP: float | None) -> dict[str, Any]:
    return {"R1": 100 * float(r1), "R5": 100 * float(r5), "R10": 100 * float(r10), "mAP": 100 * float(mAP),
            "mINP": None if mINP is None else 100 * float(mINP)}


def _evaluator(impl: str, peer_root: str | None, threads: int):
    """A function (distmat, q_pids, g_pids, q_camids, g_camids) -> metrics in percent, plus a version string."""
    if impl.startswith("ours"):
        from importlib.metadata import version

        import torch

        from reid_lab.metrics import evaluate_rank, evaluate_rank_reference

        torch.set_num_threads(threads)
        fn = evaluate_rank if impl == "ours" else evaluate_rank_reference

        def run(d, qp, gp, qc, gc):
            r = fn(d, qp, gp, qc, gc, max_rank=50)
            return _percent(r.cmc[0], r.cmc[4], r.cmc[9], r.mAP, r.mINP)

        return run, f"reid_lab {version('reid_lab')}, torch {torch.__version__}"

    peer, kind = impl.split("_")
    mod = _peers.import_leaf(peer, peer_root)
    if kind == "cy" and not mod.IS_CYTHON_AVAI:
        raise RuntimeError(f"{peer}'s Cython extension did not import from {peer_root}")
    use_cython = kind == "cy"

    def run_peer(d, qp, gp, qc, gc):
        out = mod.evaluate_rank(d, qp, gp, qc, gc, max_rank=50, use_metric_cuhk03=False, use_cython=use_cython)
        if peer == "fastreid":  # (cmc, per-query AP, per-query INP)
            cmc, all_ap, all_inp = out
            return _percent(cmc[0], cmc[4], cmc[9], np.mean(np.asarray(all_ap, np.float64)),
                            np.mean(np.asarray(all_inp, np.float64)))
        cmc, mAP = out  # torchreid: (cmc, mAP), no mINP
        return _percent(cmc[0], cmc[4], cmc[9], mAP, None)

    return run_peer, f"{_peers.peer_source(Path(peer_root))}, numpy {np.__version__}"


def child(args: argparse.Namespace) -> None:
    data = Path(args.data)
    evaluate, version = _evaluator(args.child, args.peer_root, args.threads)
    q_pids, g_pids, q_camids, g_camids = load_ids(data)
    distmat = np.load(data / "distmat.npy")  # writable, in memory: the Cython evaluators reject read-only buffers
    num_query = distmat.shape[0]
    if args.nq_limit and args.nq_limit < num_query:
        distmat, q_pids, q_camids = distmat[: args.nq_limit], q_pids[: args.nq_limit], q_camids[: args.nq_limit]
    w = min(WARMUP_ROWS, distmat.shape[0])
    evaluate(distmat[:w], q_pids[:w], g_pids, q_camids[:w], g_camids)
    record = _harness.measure(lambda: evaluate(distmat, q_pids, g_pids, q_camids, g_camids),
                              impl=args.child, version=version, num_query=int(distmat.shape[0]),
                              scale_factor=num_query / distmat.shape[0])
    _harness.emit(record)


# ------------------------------------------------------------------------------------------------ driver


def gate(best: dict[str, dict[str, Any]], tol: float) -> tuple[str, str]:
    """``gate: ok|MISMATCH`` over the full (not --nq-limit) runs, and the max abs differences (points)."""
    full = {k: v for k, v in best.items() if "error" not in v and v.get("scale_factor", 1) == 1}
    diffs: dict[str, float] = {}
    for metric in ("R1", "R5", "R10", "mAP", "mINP"):
        values = [v[metric] for v in full.values() if v.get(metric) is not None]
        if len(values) > 1:
            diffs[metric] = max(values) - min(values)
    worst = max(diffs.values(), default=0.0)
    status = "ok" if len(full) > 1 and worst <= tol else ("MISMATCH" if len(full) > 1 else "n/a (one impl)")
    detail = ", ".join(f"{m} {d:.2e}" for m, d in diffs.items())
    return status, f"max abs diff over {len(full)} impls (points): {detail}; tol {tol}"


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def report(best: dict[str, dict[str, Any]], base: str = BASELINE) -> str:
    header = ["impl", "wall s (min)", "wall max", "CPU s (min)", "peak RSS GB", "extra RSS GB", "R1", "mAP", "mINP",
              f"speedup vs {base} (wall)", "(CPU)", "runs"]
    ref = best.get(base)
    rows = []
    for impl, r in best.items():
        if "error" in r:
            rows.append([impl, "error: " + r["error"][-160:]] + [""] * (len(header) - 2))
            continue
        f = r.get("scale_factor", 1.0)
        approx = "~" if f != 1 else ""
        wall, cpu = r["wall_s"] * f, r["cpu_min_s"] * f
        speed = cspeed = None
        if ref and "error" not in ref:
            speed = ref["wall_s"] * ref.get("scale_factor", 1) / wall
            cspeed = ref["cpu_min_s"] * ref.get("scale_factor", 1) / cpu if cpu > 0 else None
        rows.append([impl, approx + _fmt(wall), approx + _fmt(r["wall_max_s"] * f), approx + _fmt(cpu, ".2f"),
                     _fmt(r["peak_rss_gb"], ".2f"), _fmt(r["extra_rss_gb"], ".3f")]
                    + [_fmt(r[m], ".4f") + ("*" if f != 1 else "") for m in ("R1", "mAP", "mINP")]
                    + [_fmt(speed, ".2f") + "x",
                     _fmt(cspeed, ".2f") + "x", r["runs"]])
    table = _harness.format_table(header, rows)
    if any(r.get("scale_factor", 1) != 1 for r in best.values()):
        table += "\n~ time scaled linearly from the first --nq-limit queries; * metrics of those queries only (not gated)"
    return table


def driver(args: argparse.Namespace) -> None:
    impls = [i.strip() for i in (args.impls or DEFAULT_IMPLS[args.scale]).split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    data = ensure_data(args.scale, args.seed)
    meta = json.loads((data / "meta.json").read_text())
    roots = {p: _peers.peer_root(p) for p in {i.split("_")[0] for i in impls if not i.startswith("ours")}}
    env = _harness.child_env(args.threads)
    load0 = _harness.load_average()
    print(f"scale {args.scale}: {meta['num_query']:,} x {meta['num_gallery']:,} float32 distmat "
          f"({meta['num_query'] * meta['num_gallery'] * 4 / 2**30:.2f} GB); threads {args.threads}; "
          f"repeat {args.repeat}; mem cap {args.mem_gb or 'none'} GB; load {load0:.2f} on {os.cpu_count()} cpus"
          + ("  [WARNING: load > cpus, timings noisy]" if load0 > (os.cpu_count() or 1) else ""), flush=True)
    for peer, root in roots.items():
        print(f"peer {peer}: {_peers.peer_source(root)} ({root})", flush=True)
    records = []
    for rep in range(args.repeat):
        for impl in impls:
            peer = impl.split("_")[0]
            argv = [str(Path(__file__).resolve()), "--child", impl, "--data", str(data), "--threads", str(args.threads)]
            if peer in roots:
                argv += ["--peer-root", str(roots[peer])]
            if args.nq_limit and impl.endswith("_py"):
                argv += ["--nq-limit", str(args.nq_limit)]
            python = sys.executable if impl.startswith("ours") else _peers.venv_python()
            rec = _harness.spawn(argv, python=python, mem_gb=args.mem_gb, env=env, timeout_s=args.timeout,
                                 label={"impl": impl, "repeat": rep, "scale": args.scale})
            print(_harness.MARKER + json.dumps(rec), flush=True)
            records.append(rec)
    best = _harness.best_of(records)
    print()
    print(f"## evaluate_rank, {args.scale} {meta['num_query']:,} x {meta['num_gallery']:,} "
          f"(load {load0:.2f} -> {_harness.load_average():.2f}; extra RSS = peak during the call minus RSS before it)")
    print(report(best))
    status, detail = gate(best, args.tol)
    print(f"gate: {status}  ({detail})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--impls", help=f"comma-separated, from {','.join(IMPLS)} (default depends on --scale)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per implementation (interleaved); min is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP/torch threads of every child (1: the Cython peers are single-threaded, and on a loaded "
                        "box extra OpenMP threads spin and inflate CPU time)")
    parser.add_argument("--mem-gb", type=float, help="RLIMIT_AS per child (GB)")
    parser.add_argument("--nq-limit", type=int, help="_py impls: evaluate only the first N queries, scale time")
    parser.add_argument("--tol", type=float, default=0.01, help="gate tolerance in percentage points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="per-child timeout (s)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--peer-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
