"""Ranked lists against a hand-worked case and a naive per-query reference; `reid-lab visualize` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reid_lab.cli import main as cli_main
from reid_lab.embedding.features import FeatureSet
from reid_lab.studies.ranked_lists import compare_systems, rank_lists, worst_first


def _fs(features, pids, camids, is_query, items=None, modality="image"):
    n = len(pids)
    return FeatureSet(torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(pids),
                      None if camids is None else torch.as_tensor(camids), torch.as_tensor(is_query),
                      items or [f"item{i}" for i in range(n)], modality=modality)


def test_hand_worked_list_marks_and_ap():
    # One query (pid 1, camera 0) on the unit circle; gallery angles make the ranking g0 < g1 < g2 < g3 < g4.
    angles = [0.1, 0.2, 0.3, 0.4, 0.5]
    gallery = _fs([[np.cos(a), np.sin(a)] for a in angles], [1, 2, 1, 9, 1], [0, 1, 1, 1, 2], [False] * 5)
    query = _fs([[1.0, 0.0]], [1], [0], [True])
    (r,) = rank_lists(query, gallery, top_k=5)
    assert r.gallery == [0, 1, 2, 3, 4]
    # g0: same pid same camera -> junk; g1: pid 2 not queried -> distractor; g3: pid 9 -> distractor
    assert r.marks == ["junk", "distractor", "correct", "distractor", "correct"]
    # After dropping the junk g0, positives sit at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5, first match rank 1.
    assert r.ap == pytest.approx(0.5)
    assert r.first_match == 1 and not r.hit and r.valid


def test_wrong_vs_distractor_depends_on_what_is_queried():
    gallery = _fs([[1.0, 0.0], [0.9, 0.1]], [2, 3], [1, 1], [False, False])
    query = _fs([[1.0, 0.0], [0.0, 1.0]], [1, 2], [0, 0], [True, True])
    lists = rank_lists(query, gallery, top_k=2)
    assert lists[0].marks == ["wrong", "distractor"]  # pid 2 is queried, pid 3 is not
    assert not lists[0].valid and np.isnan(lists[0].ap)


def _naive_first_match_and_ap(d_row, q_pid, q_cam, g_pids, g_cams):
    order = np.argsort(d_row, kind="stable")
    kept = [i for i in order if not (g_pids[i] == q_pid and g_cams[i] == q_cam)]
    hits = np.array([g_pids[i] == q_pid for i in kept])
    if not hits.any():
        return -1, float("nan"), order
    ranks = np.flatnonzero(hits)
    ap = np.mean([(k + 1) / (r + 1) for k, r in enumerate(ranks)])
    return int(ranks[0]), float(ap), order


def test_random_split_agrees_with_a_naive_per_query_loop():
    rng = np.random.default_rng(0)
    q = _fs(rng.normal(size=(15, 8)), rng.integers(0, 5, 15), rng.integers(0, 3, 15), [True] * 15)
    g_pids, g_cams = rng.integers(0, 8, 60), rng.integers(0, 3, 60)
    g = _fs(rng.normal(size=(60, 8)), g_pids, g_cams, [False] * 60)
    qn = q.features / q.features.norm(dim=1, keepdim=True)
    gn = g.features / g.features.norm(dim=1, keepdim=True)
    dist = (1 - qn @ gn.T).numpy()
    lists = rank_lists(q, g, top_k=12, chunk_size=4)  # several chunks
    queried = set(q.pids.tolist())
    for i, r in enumerate(lists):
        first, ap, order = _naive_first_match_and_ap(dist[i], int(q.pids[i]), int(q.camids[i]), g_pids, g_cams)
        assert r.gallery == order[:12].tolist()
        assert r.first_match == first
        assert (np.isnan(r.ap) and np.isnan(ap)) or r.ap == pytest.approx(ap)
        for j, m in zip(r.gallery, r.marks):
            same = g_pids[j] == q.pids[i]
            expected = ("junk" if g_cams[j] == q.camids[i] else "correct") if same else (
                "wrong" if g_pids[j] in queried else "distractor")
            assert m == expected
    order = worst_first(lists)
    valid_aps = [r.ap for r in order if r.valid]
    assert valid_aps == sorted(valid_aps) and all(not r.valid for r in order[len(valid_aps):])


def test_compare_systems_puts_the_known_negative_flip_first():
    # Two queries; the old system answers both right; the new queries find a wrong identity first for query 1.
    old_g = _fs([[1.0, 0.0], [0.0, 1.0]], [1, 2], [1, 1], [False, False])
    old_q = _fs([[1.0, 0.1], [0.1, 1.0]], [1, 2], [0, 0], [True, True])
    new_q = _fs([[1.0, 0.1], [0.9, 0.2]], [1, 2], [0, 0], [True, True])
    comps = compare_systems({"old": (old_q, old_g), "cross": (new_q, old_g)}, "old", top_k=2)
    assert comps[0].query == 1 and comps[0].flipped == ["cross"]
    assert comps[1].flipped == []
    with pytest.raises(ValueError, match="other queries"):
        shuffled = _fs(new_q.features.flip(0), [2, 1], [0, 0], [True, True], items=["item1", "item0"])
        compare_systems({"old": (old_q, old_g), "cross": (shuffled, old_g)}, "old")


def _feature_file(tmp_path, n_ids=4, per_id=3):
    rng = np.random.default_rng(1)
    paths, pids, cams, flags = [], [], [], []
    for pid in range(n_ids):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        for k in range(per_id):
            p = tmp_path / "img" / f"{pid:04d}_c{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 32), colour).save(p)
            paths.append(str(p))
            pids.append(pid)
            cams.append(k)
            flags.append(k == 0)
    feats = torch.as_tensor(rng.normal(size=(len(paths), 6)), dtype=torch.float32)
    fs = FeatureSet(feats, torch.tensor(pids), torch.tensor(cams), torch.tensor(flags), paths,
                    {"space_id": "test"})
    return fs.save(tmp_path / "features.pt"), fs


def test_visualize_cli_on_a_feature_file(tmp_path, capsys):
    path, fs = _feature_file(tmp_path)
    out = tmp_path / "ranked"
    assert cli_main(["visualize", "--features", str(path), "--worst", "3", "--top-k", "4", "--out", str(out)]) == 0
    data = json.loads((out / "ranked.json").read_text())
    assert len(data["queries"]) == 3
    # worst first: AP never decreases down the page
    aps = [q["systems"]["features"]["AP"] for q in data["queries"]]
    assert aps == sorted(aps)
    html = (out / "index.html").read_text()
    assert html.count("<img") == 3 * (1 + 4) and "src=\"data:image/jpeg;base64," in html
    with Image.open(out / "ranked_000.png") as im:
        assert im.height > 3 * 48  # three rows of 96x48 thumbnails
    printed = capsys.readouterr().out
    assert "all queries: R1" in printed


def test_visualize_refuses_a_file_without_queries(tmp_path):
    _, fs = _feature_file(tmp_path)
    only_gallery = fs.select(~fs.is_query)
    only_gallery.save(tmp_path / "gallery.pt")
    with pytest.raises(ValueError, match="query and gallery rows"):
        cli_main(["visualize", "--features", str(tmp_path / "gallery.pt"), "--out", str(tmp_path / "o")])


def test_visualize_ckpt_path_ranks_what_load_embedder_embeds(tiny_synthetic, tmp_path):
    """The checkpoint path (data module rebuilt from the checkpoint) gives the APs of features made by
    `reid_lab.load_embedder` from the image files: another route from pixels to embeddings."""
    import reid_lab
    from reid_lab.data.datamodule import ReIDDataModule
    from reid_lab.modules.reid import ReIDModule
    from tests.conftest import save_module_checkpoint

    torch.manual_seed(0)
    module = ReIDModule(backbone="resnet18", num_classes=4, last_stride=2)
    dm_hparams = {"dataset": "synthetic", "root": str(tiny_synthetic), "image_size": [64, 32], "num_workers": 0}
    ckpt = save_module_checkpoint(module, tmp_path / "m.ckpt", dm_hparams)
    out = tmp_path / "ranked"
    assert cli_main(["visualize", "--ckpt_path", str(ckpt), "--queries", "1000", "--top-k", "3",
                     "--out", str(out)]) == 0
    shown = {q["systems"]["m"]["item"]: q["systems"]["m"] for q in json.loads((out / "ranked.json").read_text())["queries"]}

    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), num_workers=0)
    dm.setup("test")
    records, flags = dm.eval_records()
    embed = reid_lab.load_embedder(ckpt)
    feats = embed([r.path for r in records])
    fs = FeatureSet(feats, torch.tensor([r.pid for r in records]), torch.tensor([r.camid for r in records]),
                    torch.tensor(flags), [r.path for r in records])
    q, g = fs.split()
    reference = rank_lists(q, g, top_k=3)
    assert len(shown) == len(reference) > 0
    for r in reference:
        s = shown[r.item]
        assert s["first_match"] == r.first_match
        assert (s["AP"] is None and not r.valid) or s["AP"] == pytest.approx(100 * r.ap, abs=1e-3)


def test_caption_queries_are_drawn_as_text(tmp_path):
    """Text-to-person: caption queries (no cameras, nothing junk) show their text in the grid and the page."""
    from reid_lab.studies.ranked_render import grid_image, ranked_html

    _, images = _feature_file(tmp_path)
    gallery = images.select(~images.is_query)
    g = FeatureSet(gallery.features, gallery.pids, None, gallery.is_query, gallery.items)
    captions = ["a person in a red coat", "a person with a green bag"]
    q = FeatureSet(g.features[[0, 3]] + 0.01, torch.tensor([0, 1]), None, torch.tensor([True, True]), captions,
                   modality="text")
    lists = rank_lists(q, g, top_k=3)
    assert [r.modality for r in lists] == ["text", "text"] and "junk" not in lists[0].marks
    picture = grid_image([("clip", r) for r in lists])
    assert picture.height > 2 * 48
    page = ranked_html([("q", [("clip", r) for r in lists])], "captions")
    assert '<div class="caption">a person in a red coat</div>' in page
