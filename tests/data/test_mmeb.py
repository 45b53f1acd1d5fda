"""MMEB's evaluation layout on fabricated files: the loader against the raw rows, P@1 per subset / meta-task
against VLM2Vec's per-row loop, its errors, and ``reid-lab test`` on an MMEB data config with a tiny Qwen2-VL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_lab.data.mmeb import MMEBDataModule, MMEBFormatError, load_mmeb_subset
from reid_lab.metrics.candidates import list_hits, mmeb_summary

REPO = Path(__file__).resolve().parents[2]
SUBSETS = ["ImageNet-1K", "MSCOCO_t2i", "OK-VQA"]


def fabricate_mmeb(root: Path, queries: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    """MMEB-eval rows in the official field names: classification (image query, class-name candidates, one row
    with fewer candidates), t2i retrieval (caption query, image candidates) and VQA (image + question query,
    answer candidates). Images are tiny PNGs under ``root/eval_images/<subset>/``."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {}

    def image(subset: str, name: str) -> str:
        path = root / "eval_images" / subset / f"{name}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)
        return f"{subset}/{name}.png"

    classes = [f"class {c}" for c in range(12)]
    rows["ImageNet-1K"] = []
    for i in range(queries):
        order = list(rng.permutation(12))
        k = 12 if i else 6  # a row with fewer candidates (padding)
        rows["ImageNet-1K"].append({"qry_text": "<|image_1|>\nRepresent the given image for classification",
                                    "qry_img_path": image("ImageNet-1K", f"q{i}"),
                                    "tgt_text": [classes[c] for c in order[:k]], "tgt_img_path": [""] * k})
    rows["MSCOCO_t2i"] = []
    for i in range(queries):
        order = list(rng.permutation(8))
        rows["MSCOCO_t2i"].append({"qry_text": f"Find me an everyday image that matches the given caption: a dog {i}",
                                   "qry_img_path": "",
                                   "tgt_text": ["<|image_1|>\nRepresent the given image."] * 8,
                                   "tgt_img_path": [image("MSCOCO_t2i", f"c{c}") for c in order]})
    rows["OK-VQA"] = [{"qry_text": f"<|image_1|>\nRepresent the given image with the following question: q{i}?",
                       "qry_img_path": image("OK-VQA", f"v{i}"),
                       "tgt_text": [f"answer {a}" for a in rng.permutation(20)[:15]], "tgt_img_path": [""] * 15}
                      for i in range(queries)]
    for subset, subset_rows in rows.items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        (root / subset / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset_rows))
    return rows


def naive_precision_at_1(rows: list[dict], embed, ties: str) -> float:
    """VLM2Vec ``eval.py``: per row, score the candidates by similarity, ``argmax``; a hit when it is index 0.
    ``ties="first"`` is np.argmax's rule; ``"strict"`` needs the positive to beat every other candidate."""
    hits = 0
    for row in rows:
        q = embed(row["qry_text"], row["qry_img_path"])
        scores = [float(q @ embed(t, i)) for t, i in zip(row["tgt_text"], row["tgt_img_path"])]
        hits += int(np.argmax(scores) == 0) if ties == "first" else int(all(scores[0] > s for s in scores[1:]))
    return 100.0 * hits / len(rows)


def test_subsets_load_with_distinct_items_and_rows_that_map_back(tmp_path):
    rows = fabricate_mmeb(tmp_path)
    for name in SUBSETS:
        subset = load_mmeb_subset(tmp_path, name)
        assert subset.meta_task == {"ImageNet-1K": "classification", "MSCOCO_t2i": "retrieval", "OK-VQA": "vqa"}[name]
        distinct = {(r["qry_text"], r["qry_img_path"]) for r in rows[name]}
        distinct |= {tc for r in rows[name] for tc in zip(r["tgt_text"], r["tgt_img_path"])}
        assert len(subset.items) == len(distinct)  # each (text, img_path) once, as VLM2Vec embeds them
        for i, row in enumerate(rows[name]):
            def same(item, text, path):
                clean = text.replace("<|image_1|>\n", "")
                return (item.text or "") == clean and item.image == (str(tmp_path / "eval_images" / path) if path
                                                                     else None)
            assert same(subset.items[int(subset.queries[i])], row["qry_text"], row["qry_img_path"])
            cands = [int(c) for c in subset.candidates[i] if c >= 0]
            assert len(cands) == len(row["tgt_text"])
            assert all(same(subset.items[c], t, p) for c, t, p in zip(cands, row["tgt_text"], row["tgt_img_path"]))
    assert load_mmeb_subset(tmp_path, "ImageNet-1K").candidates.shape == (4, 12)  # padded with -1
    assert int((load_mmeb_subset(tmp_path, "ImageNet-1K").candidates[0] < 0).sum()) == 6


