"""``pair_infonce`` across two gloo ranks: every rank's targets and hard negatives are candidates of every query.

The references are single-process: the full batch's loss and gradients (what DDP's average of the ranks'
gradients must equal), and a naive loop of VLM2Vec's cross-entropy for ranks that hold different numbers of
pairs. Two forked processes run every case: they inherit the imported modules, so the test costs seconds, not
two fresh interpreters' imports of torch and open_clip.
"""

from __future__ import annotations

import math
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from reid_lab.losses.image_text import pair_infonce
from reid_lab.modules.grad_cache import grad_cache_backward
from reid_lab.modules.vlm import slice_pair_batch

B, K, D = 6, 2, 5  # pairs in the full batch, hard negatives per pair, embedding size
SCALE = torch.tensor(math.log(20.0), dtype=torch.float64)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, D, generator=g, dtype=torch.float64) for n in (B, B, B * K))


def _features(seed: int = 1):
    """Inputs of a linear encoder: queries, targets, negatives ``(n, 7)``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 7, generator=g, dtype=torch.float64) for n in (B, B, B * K))


def _encoder() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(7, D).double()


def _naive(query, candidates, positives) -> float:
    """VLM2Vec's cross-entropy written as a loop: ``-log softmax(s q_i · c_j)[positive_i]``, averaged."""
    s = math.exp(float(SCALE))
    total = 0.0
    for q, p in zip(query, positives):
        q = q / q.norm()
        logits = [s * float(q @ (c / c.norm())) for c in candidates]
        top = max(logits)
        total -= logits[p] - top - math.log(sum(math.exp(v - top) for v in logits))
    return total / len(query)


def _worker(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (as DataLoader workers)
    results: dict = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        q, t, n = _data()
        half = B // 2
        rows, neg_rows = slice(half * rank, half * rank + half), slice(half * K * rank, half * K * (rank + 1))
        # 1. even split, with and without hard negatives: loss and input gradients
        for case, negatives in (("negatives", n), ("none", None)):
            lq, lt = q[rows].clone().requires_grad_(True), t[rows].clone().requires_grad_(True)
            ln = negatives[neg_rows].clone().requires_grad_(True) if negatives is not None else None
            loss = pair_infonce(lq, lt, ln, SCALE)
            loss.backward()
            results[(case, rank)] = (float(loss), lq.grad.tolist(), lt.grad.tolist(),
                                     ln.grad.tolist() if ln is not None else None)
        # 2. uneven split: rank 0 holds 4 pairs, rank 1 holds 2 (a short last batch)
        sizes = (4, 2)
        start = sum(sizes[:rank])
        uneven = slice(start, start + sizes[rank])
        results[("uneven", rank)] = float(pair_infonce(q[uneven], t[uneven], n[start * K:(start + sizes[rank]) * K],
                                                       SCALE))
        # 3. GradCache under DDP: a linear encoder, chunks of 2 pairs, the all-reduce after the last chunk
        fq, ft, fn = _features()
        model = DistributedDataParallel(_encoder())
        batch = {"query": {"x": fq[rows]}, "target": {"x": ft[rows]},
                 "negatives": {"x": fn[neg_rows], "text": [""] * (half * K)},
                 "pid": torch.arange(half), "index": torch.arange(half)}

        def embed(chunk):
            return {side: model(chunk[side]["x"]) for side in ("query", "target", "negatives")}

        def loss_fn(reps):
            return pair_infonce(reps["query"], reps["target"], reps["negatives"], SCALE), None

        grad_cache_backward(batch, half, 2, embed, loss_fn, no_sync=model.no_sync, slicer=slice_pair_batch,
                            params=list(model.parameters()))
        results[("grad_cache", rank)] = [p.grad.tolist() for p in model.parameters()]
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the parent reports the child's traceback
        results = {"error": traceback.format_exc()}
    queue.put(results)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    workers = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    try:
        results = [queue.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    return {k: v for r in results for k, v in r.items()}


@pytest.mark.parametrize("case", ["negatives", "none"])
def test_two_ranks_give_the_full_batch_loss_and_gradients(two_ranks, case):
    """DDP averages the ranks' losses and gradients: both must equal the one-process full batch's, which needs
    every rank's targets and negatives among each query's candidates, with gradients flowing back to their rank."""
    q, t, n = (x.clone().requires_grad_(True) for x in _data())
    full = pair_infonce(q, t, n if case == "negatives" else None, SCALE)
    full.backward()
    full = full.detach()
    ranks = [two_ranks[(case, r)] for r in (0, 1)]
    assert (ranks[0][0] + ranks[1][0]) / 2 == pytest.approx(float(full), rel=1e-12)
    for k, reference in enumerate((q, t, n)[: 3 if case == "negatives" else 2], start=1):
        averaged = torch.tensor(ranks[0][k] + ranks[1][k], dtype=torch.float64) / 2
        torch.testing.assert_close(averaged, reference.grad, rtol=1e-9, atol=1e-12)


def test_ranks_of_different_sizes_score_against_every_candidate(two_ranks):
    """4 pairs on rank 0 and 2 on rank 1: each query's candidates are the 6 targets and 12 negatives of both
    ranks, its positive at its global row (a naive loop over the single-process tensors)."""
    q, t, n = _data()
    candidates = torch.cat([t, n])
    assert two_ranks[("uneven", 0)] == pytest.approx(_naive(q[:4], candidates, range(0, 4)), rel=1e-10)
    assert two_ranks[("uneven", 1)] == pytest.approx(_naive(q[4:], candidates, range(4, 6)), rel=1e-10)


def test_grad_cache_under_ddp_equals_the_full_batch_step(two_ranks):
    """GradCache in chunks of 2 pairs on each of two DDP ranks (negatives sliced along) leaves DDP's averaged
    parameter gradients equal to one process's plain backward of the full batch's loss."""
    fq, ft, fn = _features()
    model = _encoder()
    pair_infonce(model(fq), model(ft), model(fn), SCALE).backward()
    for rank in (0, 1):
        for got, param in zip(two_ranks[("grad_cache", rank)], model.parameters()):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), param.grad, rtol=1e-9, atol=1e-12)
