"""The benchmark scripts run at toy scale (no timing is asserted) and their built-in checks hold.

Benchmarks are run by hand, so nothing else notices when a library change breaks one. Here each script that
needs no peer package runs at a toy size: backfill's incremental curve must equal its per-β rebuild, the
exact faiss index must find the exact neighbours, the throughput scripts must time every mode (the CLIP one on
the same model in both modes), the text-to-image reference must agree with the chunked engine. The peer-based
scripts (eval_rank, eval_features, rerank) install fast-reid / torchreid at run time and are not run here.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backfill_incremental_curve_equals_per_beta_rebuild(capsys):
    load("backfill").main(["--scale", "tiny", "--dim", "16", "--repeats", "1", "--per-beta", "yes"])
    out = capsys.readouterr().out
    for mode in ("evaluate", "backfill x1", "backfill x3", "per-β"):
        assert re.search(rf"{re.escape(mode)}: median\s+[\d.]+ s", out), out
    gap = float(re.search(r"max \|difference\| ([\d.e+-]+) over the grid", out).group(1))
    assert gap < 1e-9


def test_search_flat_is_exact_and_every_index_reports_recall(capsys):
    load("search").main([
        "--gallery", "3000", "--dim", "16", "--queries", "40", "--kinds", "flat", "ivf", "hnsw",
        "--nprobe", "4", "--ef-search", "16", "--m", "8", "--ef-construction", "16", "--threads", "1",
    ])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"(flat|ivf|hnsw)\s", line)}
    assert set(rows) == {"flat", "ivf", "hnsw"}, out
    assert rows["flat"].split()[-2:] == ["1.000", "1.000"]  # recall@1, recall@10 of the exact index
    for kind in ("ivf", "hnsw"):
        recall_1, recall_10 = (float(v) for v in rows[kind].split()[-2:])
        assert 0.0 <= recall_1 <= 1.0 and 0.0 <= recall_10 <= 1.0


@pytest.mark.slow
def test_train_throughput_times_every_mode(tiny_synthetic, capsys):
    load("train_throughput").main([
        "--data", str(tiny_synthetic), "--backbone", "resnet18", "--image-size", "64", "32",
        "--batch-size", "8", "--num-instances", "2", "--steps", "2", "--warmup", "1", "--rounds", "1",
        "--workers", "0", "--threads", "1",
    ])
    out = capsys.readouterr().out
    for mode in ("lightning", "plain", "compute", "data w=0"):
        assert re.search(rf"^{re.escape(mode)}\s+[\d,.]+\s", out, re.MULTILINE), out
    assert "lightning / plain:" in out


def test_text_to_image_reference_agrees_with_the_chunked_engine(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _harness
    bench = load("text_to_image_eval")
    args = argparse.Namespace(queries=40, gallery=600, dim=16, images_per_id=6, noise=2.0, seed=0)
    q, g, q_pids, g_pids = bench.planted_embeddings(args)
    ours, ref = bench._impl("reid_lab")(q, g, q_pids, g_pids), bench._impl("full_argsort")(q, g, q_pids, g_pids)
    assert set(ours) == set(ref) == set(bench.METRICS)
    for name in bench.METRICS:
        assert ours[name] == pytest.approx(ref[name], abs=1e-9), name
    assert 0 < ours["mAP"] < 100  # planted identities: neither chance nor perfect


@pytest.mark.slow
def test_text_to_image_eval_runs_both_children_and_gates(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    load("text_to_image_eval").main(["--queries", "50", "--gallery", "2000", "--dim", "16", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "error" not in out, out
    assert re.search(r"gate: ok", out), out


@pytest.mark.slow
def test_clip_train_step_times_lightning_and_open_clip_on_the_same_model(capsys):
    load("clip_train_step").main(["--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1",
                                  "--threads", "1"])
    out = capsys.readouterr().out
    for mode in ("lightning", "plain"):
        assert re.search(rf"^{mode}\s+[\d.]+\s", out, re.MULTILINE), out
    losses = re.search(r"first-step loss: lightning ([\d.]+), plain ([\d.]+)", out)
    assert float(losses.group(1)) == pytest.approx(float(losses.group(2)), rel=1e-5)  # same model, same data
    assert "lightning overhead:" in out


def test_vlm_grad_cache_benchmark_same_loss_and_less_activation_memory(capsys):
    load("vlm_grad_cache").main(["--batch-size", "8", "--chunks", "2", "--rounds", "1", "--steps", "1",
                                 "--threads", "1"])
    out = capsys.readouterr().out
    rows = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^(full|grad_cache\(2\))\s+([\d.]+)\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+([\d.]+)x$", out, re.M)}
    assert set(rows) == {"full", "grad_cache(2)"}, out
    assert rows["grad_cache(2)"][0] == pytest.approx(rows["full"][0], abs=1e-6)  # the same step's loss
    assert rows["grad_cache(2)"][1] < 0.5  # a chunk of 2 out of 8 holds well under half the activations


def test_large_gallery_stays_within_its_budget_at_toy_scale(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling _harness
    load("large_gallery").main(["--gallery", "30000", "--queries", "64", "--budget-mb", "40", "--threads", "1"])
    out = capsys.readouterr().out
    assert "torch threads 1" in out and "load (" in out  # the settings and load it ran under
    assert re.search(r"30,000: [\d.]+ s \(floor [\d.]+ s in [\d,]+-row chunks\), extra -?\d+ MiB within the 40 MiB budget",
                     out), out
