"""Mined hard negatives: a hand-worked case, a naive loop, and ``reid-lab pairs --negative-sampling mined`` on
real feature files of the synthetic set."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reid_lab.cli import main as reid_lab
from reid_lab.data.mining import mine_hard_negatives
from reid_lab.embedding.features import FeatureSet


def test_a_hand_worked_case_with_identity_margin_and_skip():
    # one query of identity 7, positive similarity 0.80; candidates (similarity, identity):
    #   0: 0.95 id 7 (a match: never a negative)   1: 0.90 id 2 (> 0.95 * 0.80 = 0.76: a likely false negative)
    #   2: 0.70 id 3   3: 0.75 id 4   4: 0.20 id 5   5: 0.75 id 6 (ties 3: the pool's order keeps 3 first)
    sim = torch.tensor([[0.95, 0.90, 0.70, 0.75, 0.20, 0.75]])
    q, c = torch.tensor([7]), torch.tensor([7, 2, 3, 4, 5, 6])
    pos = torch.tensor([0.80])
    assert mine_hard_negatives(sim, q, c, 3).tolist() == [[1, 3, 5]]  # identity only
    assert mine_hard_negatives(sim, q, c, 3, margin=0.95, positive_similarity=pos).tolist() == [[3, 5, 2]]
    assert mine_hard_negatives(sim, q, c, 2, skip=1, margin=0.95, positive_similarity=pos).tolist() == [[5, 2]]
    assert mine_hard_negatives(sim, q, c, 2, exclude=torch.tensor([[0, 1, 0, 1, 0, 0]])).tolist() == [[5, 2]]
    with pytest.raises(ValueError, match=r"query 0 has 4 candidates left after removing 1 of its identity and 1 "
                                         r"above the margin \(0.95\); with skip 2 .* num_negatives = 3"):
        mine_hard_negatives(sim, q, c, 3, skip=2, margin=0.95, positive_similarity=pos)
    with pytest.raises(ValueError, match="a margin needs positive_similarity"):
        mine_hard_negatives(sim, q, c, 1, margin=0.95)


@pytest.mark.parametrize("skip, margin", [(0, None), (2, None), (0, 0.9), (1, 0.95)])
def test_mining_equals_a_naive_loop_and_never_returns_the_query_identity(skip, margin):
    torch.manual_seed(skip)
    q, c = torch.randn(20, 8), torch.randn(60, 8)
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(c, dim=1).T
    qid, cid = torch.randint(0, 6, (20,)), torch.randint(0, 6, (60,))
    pos = sim.max(dim=1).values * 0.9 + 0.1  # any positive similarity will do for the guard
    got = mine_hard_negatives(sim, qid, cid, 4, skip=skip, margin=margin, positive_similarity=pos)
    for i in range(20):
        keep = [j for j in range(60) if cid[j] != qid[i] and (margin is None or sim[i, j] <= margin * pos[i])]
        keep.sort(key=lambda j: -float(sim[i, j]))  # sorted() is stable: ties keep the pool order
        assert got[i].tolist() == keep[skip:skip + 4]
        assert all(cid[j] != qid[i] for j in got[i].tolist())


def _image_features(root, split_records, dim=8, seed=0):
    """A feature file of every image of the split: a centre per identity plus noise (so a positive is close and
    the margin keeps candidates; the test recomputes what the values imply)."""
    g = torch.Generator().manual_seed(seed)
    items = [os.path.join(root, r["file_path"]) for r in split_records]
    centres = torch.randn(1000, dim, generator=g)
    feats = torch.stack([centres[int(r["id"])] for r in split_records]) + 0.8 * torch.randn(len(items), dim, generator=g)
    return FeatureSet(feats, torch.tensor([int(r["id"]) for r in split_records]), None,
                      torch.zeros(len(items), dtype=torch.bool), items, {"space_id": "toy-8d"}, "image")


def test_reid_lab_pairs_mines_person_negatives_from_a_feature_file(tiny_synthetic, tmp_path, capsys):
    raw = [r for r in json.loads((tiny_synthetic / "reid_raw.json").read_text()) if r["split"] == "test"]
    features = _image_features(tiny_synthetic, raw).save(tmp_path / "images.pt")
    out = tmp_path / "mined.jsonl"
    assert reid_lab(["pairs", "--root", str(tiny_synthetic), "--split", "test", "--kinds", "person2person",
                     "--negatives", "3", "--negative-sampling", "mined", "--features", str(features),
                     "--margin", "0.9", "--skip", "1", "--out", str(out)]) == 0
    assert "mined negatives (margin 0.9, skip 1)" in capsys.readouterr().out
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    # the reference: pool = distinct targets of the pairs; a pool item whose identity is the query's is a match
    fs = FeatureSet.load(features)
    emb = dict(zip((os.path.realpath(i) for i in fs.items), torch.nn.functional.normalize(fs.features, dim=1)))
    pool = list(dict.fromkeys(p["target"]["image"] for p in pairs))
    pid_of = {p["target"]["image"]: p["pid"] for p in pairs}

    def e(path):
        return emb[os.path.realpath(tiny_synthetic / path)]

    guarded = 0  # pairs where the margin removed a candidate of another identity (the guard was exercised)
    for p in pairs:
        q = e(p["query"]["image"])
        positive = float(q @ e(p["target"]["image"]))
        guarded += any(pid_of[t] != p["pid"] and float(q @ e(t)) > 0.9 * positive for t in pool)
        ranked = sorted((t for t in pool if pid_of[t] != p["pid"] and float(q @ e(t)) <= 0.9 * positive),
                        key=lambda t: -float(q @ e(t)))
        assert [n["image"] for n in p["negatives"]] == ranked[1:4]
        assert all(n["image"].split("/")[-1][:4] != f"{p['pid']:04d}" for n in p["negatives"])
        assert all(n["instruction"] == p["target"]["instruction"] for n in p["negatives"])
    assert guarded > 0


def test_mined_negatives_name_what_is_missing(tiny_synthetic, tmp_path, capsys):
    raw = [r for r in json.loads((tiny_synthetic / "reid_raw.json").read_text()) if r["split"] == "test"]
    features = _image_features(tiny_synthetic, raw[:5]).save(tmp_path / "some.pt")
    with pytest.raises(ValueError, match=r"no embedding of '.*\.(jpg|png)' in the feature files"):
        reid_lab(["pairs", "--root", str(tiny_synthetic), "--split", "test", "--kinds", "person2person",
                  "--negative-sampling", "mined", "--features", str(features), "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit):
        reid_lab(["pairs", "--root", str(tiny_synthetic), "--negative-sampling", "mined"])
    assert "--negative-sampling mined needs --features" in capsys.readouterr().err
    other = _image_features(tiny_synthetic, raw).save(tmp_path / "all.pt")
    payload = torch.load(other, weights_only=True)
    payload["space"] = {"space_id": "another-model"}
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="different embedding spaces"):
        reid_lab(["pairs", "--root", str(tiny_synthetic), "--split", "test", "--kinds", "person2person",
                  "--negative-sampling", "mined", "--features", str(other), str(tmp_path / "other.pt"),
                  "--out", str(tmp_path / "y.jsonl")])
