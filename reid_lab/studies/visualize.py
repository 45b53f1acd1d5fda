"""``reid-lab visualize``: ranked lists of a trained model, or of an upgrade study's old / new / mixed systems.

    reid-lab visualize --ckpt-path runs/.../best.ckpt --split test --worst 50 --out reports/ranked
    reid-lab visualize --ckpt-path model.ckpt --config configs/data/market1501.yaml --root data/market1501
    reid-lab visualize --features predictions/features.pt --out reports/ranked      # from `reid-lab predict`
    reid-lab visualize --study reports/synthetic_upgrade --method bct --out reports/ranked_bct

One model: every query of the test split against its gallery (or the ``--features`` file's query / gallery
rows), worst queries first with ``--worst N`` (lowest AP), else the first ``--queries N``. An upgrade study
(``--study``, from its saved feature files): each query ranked by the old system (old → old), the hot-refresh
start (new queries → old gallery) and the new system (new → new) side by side, negatively flipped queries
(rank-1 right in the old system, wrong in another) first.

Writes to ``--out``: ``index.html`` (self-contained: thumbnails embedded), ``ranked_000.png`` ... (PNG grids)
and ``ranked.json`` (per query and system: item, pid, AP, first positive rank, the top-k items and marks).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from reid_lab.atomic import atomic_write_text
from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.embedding.features import FeatureSet
from reid_lab.studies.ranked_lists import (
    RankedList,
    SystemComparison,
    as_feature_sets,
    compare_systems,
    rank_lists,
    worst_first,
)
from reid_lab.studies.ranked_render import comparison_rows, ranked_html, write_grids


def instantiate(spec: Any) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (nested specs too), as a LightningCLI config does."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = str(spec["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    return spec


def datamodule_spec(ckpt_path: str | None, config: str | None, root: str | None) -> dict[str, Any]:
    """The data module to rank on: the ``data:`` section of ``config``, else the one the checkpoint recorded."""
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config {config} does not exist")
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
        if not isinstance(data, dict) or "class_path" not in data:
            raise ValueError(f"{config}: expected a `data:` section with class_path / init_args")
        spec = {"class_path": data["class_path"], "init_args": dict(data.get("init_args") or {})}
    else:
        hparams = dict(read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {})
        if not hparams:
            raise ValueError(f"{ckpt_path} records no data module (not written by `reid-lab fit`?): pass --config "
                             "with a data section")
        cls = ("reid_lab.data.text_datamodule.TextImageDataModule" if "tokenizer" in hparams
               else "reid_lab.data.datamodule.ReIDDataModule")
        module, _, name = cls.rpartition(".")
        accepted = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        spec = {"class_path": cls, "init_args": {k: v for k, v in hparams.items() if k in accepted}}
    if root is not None:
        spec["init_args"]["root"] = root
    spec["init_args"]["num_workers"] = min(int(spec["init_args"].get("num_workers", 0)), 2)
    return spec


def features_of_checkpoint(ckpt_path: str, config: str | None, root: str | None, device: str) -> FeatureSet:
    """The test split of the data module embedded by the checkpoint's own test-time embedder."""
    from reid_lab.studies.evaluation_split import embed_evaluation_split
    from reid_lab.upgrade.old_model import load_embedder

    embedder = load_embedder(ckpt_path)
    embedder.encoder.to(device)
    dm = instantiate(datamodule_spec(ckpt_path, config, root))
    dm.setup("test")
    features, _ = embed_evaluation_split(embedder, dm)
    return features


def _list_json(r: RankedList) -> dict[str, Any]:
    return {"query": r.query, "item": r.item, "pid": r.pid, "camid": r.camid,
            "AP": None if not r.valid else round(100 * r.ap, 4), "first_match": r.first_match,
            "items": r.items, "marks": r.marks, "distances": [round(d, 6) for d in r.distances]}


def pick(lists: Sequence[Any], worst: int | None, queries: int | None, order) -> list[Any]:
    chosen = order(lists) if worst is not None else list(lists)
    n = worst if worst is not None else queries
    return chosen if n is None else chosen[:n]


