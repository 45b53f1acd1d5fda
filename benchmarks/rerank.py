"""Benchmark: sparse k-reciprocal re-ranking (``reid_lab.metrics.rerank``) vs the numpy reference.

One command::

    python benchmarks/rerank.py --scale tiny|market|msmt [--dim 2048] [--threads 2] [--device cpu|cuda]

Data: synthetic, structured like ``shared/reference/reid-toolboxes.md`` §4: a random centroid per identity
(scale 0.25) plus N(0, I) noise, L2-normalised; Market-like sizes (3,368 queries over 750 ids, 15,913 gallery
items of which 2,793 pid-0 distractors, 6 cameras) or MSMT17-like (11,659 x 82,161, 3,060 ids, 15 cameras).
Generated once (seeded) and cached under ``benchmarks/.cache/rerank/``.

Each implementation runs in a fresh subprocess (address-space cap ``--mem-gb``) and reports wall time, CPU
time, peak RSS (``resource.getrusage``) and the 1-min load average; the driver then scores both re-ranked
matrices with ``reid_lab.metrics.rank.evaluate_rank`` and prints their max abs difference.

The reference is the numpy ``re_ranking`` shared by torchreid and fast-reid, fed like torchreid's engine:
squared euclidean q-g, q-q and g-g distances (their time is reported apart; ours takes features and computes
its distances inside). It is never copied here: it is imported from the PyPI package ``torchreid==0.2.5``
(``torchreid/reid/utils/rerank.py``), installed with ``--no-deps`` into ``benchmarks/.cache/venv`` on first
use, or from a checkout named by ``$REID_LAB_TORCHREID_SRC`` (``torchreid/utils/rerank.py`` or
``torchreid/reid/utils/rerank.py`` under it). Only that leaf module is loaded (it needs numpy only).
At MSMT17 scale only ours runs: the reference needs several dense 93,820^2 float32 matrices (~35 GB each).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
SCALES = {
    # name: (num_query, num_gallery, num_ids, num_distractors, num_cams, default dim)
    "tiny": (300, 1500, 100, 200, 6, 256),
    "market": (3368, 15913, 750, 2793, 6, 2048),
    "msmt": (11659, 82161, 3060, 0, 15, 2048),
}
TORCHREID = "torchreid==0.2.5"
RERANK_PATHS = ("torchreid/reid/utils/rerank.py", "torchreid/utils/rerank.py")


# ------------------------------------------------------------------------------------------------ data


def make_data(scale: str, dim: int, seed: int) -> Path:
    """Generate (or reuse) the cached synthetic dataset; returns its ``.npz`` path."""
    path = CACHE / "rerank" / f"{scale}_d{dim}_s{seed}.npz"
    if path.exists():
        return path
    import torch

    nq, ng, num_ids, num_distractors, num_cams, _ = SCALES[scale]
    g = torch.Generator().manual_seed(seed)
    # Centroid scale 0.25 at 2048-d as in the reference note; scaled so the identity signal over the cosine
    # noise (s^2 sqrt(dim)) stays the same at other dims.
    centres = 0.25 * (2048 / dim) ** 0.25 * torch.randn(num_ids + 1, dim, generator=g)
    centres[0] = 0  # distractors: noise only
    q_pids = torch.arange(nq) % num_ids + 1  # every id has queries
    g_true = ng - num_distractors
    g_pids = torch.cat([torch.arange(g_true) % num_ids + 1, torch.zeros(num_distractors, dtype=torch.long)])
    pids = torch.cat([q_pids, g_pids])
    camids = torch.randint(0, num_cams, (nq + ng,), generator=g)
    feats = torch.empty(nq + ng, dim)
    for s in range(0, nq + ng, 8192):  # chunked so the MSMT noise never exists twice
        e = min(s + 8192, nq + ng)
        feats[s:e] = torch.nn.functional.normalize(
            centres[pids[s:e]] + torch.randn(e - s, dim, generator=g), dim=1
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, feats=feats.numpy(), pids=pids.numpy(), camids=camids.numpy(), num_query=nq)
    return path


def load_data(path: Path):
    z = np.load(path)
    nq = int(z["num_query"])
    f, p, c = z["feats"], z["pids"], z["camids"]
    return f[:nq], f[nq:], p[:nq], p[nq:], c[:nq], c[nq:]


# ------------------------------------------------------------------------------------------- reference


def locate_reference() -> Path:
    """Path of the reference ``rerank.py``: ``$REID_LAB_TORCHREID_SRC`` or a cached ``pip install``."""
    src = os.environ.get("REID_LAB_TORCHREID_SRC")
    roots = [Path(src)] if src else []
    venv = CACHE / "venv"
    roots += sorted(venv.glob("lib/python*/site-packages"))
    for root in roots:
        for rel in RERANK_PATHS:
            if (root / rel).is_file():
                return root / rel
    if src:
        raise FileNotFoundError(f"none of {RERANK_PATHS} under REID_LAB_TORCHREID_SRC={src}")
    print(f"installing {TORCHREID} (--no-deps) into {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", TORCHREID], check=True
    )
    return locate_reference()


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location("reference_rerank", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sq_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared euclidean distances, float32, as torchreid's ``compute_distance_matrix`` computes them."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
    d -= 2 * (a @ b.T)
    return d


# ---------------------------------------------------------------------------------------------- children


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def run_child(args: argparse.Namespace) -> None:
    qf, gf, *_ = load_data(Path(args.data))
    if args.child.startswith("ours"):  # imports and host-to-device copies stay out of the timing
        import torch

        from reid_lab.metrics.rerank import k_reciprocal_rerank, re_ranking_from_distances

        torch.set_num_threads(args.threads)
        q, g = torch.from_numpy(qf).to(args.device), torch.from_numpy(gf).to(args.device)
    else:
        module = _load_module(Path(args.reference))
    report = {"impl": args.child, "rss_before_gb": _rss_gb()}
    cpu0, t0 = time.process_time(), time.perf_counter()
    if args.child == "ours":
        out = k_reciprocal_rerank(q, g, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)
        if out.is_cuda:
            torch.cuda.synchronize()
            report["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        report["dist_s"] = 0.0
        wall = time.perf_counter() - t0
        out = out.cpu().numpy()
    elif args.child == "ours-dist":  # the reference's exact inputs through our sparse path
        q_g, q_q, g_g = _sq_euclidean(qf, gf), _sq_euclidean(qf, qf), _sq_euclidean(gf, gf)
        report["dist_s"] = time.perf_counter() - t0
        out = re_ranking_from_distances(q_g, q_q, g_g, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)
        wall = time.perf_counter() - t0
        out = out.numpy()
    else:
        q_g, q_q, g_g = _sq_euclidean(qf, gf), _sq_euclidean(qf, qf), _sq_euclidean(gf, gf)
        report["dist_s"] = time.perf_counter() - t0
        out = module.re_ranking(q_g, q_q, g_g, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)
        wall = time.perf_counter() - t0
        report["module"] = str(args.reference)
    report.update(
        wall_s=wall,
        rerank_s=wall - report["dist_s"],
        cpu_s=time.process_time() - cpu0,
        peak_rss_gb=_rss_gb(),
        load1=os.getloadavg()[0],
    )
    if args.out:
        np.save(args.out, out.astype(np.float32, copy=False))
    else:  # too big to keep: score it here
        from reid_lab.metrics.rank import evaluate_rank

        _, _, qp, gp, qc, gc = load_data(Path(args.data))
        report["mAP"] = 100 * evaluate_rank(out, qp, gp, qc, gc).mAP
    print("RESULT " + json.dumps(report), flush=True)


def spawn(impl: str, args: argparse.Namespace, data: Path, out: Path | None, reference: Path | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--data",
        str(data),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--k1",
        str(args.k1),
        "--k2",
        str(args.k2),
        "--lambda-value",
        str(args.lambda_value),
    ]
    if out is not None:
        cmd += ["--out", str(out)]
    if reference is not None:
        cmd += ["--reference", str(reference)]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        OPENBLAS_NUM_THREADS=str(args.threads),
        PYTHONPATH=str(ROOT),
    )
    limit = int(args.mem_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        cmd, env=env, preexec_fn=cap if args.device == "cpu" else None, capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"impl": impl, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument(
        "--dim", type=int, default=None, help="feature dim (default: 256 tiny, 2048 otherwise)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/BLAS threads of each child (1: the numpy reference is single-threaded but "
        "for its distance matmuls, and a loaded box penalises every parallel op)",
    )
    parser.add_argument("--device", default="cpu", help="device for ours (the reference is numpy, CPU)")
    parser.add_argument("--mem-gb", type=float, default=20.0, help="address-space cap of each CPU child")
    parser.add_argument(
        "--impls",
        default="ours,ours-dist,reference",
        help="ours: features in; ours-dist: our sparse path fed the reference's numpy distances",
    )
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    sys.path.insert(0, str(ROOT))
    import torch

    from reid_lab.metrics.rank import evaluate_rank

    dim = args.dim or SCALES[args.scale][5]
    t0 = time.perf_counter()
    data = make_data(args.scale, dim, args.seed)
    qf, gf, qp, gp, qc, gc = load_data(data)
    print(
        f"scale={args.scale}: {len(qf)} queries x {len(gf)} gallery, dim {dim}, k1={args.k1} k2={args.k2} "
        f"lambda={args.lambda_value}, threads={args.threads}, data ready in {time.perf_counter() - t0:.1f} s"
    )
    # the conditions the ratio holds under: box load, OpenMP wait policy, reid_lab's ranking threads
    print(f"load {os.getloadavg()} on {os.cpu_count()} cpus; OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; REID_LAB_RANK_THREADS "
          f"{os.environ.get('REID_LAB_RANK_THREADS', 'auto')} (ours: min(threads, free cores) unless set)")
    base = torch.empty(len(qf), len(gf))
    g = torch.from_numpy(gf)
    for s in range(0, len(qf), 2048):
        base[s : s + 2048] = torch.cdist(torch.from_numpy(qf[s : s + 2048]), g).square_()
    before = 100 * evaluate_rank(base, qp, gp, qc, gc).mAP
    del base

    impls = [i for i in args.impls.split(",") if i]
    keep = args.scale != "msmt"
    results, outputs = [], {}
    for impl in impls:
        if impl == "ours-dist" and args.scale == "msmt":
            results.append(
                {"impl": impl, "error": "skipped: its g-g input alone is 82,161^2 float32 = 27 GB"}
            )
            continue
        if impl == "reference" and args.scale == "msmt":
            results.append(
                {
                    "impl": impl,
                    "error": "skipped: infeasible, N=93,820 -> ~35 GB per dense N x N "
                    "float32 matrix and the reference holds several (reid-toolboxes.md §4)",
                }
            )
            continue
        reference = locate_reference() if impl == "reference" else None
        out = CACHE / "rerank" / f"out_{impl}.npy" if keep else None
        r = spawn(impl, args, data, out, reference)
        if out is not None and "error" not in r:
            outputs[impl] = np.load(out, mmap_mode="r")
            r["mAP"] = 100 * evaluate_rank(outputs[impl], qp, gp, qc, gc).mAP
        results.append(r)

    print(f"\nmAP before re-ranking: {before:.2f}")
    head = (
        f"{'impl':<10} {'total s':>8} {'dist s':>7} {'rerank s':>9} {'cpu s':>7} {'RSS GB start/peak':>17} "
        f"{'load1':>6} {'mAP after':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<10} {r['error']}")
            continue
        print(
            f"{r['impl']:<10} {r['wall_s']:8.1f} {r['dist_s']:7.1f} {r['rerank_s']:9.1f} {r['cpu_s']:7.1f} "
            f"{r['rss_before_gb']:8.2f}/{r['peak_rss_gb']:<8.2f} {r['load1']:6.1f} {r['mAP']:9.2f}"
            + (f"  (GPU peak {r['gpu_peak_gb']:.2f} GB)" if "gpu_peak_gb" in r else "")
        )
    ok = {r["impl"]: r for r in results if "error" not in r}
    for impl in ("ours", "ours-dist"):
        if impl not in ok or "reference" not in ok:
            continue
        a, b = outputs[impl], outputs["reference"]
        diff = max(float(np.abs(a[s : s + 512] - b[s : s + 512]).max()) for s in range(0, len(qf), 512))
        frac = sum(
            int((np.abs(a[s : s + 512] - b[s : s + 512]) > 1e-4).sum()) for s in range(0, len(qf), 512)
        )
        speed = f"speed-up {ok['reference']['wall_s'] / ok[impl]['wall_s']:.1f}x total (distances included)"
        if impl == "ours-dist":  # same distances in, so the re-ranking steps compare on their own
            speed += f", {ok['reference']['rerank_s'] / ok[impl]['rerank_s']:.1f}x re-ranking step alone"
        print(
            f"\n{impl} vs reference: max abs diff {diff:.3g}, entries differing by > 1e-4: "
            f"{100 * frac / a.size:.4f}%; {speed}"
        )
    if "ours" in ok and "reference" in ok:
        print(
            "(ours computes its own distances with torch: ulp-level differences from numpy's flip near-ties "
            "at k-NN boundaries; ours-dist, fed the same distances, shows the algorithm itself)"
        )
    for path in outputs:
        (CACHE / "rerank" / f"out_{path}.npy").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
