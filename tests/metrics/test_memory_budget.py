"""Gallery rankings within a memory budget: the same numbers whatever the budget and the thread count, and the
budget honoured (peak extra resident memory measured in a fresh subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from reid_lab.metrics import evaluate_features, evaluate_rank_reference
from reid_lab.metrics.backfill import backfill_curves, order_random
from reid_lab.metrics.distance import (
    _distance_slices,
    _prepare,
    check_memory_budget,
    ranking_plan,
    reserved_bytes,
)
from reid_lab.metrics.ranking_engine import THREADS_ENV, shared_machine_threads

NUM_QUERY, NUM_GALLERY, DIM = 300, 20_000, 24  # 300 queries: one product block, ranked in 3 blocks of 100
SMALL = 40 << 20  # >= 3 gallery tiles at this size (see test_budgets_really_change_the_plan)
MEDIUM = 64 << 20  # whole rows, in smaller products


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    g_pids = torch.randint(0, 500, (NUM_GALLERY,), generator=gen)
    q_pids = g_pids[torch.randint(0, NUM_GALLERY, (NUM_QUERY,), generator=gen)]
    g_camids = torch.randint(0, 6, (NUM_GALLERY,), generator=gen)
    q_camids = torch.randint(0, 6, (NUM_QUERY,), generator=gen)
    # coarse values: many exactly tied distances, so the tie rule is exercised across tile borders
    g = (torch.randn(NUM_GALLERY, DIM, generator=gen) * 2).round() / 2
    q = (torch.randn(NUM_QUERY, DIM, generator=gen) * 2).round() / 2
    return q, g, q_pids, g_pids, q_camids, g_camids


def _same(a, b) -> None:
    assert np.array_equal(a.first_match_rank, b.first_match_rank)
    assert np.array_equal(a.all_AP, b.all_AP, equal_nan=True)
    assert np.array_equal(a.all_INP, b.all_INP, equal_nan=True)
    assert np.array_equal(a.cmc, b.cmc) and a.mAP == b.mAP and a.mINP == b.mINP


def test_budgets_really_change_the_plan():
    # what evaluate_features reserves for cosine (normalised copies of both sides) and its pid index
    reserved = reserved_bytes(NUM_GALLERY) + (NUM_GALLERY + NUM_QUERY) * DIM * 4
    default = ranking_plan(check_memory_budget(None, torch.device("cpu"), reserved), NUM_QUERY, NUM_GALLERY, 4,
                           reserved)
    medium = ranking_plan(MEDIUM, NUM_QUERY, NUM_GALLERY, 4, reserved)
    small = ranking_plan(SMALL, NUM_QUERY, NUM_GALLERY, 4, reserved)
    # default: one 300-row product of whole rows; medium: whole rows in two 150-row products; small: 300-row
    # products in >= 3 gallery tiles (each ranking block then gets its pairs from its own product)
    assert default.columns >= NUM_GALLERY and default.product_rows >= NUM_QUERY
    assert medium.columns >= NUM_GALLERY and medium.product_rows < NUM_QUERY
    assert -(-NUM_GALLERY // small.columns) >= 3 and small.product_rows >= NUM_QUERY


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_is_identical_whatever_the_budget_and_threads(metric, monkeypatch):
    q, g, q_pids, g_pids, q_camids, g_camids = _data()
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setenv(THREADS_ENV, str(threads))
            for budget in (None, SMALL, MEDIUM):
                results[threads, budget] = evaluate_features(q, g, q_pids, g_pids, q_camids, g_camids, metric=metric,
                                                             memory_budget=budget)
    finally:
        torch.set_num_threads(before)
    base = results[1, None]
    for result in results.values():
        _same(result, base)
    # and the numbers are the protocol's: the per-row stable-argsort reference on the same distances
    query, gallery, g_sq = _prepare(q, g, metric, None)
    distmat = torch.cat([block.clone() for _, block in _distance_slices(query, gallery, g_sq, NUM_QUERY)])
    reference = evaluate_rank_reference(distmat, q_pids, g_pids, q_camids, g_camids)
    assert np.array_equal(reference.first_match_rank, base.first_match_rank)
    np.testing.assert_allclose(reference.all_AP, base.all_AP, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reference.all_INP, base.all_INP, rtol=0, atol=1e-12)


def test_cross_modal_and_half_gallery_are_identical_whatever_the_budget():
    q, g, q_pids, g_pids, _, _ = _data(1)
    q = torch.nn.functional.normalize(q, dim=1)
    g_half = torch.nn.functional.normalize(g, dim=1).half()
    kwargs = {"metric": "cosine", "normalize": False}
    full = evaluate_features(q, g_half.float(), q_pids, g_pids, None, None, **kwargs)
    for budget in (SMALL, None):
        _same(evaluate_features(q, g_half, q_pids, g_pids, None, None, memory_budget=budget, **kwargs), full)


def test_backfill_curves_are_identical_whatever_the_budget():
    q, g, q_pids, g_pids, q_camids, g_camids = _data(2)
    g_new = g + 0.5 * torch.randn(g.shape, generator=torch.Generator().manual_seed(3))
    orders = {"random": order_random(NUM_GALLERY, seed=0), "reverse": torch.arange(NUM_GALLERY - 1, -1, -1)}
    ratios = (0.0, 0.5, 1.0)
    curves = {budget: backfill_curves(q, g, g_new, q_pids, g_pids, q_camids, g_camids, orders, ratios=ratios,
                                      memory_budget=budget) for budget in (None, SMALL)}
    for name in orders:
        assert curves[SMALL][name].values == curves[None][name].values
    # the ends of the curve are plain evaluations of the stored and of the new gallery
    for step, gallery in ((0, g), (2, g_new)):
        summary = evaluate_features(q, gallery, q_pids, g_pids, q_camids, g_camids).summary()
        for key, value in summary.items():
            assert curves[SMALL]["random"].values[key][step] == pytest.approx(value, abs=1e-9)


def test_budgets_below_the_minimum_are_refused():
    q, g, q_pids, g_pids, q_camids, g_camids = _data()
    with pytest.raises(ValueError, match="memory_budget must be at least .* for the gallery.s pid index"):
        evaluate_features(q, g, q_pids, g_pids, q_camids, g_camids, memory_budget=1 << 20)
    with pytest.raises(ValueError, match="memory_budget must be an integer"):
        evaluate_features(q, g, q_pids, g_pids, q_camids, g_camids, memory_budget=1.5e9)


def test_ranking_threads_follow_the_setting(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert shared_machine_threads(8) == 3
    monkeypatch.setenv(THREADS_ENV, "torch")
    assert shared_machine_threads(8) == 8
    monkeypatch.setenv(THREADS_ENV, "auto")
    assert 1 <= shared_machine_threads(8) <= 8
    assert shared_machine_threads(1) == 1
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match="REID_LAB_RANK_THREADS must be 'auto', 'torch' or a positive integer"):
        shared_machine_threads(2)


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from reid_lab.metrics import evaluate_features
    from reid_lab.metrics.backfill import backfill_curves, order_random

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    torch.set_num_threads(1)
    path, num_gallery, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    gen = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(num_gallery, 32, generator=gen), dim=1)
    g_pids = torch.randint(0, num_gallery // 10, (num_gallery,), generator=gen)
    g_camids = torch.randint(0, 6, (num_gallery,), generator=gen)
    q, q_pids = g[:256].clone(), g_pids[:256].clone()
    q_camids = (g_camids[:256] + 1) % 6
    if path == "backfill":
        g_new = torch.nn.functional.normalize(g + 0.1 * torch.randn(g.shape, generator=gen), dim=1)
        order = {"random": order_random(num_gallery, seed=0)}
        run = lambda: backfill_curves(q, g, g_new, q_pids, g_pids, q_camids, g_camids, order, ratios=(0.0, 1.0),
                                      memory_budget=budget)
    else:
        run = lambda: evaluate_features(q, g, q_pids, g_pids, q_camids, g_camids, memory_budget=budget)
    # once per process, not per call: the compiled ranking kernel's code (numba / LLVM, ~50 MB) loads on first use
    evaluate_features(q[:20], g[:2000], q_pids[:20], g_pids[:2000], q_camids[:20], g_camids[:2000])
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident memory
    run()
    print(json.dumps({"extra": hwm() - base}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize("path", ["evaluate", "backfill"])
def test_memory_budget_is_honoured_in_a_fresh_process(path):
    # 400k gallery items: one 256-row block of full rows alone is 400 MB of distances (800 MB for the two
    # galleries of a backfill curve), 4x the budget; the budget also pays for the normalised copies (51 MB each)
    num_gallery, budget = 400_000, (100 if path == "evaluate" else 200) << 20
    out = subprocess.run([sys.executable, "-c", _MEASURE, path, str(num_gallery), str(budget)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    assert extra <= budget, f"{path}: {extra / 2**20:.0f} MiB extra resident memory, budget {budget / 2**20:.0f} MiB"
