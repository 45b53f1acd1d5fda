"""Instruction pairs: the synthetic adapter, the JSON-lines reader and its errors, the pair batches."""

from __future__ import annotations

import json

import pytest

from reid_lab.data.pair_datamodule import PairDataModule
from reid_lab.data.pairs import PairFormatError, load_pairs, synthetic_pairs, write_pairs
from reid_lab.data.text.parsers import load_text_dataset


def test_synthetic_pairs_follow_identities_and_cameras(tiny_synthetic, tmp_path):
    pairs = synthetic_pairs(tiny_synthetic, num_negatives=2, split="train")
    captions = {r.path: r.captions for r in load_text_dataset("synthetic", tiny_synthetic).train}
    kinds = {"caption2person": 0, "person2person": 0, "person2caption": 0}
    for p in pairs:
        q, t = p["query"], p["target"]
        pid = p["pid"]
        if "text" in q:
            kinds["caption2person"] += 1
            assert q["text"] in captions[str(tiny_synthetic / t["image"])]
        elif "text" in t:
            kinds["person2caption"] += 1
            assert t["text"] in captions[str(tiny_synthetic / q["image"])]
            assert all(n["text"] not in captions[str(tiny_synthetic / q["image"])] for n in p["negatives"])
        else:
            kinds["person2person"] += 1
            assert t["image"].split("/")[-1][:4] == q["image"].split("/")[-1][:4] == f"{pid:04d}"
            cams = [side["image"].split("/")[-1].split("_")[1][:2] for side in (q, t)]
            assert cams[0] != cams[1]  # another camera
        assert len(p["negatives"]) == 2
        assert all(n["image"].split("/")[-1][:4] != f"{pid:04d}" for n in p["negatives"] if "image" in n)
    assert kinds["caption2person"] == kinds["person2caption"] == len(captions) and kinds["person2person"] > 0
    out = write_pairs(pairs, tmp_path / "pairs.jsonl")
    records = load_pairs(out, image_root=tiny_synthetic)
    assert len(records) == len(pairs) and records[0].query.kind == "text" and records[0].target.kind == "image"


@pytest.mark.parametrize("line, message", [
    ('{"query": {"text": "a"}}', "missing \\['target'\\]"),
    ('{"query": {"text": "a"}, "target": {"instruction": "x"}}', "target: an item needs 'text', 'image' or both"),
    ('{"query": {"text": "a"}, "target": {"image": "nope.jpg"}}', "target.image: .*nope.jpg does not exist"),
    ('{"query": {"text": 3}, "target": {"text": "b"}}', "query.text: expected a string"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "negatives": [{"image": "x.jpg"}]}', "negatives\\[0\\]"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "pid": "7"}', "pid must be an integer"),
    ("not json", "not valid JSON"),
    # typed checks (issue 23 item 9): JSON's booleans, empty strings, objects and nulls are not what was asked
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "pid": true}', "pid must be an integer.*boolean true"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "negatives": ""}', "negatives must be an array.*string"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "negatives": {}}', "negatives must be an array.*object"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "negatives": 0}', "negatives must be an array.*integer 0"),
    ('{"query": {"text": "a", "instruction": null}, "target": {"text": "b"}}', "query.instruction: expected a string, got null"),
    ('{"query": {"text": "a"}, "target": {"text": "b", "image": null}}', "target.image: expected a string, got null"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "pid": 3, "pid": 4}', "duplicate key\\(s\\) \\['pid'\\]"),
    ('{"query": {"text": "a", "text": "b"}, "target": {"text": "b"}}', "duplicate key\\(s\\) \\['text'\\]"),
    ('{"query": {"text": "a"}, "target": {"text": "b"}, "pid": ' + "1" * 5001 + "}", "not valid JSON.*4300 digits"),
    ('[1, 2]', "expected a JSON object per line, got array"),
])
def test_bad_records_name_file_line_and_key(tmp_path, line, message):
    (tmp_path / "x.jpg").write_bytes(b"")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": {"text": "ok"}, "target": {"text": "fine"}}\n' + line + "\n")
    with pytest.raises(PairFormatError, match=f"pairs.jsonl:2: .*{message}"):
        load_pairs(path)


def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = b'{"query": {"text": "ok"}, "target": {"text": "fine"}}\n'
    path.write_bytes(good + good + '{"query": {"text": "caf\u00e9"}, "target": {"text": "b"}}\n'.encode("latin-1"))
    with pytest.raises(PairFormatError, match=r"pairs\.jsonl:3: not UTF-8 text \(byte 0xe9 at column 24\)"):
        load_pairs(path)


def test_lines_split_on_newlines_only(tmp_path):
    """A caption may hold U+2028 (valid inside a JSON string); a BOM may open the file. Both load."""
    path = tmp_path / "pairs.jsonl"
    lines = [{"query": {"text": "line\u2028separator"}, "target": {"text": "b"}}, {"query": {"text": "c"},
             "target": {"text": "d"}, "pid": 0}]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x, ensure_ascii=False) + "\r\n" for x in lines).encode())
    records = load_pairs(path)
    assert [r.query.text for r in records] == ["line\u2028separator", "c"] and records[1].pid == 0


def test_pair_batches_hold_queries_targets_and_k_negatives(tiny_synthetic, tmp_path):
    path = write_pairs(synthetic_pairs(tiny_synthetic, num_negatives=3), tmp_path / "train.jsonl")
    dm = PairDataModule(train_pairs=str(path), test_pairs=str(path), image_root=str(tiny_synthetic),
                        image_size=(64, 32), batch_size=5, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    records = dm.records("val")[:len(batch["pid"])]
    assert batch["negatives"]["image"].shape[0] == 3 * len(records)
    for i, r in enumerate(records):
        assert batch["query"]["text"][i] == r.query.text and bool(batch["query"]["has_image"][i]) == (r.query.image
                                                                                                      is not None)
        assert batch["negatives"]["instruction"][3 * i] == r.negatives[0].instruction
    uneven = tmp_path / "uneven.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    first["negatives"] = first["negatives"][:1]
    uneven.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    bad = PairDataModule(train_pairs=str(uneven), image_root=str(tiny_synthetic), num_workers=0)
    with pytest.raises(ValueError, match="same number of negatives, found \\[1, 3\\]"):
        bad.records("train")