@pytest.mark.parametrize("ties", ["strict", "first"])
def test_precision_at_1_per_subset_and_meta_task_equals_vlm2vec_loop(tmp_path, ties):
    rows = fabricate_mmeb(tmp_path, queries=6)
    g = torch.Generator().manual_seed(1)
    per_subset, tied = {}, 0
    for name in SUBSETS:
        subset = load_mmeb_subset(tmp_path, name)
        # low-precision embeddings so that exact ties happen (two items with the same rounded vector)
        table = torch.randint(-2, 3, (len(subset.items), 3), generator=g).float()
        key = {}
        for idx, item in enumerate(subset.items):
            key[(item.text or "", item.image)] = table[idx]

        def embed(text, path, key=key):
            return key[(text.replace("<|image_1|>\n", ""), str(tmp_path / "eval_images" / path) if path else None)]

        sim = (table[subset.queries] @ table.T).gather(1, subset.candidates.clamp(min=0))
        hits = list_hits(sim, subset.candidates >= 0, ties)
        tied += int((list_hits(sim, subset.candidates >= 0, "first") & ~list_hits(sim, subset.candidates >= 0)).sum())
        per_subset[name] = 100.0 * float(hits.float().mean())
        assert per_subset[name] == pytest.approx(naive_precision_at_1(rows[name], embed, ties))
    assert tied > 0  # the two tie rules were both exercised
    summary = mmeb_summary(per_subset, {s: load_mmeb_subset(tmp_path, s).meta_task for s in SUBSETS})
    assert summary["overall"] == pytest.approx(sum(per_subset.values()) / 3)
    assert summary["vqa"] == per_subset["OK-VQA"] and set(summary) == {"classification", "retrieval", "vqa",
                                                                       "overall"}


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("tgt_img_path"), r"test.jsonl:1: missing \['tgt_img_path'\]"),
    (lambda r: r.update(tgt_img_path=r["tgt_img_path"][:-1]), r"test.jsonl:1: tgt_text and tgt_img_path must be "
                                                               r"non-empty lists of one length"),
    (lambda r: r.update(qry_img_path="../../etc/passwd"), r"test.jsonl:1: query.*outside|test.jsonl:1: query"),
    (lambda r: r.update(qry_img_path="ImageNet-1K/missing.png"), r"test.jsonl:1: query: image .*missing.png does "
                                                                 r"not exist"),
    (lambda r: r.update(qry_text=3), r"test.jsonl:1: qry_text: expected a string, got int 3"),
    (lambda r: r.update(tgt_text=[""] + r["tgt_text"][1:]), r"test.jsonl:1: candidate 0: neither a text nor an "
                                                            r"image path"),
])
def test_bad_rows_name_file_line_and_key(tmp_path, edit, message):
    rows = fabricate_mmeb(tmp_path)
    row = dict(rows["ImageNet-1K"][0])
    edit(row)
    (tmp_path / "ImageNet-1K" / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(MMEBFormatError, match=message):
        load_mmeb_subset(tmp_path, "ImageNet-1K")


def test_missing_files_and_unknown_subsets_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither .*ImageNet-1K/test.jsonl nor .*ImageNet-1K/test-\*.parquet"):
        load_mmeb_subset(tmp_path, "ImageNet-1K")
    (tmp_path / "ImageNet-1K").mkdir()
    (tmp_path / "ImageNet-1K" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")  # a damaged download
    with pytest.raises(MMEBFormatError, match=r"test-00000-of-00001.parquet: not a readable parquet file"):
        load_mmeb_subset(tmp_path, "ImageNet-1K")
    (tmp_path / "ImageNet-1K" / "test-00000-of-00001.parquet").unlink()
    fabricate_mmeb(tmp_path)
    (tmp_path / "MyTask").mkdir()
    (tmp_path / "MyTask" / "test.jsonl").write_text((tmp_path / "OK-VQA" / "test.jsonl").read_text())
    with pytest.raises(ValueError, match="'MyTask' has no known meta-task: give it in meta_tasks"):
        load_mmeb_subset(tmp_path, "MyTask")
    assert load_mmeb_subset(tmp_path, "MyTask", meta_task="vqa").meta_task == "vqa"


def test_the_data_module_yields_every_item_once_with_a_global_index(tmp_path):
    fabricate_mmeb(tmp_path)
    dm = MMEBDataModule(str(tmp_path), SUBSETS, image_size=(28, 28), eval_batch_size=7, num_workers=0)
    seen = []
    for batch in dm.test_dataloader():
        side = batch["mmeb_items"]
        assert side["image"].shape[1:] == (3, 28, 28) and len(side["text"]) == len(batch["index"])
        for j, i in enumerate(batch["index"].tolist()):
            assert bool(side["has_image"][j]) == (dm.items[i].image is not None)
        seen += batch["index"].tolist()
    assert seen == list(range(sum(len(s.items) for s, _ in dm.subsets())))
    offsets = [o for _, o in dm.subsets()]
    assert offsets[0] == 0 and offsets[1] == len(dm.subsets()[0][0].items)


@pytest.mark.slow
def test_reid_lab_test_on_an_mmeb_config_logs_what_a_per_row_loop_computes(tmp_path, cli_argv, capsys):
    from reid_lab.data.pair_datamodule import PairDataset, collate_pairs
    from reid_lab.lightning_cli import run_lightning_cli
    from tests.models.vlm_fixtures import build_processor, tiny_cfg

    rows = fabricate_mmeb(tmp_path / "mmeb", queries=3)
    processor = build_processor(tmp_path / "processor")
    args = ["--config", str(REPO / "configs/data/mmeb.yaml"),
            "--model", "reid_lab.modules.vlm.VLMEmbeddingModule",
            f"--model.init_args.model_cfg={json.dumps(tiny_cfg())}", f"--model.init_args.processor_path={processor}",
            "--model.init_args.pooling=mean", f"--data.init_args.root={tmp_path / 'mmeb'}",
            f"--data.init_args.subsets={json.dumps(SUBSETS)}", "--data.init_args.image_size=[28, 28]",
            "--data.init_args.num_workers=0", "--data.init_args.eval_batch_size=8", "--seed_everything=0",
            "--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    result = run_lightning_cli(["test", *args, "--ckpt_path", "random"])  # random init: the loop is the check
    metrics = {k: float(v) for k, v in result.trainer.callback_metrics.items()}
    out = capsys.readouterr().out
    module, dm = result.model.eval(), result.datamodule

    def embed(text, path):
        item = load_mmeb_subset.__globals__["_item"](text, path, "x", tmp_path / "mmeb" / "eval_images", True)
        row = PairDataset([], dm.test_transform, dm.image_size)._item(item)  # one item alone: no padding
        side = collate_pairs([{"query": row, "target": row, "negatives": [], "pid": 0, "index": 0}])["query"]
        with torch.no_grad():
            return torch.nn.functional.normalize(module.encoder.embed_items(side).float(), dim=1)[0]

    for name in SUBSETS:
        assert metrics[f"test/mmeb/{name}/P@1"] == pytest.approx(naive_precision_at_1(rows[name], embed, "strict"),
                                                                 abs=1e-3)
        assert re.search(rf"test/mmeb/{name} \(\w+\): P@1 [\d.]+ over 3 queries, \d+ candidates each", out)
    assert metrics["test/mmeb/P@1"] == pytest.approx(sum(metrics[f"test/mmeb/{n}/P@1"] for n in SUBSETS) / 3)
    assert metrics["test/mmeb/vqa/P@1"] == pytest.approx(metrics["test/mmeb/OK-VQA/P@1"])
    assert "MMEB's tie rule" in out


def test_the_parquet_shards_of_the_dataset_read_as_their_json_lines_export(tmp_path):
    """The Hugging Face snapshot layout (``<subset>/test-0000i-of-0000n.parquet``, written here by pyarrow) gives
    the same subset as the JSON-lines export of the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = fabricate_mmeb(tmp_path / "jsonl")
    fabricate_mmeb(tmp_path / "parquet")  # the same images
    for subset, subset_rows in rows.items():
        folder = tmp_path / "parquet" / subset
        (folder / "test.jsonl").unlink()
        half = len(subset_rows) // 2  # two shards, read in name order
        for i, part in enumerate((subset_rows[:half], subset_rows[half:])):
            pq.write_table(pa.Table.from_pylist(part), folder / f"test-{i:05d}-of-00002.parquet")
        a = load_mmeb_subset(tmp_path / "jsonl", subset)
        b = load_mmeb_subset(tmp_path / "parquet", subset)
        assert [(i.text, i.instruction, i.image and Path(i.image).name) for i in a.items] == \
            [(i.text, i.instruction, i.image and Path(i.image).name) for i in b.items]
        assert torch.equal(a.queries, b.queries) and torch.equal(a.candidates, b.candidates)
        assert len(b.queries) == len(subset_rows)
    # a shard without one of the four columns is refused naming the file and the column
    folder = tmp_path / "parquet" / "OK-VQA"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "tgt_img_path"} for r in rows["OK-VQA"]]),
                   folder / "test-00001-of-00002.parquet")
    with pytest.raises(MMEBFormatError, match=r"test-00001-of-00002.parquet: missing column\(s\) \['tgt_img_path'\]"):
        load_mmeb_subset(tmp_path / "parquet", "OK-VQA")
