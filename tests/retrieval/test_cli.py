from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reid_lab.embedding.features import FeatureSet
from reid_lab.embedding.space import make_space
from reid_lab.retrieval.cli import main


def toy_space(name: str, dim: int) -> dict:
    """A space record for hand-made features: one per name (the name stands in for the weights)."""
    return make_space("toy", dim, state_dict={name: torch.zeros(1)}, label=name)



def write_features(path, num_query: int, num_gallery: int, dim: int, space: dict, seed: int = 0) -> FeatureSet:
    """Query rows first, then gallery rows; 6 identities."""
    rng = np.random.default_rng(seed)
    n = num_query + num_gallery
    x = rng.standard_normal((n, dim)).astype(np.float32)
    features = FeatureSet(
        torch.from_numpy(x), torch.from_numpy(rng.integers(0, 6, n)), torch.from_numpy(rng.integers(0, 3, n)),
        torch.arange(n) < num_query, [f"cam/{i:03d}.jpg" for i in range(n)], space,
    )
    features.save(path)
    return features


def exact_ids(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return np.argsort(-(q.astype(np.float64) @ g.astype(np.float64).T), axis=1)[:, :k]


@pytest.fixture
def feature_file(tmp_path):
    space = toy_space("toy-8d", 8)
    return tmp_path / "feats.pt", write_features(tmp_path / "feats.pt", 7, 40, 8, space)


def test_build_and_search_end_to_end(tmp_path, feature_file, capsys):
    path, features = feature_file
    assert main(["build", "--features", str(path), "--kind", "flat", "--out", str(tmp_path / "idx")]) == 0
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(path), "--k", "5",
                 "--out", str(tmp_path / "res.json")]) == 0
    assert "7 queries x 40 gallery" in capsys.readouterr().out
    result = json.loads((tmp_path / "res.json").read_text())
    query, gallery = features.split()
    expected = exact_ids(query.features.numpy(), gallery.features.numpy(), 5)
    assert result["ids"] == expected.tolist()
    assert result["gallery_pids"] == gallery.pids.numpy()[expected].tolist()
    assert result["gallery_paths"][0][0] == gallery.paths[expected[0, 0]]
    assert result["query_paths"] == query.paths and result["gallery_space"] == features.space["space_id"]
    assert 0 <= result["metrics"]["R1"] <= 100

    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(path), "--k", "5",
                 "--out", str(tmp_path / "res.pt")]) == 0
    payload = torch.load(tmp_path / "res.pt", weights_only=True)
    assert payload["ids"].tolist() == expected.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.pt", "idx", "res.json", "res.pt"]


def test_ivf_build_with_split_all(tmp_path, feature_file):
    path, features = feature_file
    assert main(["build", "--features", str(path), "--split", "all", "--kind", "ivf", "--nlist", "2",
                 "--nprobe", "2", "--out", str(tmp_path / "idx")]) == 0
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(path), "--split", "all",
                 "--k", "3", "--out", str(tmp_path / "res.json")]) == 0
    result = json.loads((tmp_path / "res.json").read_text())
    x = features.features.numpy()
    assert result["ids"] == exact_ids(x, x, 3).tolist()


def test_missing_and_foreign_files_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["build", "--features", str(missing), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    text = tmp_path / "notes.pt"
    text.write_text("not a tensor file")
    assert main(["build", "--features", str(text), "--out", str(tmp_path / "idx")]) == 2
    assert "is not a reid_lab feature file" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "noidx"), "--queries", str(text), "--out",
                 str(tmp_path / "r.json")]) == 2
    assert str(tmp_path / "noidx") in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_dim_mismatch_and_incompatible_space_exit_2(tmp_path, feature_file, capsys):
    path, _ = feature_file
    assert main(["build", "--features", str(path), "--out", str(tmp_path / "idx")]) == 0
    wide = write_features(tmp_path / "wide.pt", 3, 5, 16, dict(toy_space("toy-8d", 8), dim=16))
    assert wide.features.shape[1] == 16
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "wide.pt"),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "wide.pt") in err and "dim 16" in err and "Traceback" not in err

    write_features(tmp_path / "other.pt", 3, 5, 8, toy_space("other-8d", 8), seed=1)
    args = ["search", "--index", str(tmp_path / "idx"), "--queries", str(tmp_path / "other.pt"),
            "--out", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other-8d" in err and "toy-8d" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    assert main([*args, "--allow-unverified"]) == 0
    assert (tmp_path / "r.json").exists()


def test_bad_arguments_exit_2(tmp_path, feature_file, capsys):
    path, _ = feature_file
    assert main(["build", "--features", str(path), "--kind", "annoy", "--out", str(tmp_path / "i")]) == 2
    assert main(["build", "--features", str(path), "--kind", "flat", "--nlist", "4", "--out",
                 str(tmp_path / "i")]) == 2
    assert "nlist" in capsys.readouterr().err
    assert main(["build", "--features", str(path), "--out", str(tmp_path / "idx")]) == 0
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(path), "--out",
                 str(tmp_path / "r.csv")]) == 2
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(path), "--k", "41", "--out",
                 str(tmp_path / "r.json")]) == 2
    assert "--k 41" in capsys.readouterr().err


def test_search_against_exact_reports_neighbour_overlap(tmp_path, feature_file, capsys):
    """--exact: neighbour overlap@1/@k of the index with brute-force search, checked against numpy's exact top-k."""
    path, features = feature_file
    query, gallery = features.split()
    expected = exact_ids(query.features.numpy(), gallery.features.numpy(), 5)
    for kind, extra in (("flat", []), ("ivf", ["--nlist", "4", "--nprobe", "1"])):
        out = tmp_path / kind
        assert main(["build", "--features", str(path), "--kind", kind, *extra, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["search", "--index", str(out), "--queries", str(path), "--k", "5", "--exact", str(path),
                     "--out", str(tmp_path / f"{kind}.json")]) == 0
        printed = capsys.readouterr().out
        ids = np.array(json.loads((tmp_path / f"{kind}.json").read_text())["ids"])
        overlap1 = np.mean([ids[i, 0] in expected[i, :1] for i in range(len(ids))])
        overlap5 = np.mean([len(set(ids[i]) & set(expected[i])) / 5 for i in range(len(ids))])
        assert "overlap@1" in printed and "overlap@5" in printed and "speed-up" in printed
        assert "recall" not in printed and "not the retrieval R@k" in printed
        assert f"{overlap1:.3f}" in printed and f"{overlap5:.3f}" in printed
        if kind == "flat":
            assert overlap1 == overlap5 == 1.0


def test_exact_file_of_another_gallery_exits_2(tmp_path, feature_file, capsys):
    path, _ = feature_file
    other = tmp_path / "other.pt"
    write_features(other, 3, 12, 8, toy_space("toy-8d", 8))
    assert main(["build", "--features", str(path), "--kind", "flat", "--out", str(tmp_path / "idx")]) == 0
    assert main(["search", "--index", str(tmp_path / "idx"), "--queries", str(path), "--exact", str(other),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "other.pt" in err and "(12, 8)" in err and "(40, 8)" in err