def study_systems(study: Path, method: str | None) -> tuple[dict[str, tuple[FeatureSet, FeatureSet]], str]:
    """``{"old → old", "<m> → old", "<m> → <m>"}`` from a study's feature files, and the reference name."""
    report = study / "report.json"
    if not report.is_file():
        raise FileNotFoundError(f"{report} does not exist: run the study first (reid-lab upgrade --config ...)")
    rows = json.loads(report.read_text()).get("study") or []
    names = [r.get("method") for r in rows]
    row = next((r for r in rows if r.get("method") == method), None) if method else (rows[0] if rows else None)
    if row is None:
        raise ValueError(f"{study}: no method {method!r} in the study (methods: {names})")
    old, new = row["old"], row["new"]
    paths = {v: study / "features" / f"{v}.pt" for v in (old, new)}
    for v, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist: the study kept no features of version {v!r}")
    old_q, old_g = as_feature_sets(FeatureSet.load(paths[old]))
    new_q, new_g = as_feature_sets(FeatureSet.load(paths[new]))
    systems = {f"{old} -> {old}": (old_q, old_g)}
    if new_q.features.shape[1] == old_g.features.shape[1]:
        systems[f"{new} -> {old}"] = (new_q, old_g)
    systems[f"{new} -> {new}"] = (new_q, new_g)
    return systems, f"{old} -> {old}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-lab visualize", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt-path", "--ckpt_path", dest="ckpt_path",
                        help="a reid_lab checkpoint: rank its test split")
    source.add_argument("--features", help="a feature file with query and gallery rows (reid-lab predict)")
    source.add_argument("--study", help="an upgrade study's output folder: old / mixed / new side by side")
    parser.add_argument("--config", help="with --ckpt-path: a config whose `data:` section is the data to rank "
                        "(default: the data module the checkpoint recorded)")
    parser.add_argument("--root", help="with --ckpt-path: the dataset root, if it moved")
    parser.add_argument("--split", default="test", choices=["test"], help="the split ranked (the test split)")
    parser.add_argument("--method", help="with --study: the method compared against the old model "
                        "(default: the first of the study table)")
    parser.add_argument("--top-k", type=int, default=10, help="gallery items shown per query")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--worst", type=int, help="the N worst queries (lowest AP; with --study, flips first)")
    which.add_argument("--queries", type=int, default=50, help="the first N queries (default 50)")
    parser.add_argument("--distance", default="cosine", choices=["cosine", "euclidean"],
                        help="distance the gallery is ranked by (default: cosine)")
    parser.add_argument("--device", default="cpu", help="with --ckpt-path: torch device that embeds (default: cpu)")
    parser.add_argument("--out", default="reports/ranked", help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    worst, queries = args.worst, (None if args.worst is not None else args.queries)
    if args.study:
        systems, reference = study_systems(Path(args.study), args.method)
        comparisons: list[SystemComparison] = compare_systems(systems, reference, args.top_k, args.distance)
        if worst is None:
            comparisons = sorted(comparisons, key=lambda c: c.query)
        chosen = pick(comparisons, worst, queries, lambda x: list(x))
        rows = comparison_rows(chosen)
        groups = [(f"query {c.query}" + (f": negative flip in {', '.join(c.flipped)}" if c.flipped else ""),
                   [(name, r) for name, r in c.lists.items()]) for c in chosen]
        flips = sum(1 for c in comparisons if c.flipped)
        intro = (f"{len(chosen)} of {len(comparisons)} queries; {flips} are negatively flipped in at least one "
                 f"system against {reference}.")
        records = [{"query": c.query, "flipped": c.flipped,
                    "systems": {n: _list_json(r) for n, r in c.lists.items()}} for c in chosen]
        title = f"Ranked lists: {Path(args.study).name}"
    else:
        if args.features:
            features = FeatureSet.load(args.features)
            label = Path(args.features).stem
        else:
            features = features_of_checkpoint(args.ckpt_path, args.config, args.root, args.device)
            label = Path(args.ckpt_path).stem
        query, gallery = as_feature_sets(features)
        lists = rank_lists(query, gallery, args.top_k, args.distance)
        chosen = pick(lists, worst, queries, worst_first)
        rows = [(label, r) for r in chosen]
        groups = [(f"query {r.query} (pid {r.pid})", [(label, r)]) for r in chosen]
        valid = [r for r in lists if r.valid]
        r1 = 100 * sum(r.hit for r in valid) / max(1, len(valid))
        m_ap = 100 * sum(r.ap for r in valid) / max(1, len(valid))
        intro = (f"{len(chosen)} of {len(lists)} queries ({'worst first' if worst is not None else 'in order'}); "
                 f"all queries: R1 {r1:.2f}, mAP {m_ap:.2f}.")
        records = [{"query": r.query, "systems": {label: _list_json(r)}} for r in chosen]
        title = f"Ranked lists: {label}"
    out.mkdir(parents=True, exist_ok=True)
    pngs = write_grids(rows, out)
    html = atomic_write_text(out / "index.html", ranked_html(groups, title, intro))
    atomic_write_text(out / "ranked.json", json.dumps({"title": title, "summary": intro, "queries": records},
                                                      indent=1, ensure_ascii=False))
    print(f"[visualize] {intro}")
    print(f"[visualize] {html} ({len(pngs)} PNG grids next to it, ranked.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
