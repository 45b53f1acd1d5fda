"""Large-gallery search: faiss flat / IVF / HNSW against a brute-force torch matrix multiply + top-k.

    python benchmarks/search.py --gallery 1000000 --dim 512 --queries 1000   # full size (~6 GB peak)
    python benchmarks/search.py --gallery 100000 --dim 512 --queries 1000    # quick mode

Features are random clustered unit vectors, like embeddings of identities: ``gallery / cluster_size``
Gaussian centres plus Gaussian noise ``noise`` times their scale, so two draws of one cluster have cosine
about ``1 / (1 + noise^2)`` and other pairs 0 +- 1/sqrt(dim). Defaults 20 and 0.8: same-cluster cosine ~0.6,
a well-separated embedding; ``--noise 1.5`` (~0.3) is a hard case where a query's neighbours barely stand
out, and approximate indexes need many more cells visited. Queries are fresh draws around the same centres. The reference is
``reid_lab.retrieval.index.torch_search`` over the same data; its ids are the exact neighbours the neighbour
overlaps (overlap@k, what ANN benchmarks call recall@k) are measured against, and every queries/s figure is
also given as a ratio to it. Speed is measured in the same process and run, so only the ratios carry over
between machines.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import faiss
import torch

from reid_lab.retrieval.index import GalleryIndex, torch_search
from reid_lab.retrieval.search import neighbour_overlap_at_k


def clustered_features(n: int, centres: torch.Tensor, noise: float, generator: torch.Generator,
                       chunk: int = 65536) -> torch.Tensor:
    """``(n, D)`` unit vectors around random ``centres``, generated in chunks to keep the peak at one copy."""
    out = torch.empty(n, centres.shape[1])
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        which = torch.randint(0, centres.shape[0], (rows,), generator=generator)
        x = centres[which] + noise * torch.randn(rows, centres.shape[1], generator=generator)
        out[start:start + rows] = torch.nn.functional.normalize(x, dim=1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000, help="gallery size (quick mode: 100000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--cluster-size", type=int, default=20, help="gallery items per cluster (identity)")
    parser.add_argument("--noise", type=float, default=0.8,
                        help="noise scale relative to the centres' (same-cluster cosine ~ 1 / (1 + noise^2))")
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw", "ivfpq"])
    parser.add_argument("--nlist", type=int, help="ivf cells (default 4 sqrt(gallery))")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128], help="ivf settings to search with")
    parser.add_argument("--m", type=int, default=32, help="hnsw links per node")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 128], help="hnsw settings to search with")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and faiss (0: all)")
    parser.add_argument("--torch-device", default="cpu", help="device of the brute-force reference (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(max(1, args.gallery // args.cluster_size), args.dim, generator=generator)
    t = time.perf_counter()
    gallery = clustered_features(args.gallery, centres, args.noise, generator)
    queries = clustered_features(args.queries, centres, args.noise, generator)
    print(f"data: {args.gallery:,} gallery x {args.dim} float32 ({gallery.numel() * 4 / 2**20:,.0f} MiB), "
          f"{args.queries} queries, {len(centres)} clusters, noise {args.noise}, made in {time.perf_counter() - t:.1f} s; "
          f"threads torch {torch.get_num_threads()} faiss {faiss.omp_get_max_threads()}", flush=True)

    k = max(args.k, 10)
    device = torch.device(args.torch_device)
    g_dev, q_dev = gallery.to(device), queries.to(device)
    torch_search(q_dev[:8], g_dev, k)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    _, exact = torch_search(q_dev, g_dev, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ref_qps = args.queries / (time.perf_counter() - t)
    exact = exact.cpu()
    del g_dev, q_dev
    print(f"torch reference: {ref_qps:,.0f} queries/s", flush=True)
    rows = [("torch matmul+topk", f"({args.torch_device})", "-", ref_qps, 1.0, 1.0)]

    for kind in args.kinds:
        params: dict = {}
        if kind in ("ivf", "ivfpq") and args.nlist:
            params["nlist"] = args.nlist
        if kind == "hnsw":
            params.update(m=args.m, ef_construction=args.ef_construction)
        t = time.perf_counter()
        index = GalleryIndex.build(gallery, kind, device="cpu", **params)
        build = time.perf_counter() - t
        print(f"built {kind} in {build:.1f} s", flush=True)
        settings: list[dict] = [{}]
        if kind in ("ivf", "ivfpq"):
            settings = [{"nprobe": p} for p in args.nprobe if p <= index.params["nlist"]]
        elif kind == "hnsw":
            settings = [{"ef_search": e} for e in args.ef_search]
        for setting in settings:
            index.set_search_params(**setting)
            index.search(queries[:8], k)  # warm-up
            t = time.perf_counter()
            _, ids = index.search(queries, k)
            qps = args.queries / (time.perf_counter() - t)
            shown = {key: v for key, v in index.params.items() if key not in ("train_size", "device")}
            label = ", ".join(f"{key}={v}" for key, v in shown.items())
            rows.append((kind, label, f"{build:.1f}", qps, neighbour_overlap_at_k(ids, exact, 1),
                         neighbour_overlap_at_k(ids, exact, 10)))
        del index
        gc.collect()

    print(f"\n{'index':<18} {'params':<44} {'build s':>8} {'queries/s':>10} {'vs torch':>9} "
          f"{'overlap@1':>9} {'overlap@10':>10}")
    for kind, label, build, qps, r1, r10 in rows:
        print(f"{kind:<18} {label:<44} {build:>8} {qps:>10,.0f} {qps / ref_qps:>8.2f}x {r1:>9.3f} {r10:>10.3f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak resident memory {peak:.2f} GiB (overlap@k: neighbour overlap with exact torch search; ratios are queries/s over "
          f"the torch reference's)")


if __name__ == "__main__":
    main()
