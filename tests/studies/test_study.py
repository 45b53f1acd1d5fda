"""`reid-lab upgrade` end to end on a tiny synthetic set: stages, report, claims, resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from reid_lab.cli import main
from reid_lab.embedding.features import FeatureSet
from reid_lab.metrics.rank import evaluate_rank_reference
from reid_lab.studies.study import Study, StudyConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _study(root: Path, out: Path) -> dict:
    tiny = {
        "data.init_args.root": str(root),
        "data.init_args.image_size": [64, 32],
        "data.init_args.batch_size": 8,
        "data.init_args.eval_batch_size": 64,
        "data.init_args.num_workers": 0,
        "trainer.max_epochs": 2,
        "trainer.check_val_every_n_epoch": 1,
        "trainer.limit_train_batches": 2,
        "trainer.accelerator": "cpu",
    }
    return {
        "study": {
            "name": "tiny_upgrade",
            "out": str(out),
            "configs": [str(REPO / "configs/data/synthetic.yaml"), str(REPO / "configs/trainer/cpu_demo.yaml")],
            "scenario": {"kind": "extended_class", "old_fraction": 0.5, "seed": 0,
                         "old_model": {"backbone": "resnet18"}, "new_model": {"backbone": "resnet18"}},
            "old": {"configs": [str(REPO / "configs/model/bot_r18.yaml")], "overrides": tiny},
            "new": {"configs": [str(REPO / "configs/model/bot_r18.yaml")], "overrides": tiny},
            "methods": {
                "independent": {},
                "bct": {"compatible_losses": [{"name": "bct"}]},
                "fastfill": {"transformation": {"of": "independent", "epochs": 2, "hidden_dim": 32, "warmup_epochs": 0}},
            },
            "evaluation": {"orderings": ["random", "uncertainty", "oracle", "sigma"], "ratios": [0, 0.5, 1.0]},
        }
    }


def test_upgrade_study_end_to_end_and_resume(tiny_synthetic, tmp_path, cli_argv, capsys):
    out = tmp_path / "study"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_study(tiny_synthetic, out)))
    assert main(["upgrade", "--config", str(config)]) == 0
    printed = capsys.readouterr().out

    # Split saved, one training stage per version, features and report written.
    split = json.loads((out / "split" / "split.json").read_text())
    assert split["kind"] == "extended_class"
    for version in ("old", "independent", "bct"):
        assert (out / "train" / version / "done.json").is_file()
        assert (out / "train" / version / "config.yaml").is_file()
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "compatibility_matrix.png", "backfill_mAP.png", "flips.png"):
        assert (out / name).is_file(), name
    assert "bct" in printed and "independent" in printed

    # One wandb folder per study: a run per trained stage and the report run, typed and tagged.
    from tests.wandb_records import read_records

    assert not list((out / "train").glob("*/wandb"))
    runs = {}
    for log in (out / "wandb").glob("offline-run-*/run-*.wandb"):
        run = next(r.run for r in read_records(log) if r.WhichOneof("record_type") == "run")
        runs[run.display_name] = run
    assert set(runs) == {"tiny_upgrade-old", "tiny_upgrade-independent", "tiny_upgrade-bct", "tiny_upgrade-report"}
    assert runs["tiny_upgrade-old"].job_type == "train-old" and runs["tiny_upgrade-bct"].job_type == "train-new"
    assert runs["tiny_upgrade-report"].job_type == "upgrade-report"
    assert {"study:tiny_upgrade", "method:bct", "encoder:resnet18", "scenario:extended_class"} <= set(
        runs["tiny_upgrade-bct"].tags)

    # The matrix in the report equals a direct evaluation of the saved features (independent reference).
    feats = {v: FeatureSet.load(out / "features" / f"{v}.pt") for v in ("old", "bct")}
    q_new, _ = feats["bct"].split()
    q_old, g_old = feats["old"].split()
    qn = torch.nn.functional.normalize(q_new.features, dim=1)
    go = torch.nn.functional.normalize(g_old.features, dim=1)
    cross = evaluate_rank_reference(1 - qn @ go.T, q_old.pids, g_old.pids, q_old.camids, g_old.camids)
    bct_old = next(c for c in report["compatibility_matrix"]["cells"] if c["query"] == "bct" and c["gallery"] == "old")
    assert bct_old["mAP"] == pytest.approx(100 * cross.mAP, abs=1e-4)

    # Claims: recorded exactly when the criterion held by the margin and clear of chance (5 random rankings
    # under the reference evaluator here: an independent estimate of the chance level).
    old_self = evaluate_rank_reference(
        1 - torch.nn.functional.normalize(q_old.features, dim=1) @ go.T,
        q_old.pids, g_old.pids, q_old.camids, g_old.camids,
    )
    generator = torch.Generator().manual_seed(123)
    chance = sum(evaluate_rank_reference(torch.rand(len(q_old.pids), len(g_old.pids), generator=generator),
                                         q_old.pids, g_old.pids, q_old.camids, g_old.camids).mAP
                 for _ in range(5)) / 5
    bct_space = feats["bct"].space
    claim = next((c for c in bct_space["claims"] if c["gallery_space"] == feats["old"].space["space_id"]), None)
    if claim is not None:
        assert claim["cross"] == pytest.approx(100 * cross.mAP, abs=1e-4)
        assert claim["cross"] > claim["reference"] + claim["margin"] and claim["margin"] == 1.0
        assert claim["chance"] == pytest.approx(100 * chance, abs=5.0) and "test" in claim["split"]
    else:
        assert 100 * cross.mAP <= 100 * old_self.mAP + 1.0 or 100 * cross.mAP <= 100 * chance + 5.0
    assert bct_space["parent"] == feats["old"].space["space_id"]

    # Resumption: a finished study is skipped stage by stage ...
    stamp = (out / "train" / "bct" / "done.json").stat().st_mtime
    assert main(["upgrade", "--config", str(config)]) == 0
    assert (out / "train" / "bct" / "done.json").stat().st_mtime == stamp
    # ... and a stage killed after its last checkpoint resumes from it instead of starting over.
    (out / "train" / "independent" / "done.json").unlink()
    (out / "features" / "independent.pt").unlink()
    assert main(["upgrade", "--config", str(config)]) == 0
    assert "resuming from" in capsys.readouterr().out

    # A changed method re-runs with everything downstream of it; unchanged stages are reused.
    old_stamp = (out / "train" / "old" / "done.json").stat().st_mtime
    bct_key = json.loads((out / "train" / "bct" / "done.json").read_text())["key"]
    bct_features = FeatureSet.load(out / "features" / "bct.pt").features
    changed = _study(tiny_synthetic, out)
    changed["study"]["methods"]["bct"] = {"compatible_losses": [{"name": "ract", "weight": 5.0}]}
    config.write_text(yaml.safe_dump(changed))
    assert main(["upgrade", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "[train bct] its config, inputs or code changed" in printed and "[train old] done earlier" in printed
    assert (out / "train" / "old" / "done.json").stat().st_mtime == old_stamp
    retrained = json.loads((out / "train" / "bct" / "done.json").read_text())
    assert retrained["key"] != bct_key
    assert "ract" in (out / "train" / "bct" / "config.yaml").read_text()
    assert not torch.equal(FeatureSet.load(out / "features" / "bct.pt").features, bct_features)


def test_bad_study_config_is_explained(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"study": {"name": "x", "scenario": {"kind": "extended_class"},
                                                "old": {}, "new": {}, "methods": {"a": {"losses": []}}}}))
    assert main(["upgrade", "--config", str(config)]) == 2
    assert "unknown key(s) ['losses']" in capsys.readouterr().err


def test_multi_step_chain_reports_ac_and_am(tiny_synthetic, tmp_path, cli_argv, capsys):
    out = tmp_path / "chain"
    study = _study(tiny_synthetic, out)["study"]
    for stage in ("old", "new"):
        study[stage]["overrides"].update({"data.init_args.batch_size": 4, "data.init_args.num_instances": 2,
                                          "trainer.max_epochs": 1})
    study["scenario"]["fractions"] = [0.34, 0.67, 1.0]
    study["scenario"]["old_fraction"] = 0.34
    study["methods"] = {"bct": {"compatible_losses": [{"name": "bct"}]}}
    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump({"study": study}))
    assert main(["upgrade", "--config", str(config)]) == 0
    report = json.loads((out / "report.json").read_text())
    cells = {(c["query"], c["gallery"]): c["mAP"] for c in report["compatibility_matrix"]["cells"]}
    chain = ["old", "bct@2", "bct@3"]
    # AC and AM by hand from the lower-triangular matrix (CoReS definitions).
    ac = sum(cells[(chain[t], chain[k])] > cells[(chain[k], chain[k])] for t in range(3) for k in range(t)) / 3
    am = sum(cells[(chain[t], chain[k])] for t in range(3) for k in range(t + 1)) / 6
    row = next(r for r in report["study"] if r["method"] == "bct")
    assert row["AC"] == pytest.approx(ac) and row["AM"] == pytest.approx(am)
    assert "Multi-step compatibility" in (out / "report.md").read_text()
    steps = [json.loads((out / "split" / f"step{t}.json").read_text())["paths"] for t in (1, 2, 3)]
    assert set(steps[0]) < set(steps[1]) < set(steps[2])  # extended-class chain: nested training sets


def test_every_plugin_and_override_is_checked_before_anything_trains(tiny_synthetic, tmp_path, capsys):
    study = _study(tiny_synthetic, tmp_path / "s")
    study["study"]["methods"]["late"] = {"compatible_losses": [{"name": "bcd"}]}  # a typo in the last method
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(study))
    assert main(["upgrade", "--config", str(config)]) == 2  # the CLI exits 2 and names the key
    assert "study.methods.late: unknown compatible loss 'bcd'" in capsys.readouterr().err
    assert not (tmp_path / "s" / "train").exists()  # nothing trained before the error

    study = _study(tiny_synthetic, tmp_path / "s")
    study["study"]["scenario"]["new_model"] = {"backbone": "resnet18", "embeding_dim": 64}
    config.write_text(yaml.safe_dump(study))
    assert main(["upgrade", "--config", str(config)]) == 2
    assert "scenario.new_model has unknown argument(s) ['embeding_dim']" in capsys.readouterr().err
    # the same checks hold for the Python API, before anything trains
    with pytest.raises(ValueError, match=r"scenario.new_model has unknown argument\(s\) \['embeding_dim'\]"):
        Study(StudyConfig.load(config)).run()


def test_a_dimension_change_study_reports_the_cross_test_through_the_adapter(tiny_synthetic, tmp_path, cli_argv):
    out = tmp_path / "dim"
    study = _study(tiny_synthetic, out)["study"]
    study["scenario"]["new_model"] = {"backbone": "resnet18", "embedding_dim": 64}
    # independent: trained without the old model, so no adapter into the old space (it crashed the evaluation)
    study["methods"] = {"independent": {}, "bct": {"compatible_losses": [{"name": "bct"}], "adapter": "linear"}}
    study["evaluation"] = {"orderings": ["random"], "ratios": [0, 0.5, 1.0]}
    config = tmp_path / "dim.yaml"
    config.write_text(yaml.safe_dump({"study": study}))
    assert main(["upgrade", "--config", str(config)]) == 0
    report = json.loads((out / "report.json").read_text())
    cells = {(c["query"], c["gallery"]): c["mAP"] for c in report["compatibility_matrix"]["cells"]}
    # The cross cell is the adapted new queries against the old gallery, evaluated independently here.
    projected = FeatureSet.load(out / "features" / "bct.in_old_space.pt")
    old_q, old_g = FeatureSet.load(out / "features" / "old.pt").split()
    q = torch.nn.functional.normalize(projected.split()[0].features, dim=1)
    g = torch.nn.functional.normalize(old_g.features, dim=1)
    cross = evaluate_rank_reference(1 - q @ g.T, old_q.pids, old_g.pids, old_q.camids, old_g.camids)
    assert projected.features.shape[1] == old_g.features.shape[1] == 512
    assert FeatureSet.load(out / "features" / "bct.pt").features.shape[1] == 64
    assert cells[("bct", "old")] == pytest.approx(100 * cross.mAP, abs=1e-4)
    assert "bct" in report["curves"]
    rows = {r["method"]: r for r in report["study"]}
    assert ("independent", "old") not in cells and rows["independent"]["cross_test"] is None
    assert rows["independent"]["claim"] is None and "no adapter" in rows["independent"]["note"]
    assert rows["bct"]["claim"]["cross"] == pytest.approx(cells[("bct", "old")])
    assert "through its learned adapter" in rows["bct"]["note"]
    assert not (out / "features" / "independent.in_old_space.pt").exists()


def _poison_test_labels(root: Path) -> None:
    """Give every query image of the test split another identity's pid (its camera kept): every test ranking
    changes, the training folder stays byte for byte the same."""
    import random
    import re

    queries = sorted(p for p in (root / "query").glob("*.jpg") if re.match(r"^\d{4}_", p.name))
    pids = sorted({int(p.name[:4]) for p in queries})
    rng = random.Random(0)
    for p in queries:
        other = rng.choice([q for q in pids if q != int(p.name[:4])])
        target = p.with_name(f"{other:04d}{p.name[4:]}")
        if not target.exists():
            p.rename(target)


def test_checkpoints_are_selected_without_reading_the_test_split(tiny_synthetic, tmp_path, cli_argv):
    """Poison the test split's labels: every selection (checkpoints, validation metrics) stays the same, while
    the test metrics move (so the poison reached what the report reads)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root)
    runs = {}
    for name in ("clean", "poisoned"):
        if name == "poisoned":
            _poison_test_labels(root)
        cfg = _study(root, tmp_path / name)
        cfg["study"]["methods"] = {"bct": {"compatible_losses": [{"name": "bct"}]}}
        cfg["study"]["evaluation"] = {"orderings": ["random"], "ratios": [0, 1.0]}
        cfg["study"]["logger"] = "none"
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        assert main(["upgrade", "--config", str(config)]) == 0
        runs[name] = {v: json.loads((tmp_path / name / "train" / v / "done.json").read_text())
                      for v in ("old", "bct")}
        runs[name]["report"] = json.loads((tmp_path / name / "report.json").read_text())
    clean, poisoned = runs["clean"], runs["poisoned"]
    for version in ("old", "bct"):
        assert Path(clean[version]["checkpoint"]).name == Path(poisoned[version]["checkpoint"]).name
        assert clean[version]["val"] == poisoned[version]["val"] and clean[version]["val"]
    for version in ("old", "bct"):  # a selected checkpoint that is not the last one keeps weights only
        best, last = Path(clean[version]["checkpoint"]), tmp_path / "clean" / "train" / version / "checkpoints" / "last.ckpt"
        assert "optimizer_states" in torch.load(last, weights_only=True)
        if best != last:
            assert "optimizer_states" not in torch.load(best, weights_only=True)
    assert "val/cross/i2i/mAP" in clean["bct"]["val"]  # a compatible method is chosen on its validation cross-test
    assert Path(clean["bct"]["checkpoint"]).name.startswith("epoch") and "mAP" in Path(clean["bct"]["checkpoint"]).name
    cells = {(c["query"], c["gallery"]): c["mAP"] for c in clean["report"]["compatibility_matrix"]["cells"]}
    moved = {(c["query"], c["gallery"]): c["mAP"] for c in poisoned["report"]["compatibility_matrix"]["cells"]}
    assert cells[("old", "old")] != pytest.approx(moved[("old", "old")], abs=1e-6)
    protocol = clean["report"]["protocol"]
    assert "held-out training identities" in protocol["validation"] and "val/cross/i2i/mAP" in protocol["selection"]
    val = json.loads((tmp_path / "clean" / "split" / "val.json").read_text())
    trained = {p for side in ("old", "new") for p in json.loads(
        (tmp_path / "clean" / "split" / f"{side}.json").read_text())["paths"]}
    assert val["paths"] and not (set(val["paths"]) & trained)


def _folder_from_synthetic(src: Path, dst: Path) -> None:
    """The tiny synthetic set in the `folder` layout: root/id<pid>/<image>, cameras kept in the file names."""
    import shutil

    for split in ("bounding_box_train", "query", "bounding_box_test"):
        for p in sorted((src / split).glob("*.jpg")):
            pid = int(p.name.split("_")[0])
            if pid > 0:
                (dst / f"id{pid:04d}").mkdir(parents=True, exist_ok=True)
                shutil.copy(p, dst / f"id{pid:04d}" / f"{split}_{p.name}")


def _poison_folder_test_ids(root: Path, test_ids: list[str]) -> None:
    """Move the images of each test identity into the next test identity's folder (cyclically): every test label
    changes, the training identities' folders (and so the train / validation split) stay as they were."""
    import shutil

    moves = [(root / a, root / b) for a, b in zip(test_ids, test_ids[1:] + test_ids[:1])]
    staged = []
    for a, b in moves:
        tmp = a.with_name(a.name + ".moving")
        shutil.move(a, tmp)
        staged.append((tmp, b))
    for tmp, b in staged:
        shutil.move(tmp, b)


def test_a_folder_study_selects_checkpoints_without_reading_the_test_split(tiny_synthetic, tmp_path, cli_argv):
    """The poison check on the `folder` format (identity folders, cameras from a file-name regex)."""
    from reid_lab.data.datasets import load_dataset

    root = tmp_path / "folder"
    _folder_from_synthetic(tiny_synthetic, root)
    options = {"camera_regex": "_c(?P<cam>\\d+)s", "train_fraction": 0.5, "num_query_per_id": 1, "seed": 0}
    splits = load_dataset("folder", root, **options)
    test_ids = sorted({Path(r.path).parent.name for r in splits.query + splits.gallery})
    train_ids = sorted({Path(r.path).parent.name for r in splits.train})
    assert len(test_ids) >= 2 and not set(test_ids) & set(train_ids)
    runs = {}
    for name in ("clean", "poisoned"):
        if name == "poisoned":
            _poison_folder_test_ids(root, test_ids)
        cfg = _study(root, tmp_path / name)
        for stage in ("old", "new"):
            cfg["study"][stage]["overrides"].update({"data.init_args.dataset": "folder",
                                                     "data.init_args.dataset_options": options})
        cfg["study"]["methods"] = {"bct": {"compatible_losses": [{"name": "bct"}]}}
        cfg["study"]["evaluation"] = {"orderings": ["random"], "ratios": [0, 1.0]}
        cfg["study"]["logger"] = "none"
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        assert main(["upgrade", "--config", str(config)]) == 0
        runs[name] = {v: json.loads((tmp_path / name / "train" / v / "done.json").read_text()) for v in ("old", "bct")}
        runs[name]["report"] = json.loads((tmp_path / name / "report.json").read_text())
    for version in ("old", "bct"):
        assert Path(runs["clean"][version]["checkpoint"]).name == Path(runs["poisoned"][version]["checkpoint"]).name
        assert runs["clean"][version]["val"] == runs["poisoned"][version]["val"] and runs["clean"][version]["val"]
    cells = [{(c["query"], c["gallery"]): c["mAP"] for c in runs[n]["report"]["compatibility_matrix"]["cells"]}
             for n in ("clean", "poisoned")]
    assert cells[0][("old", "old")] != pytest.approx(cells[1][("old", "old")], abs=1e-6)


def test_a_bt2_study_trains_against_its_independent_model_and_cross_tests_the_first_old_dims(tiny_synthetic, tmp_path,
                                                                                           cli_argv):
    out = tmp_path / "bt2"
    study = _study(tiny_synthetic, out)["study"]
    basis = {"old_dim": 512, "add_dim": 8, "orthogonal_map": "cayley"}
    study["methods"] = {
        "independent": {},
        "bt2": {"compatible_losses": [{"name": "bt2"}], "adapter": "truncate", "reference": "independent",
                "overrides": {"model.init_args.basis_transform": basis}},
    }
    study["evaluation"] = {"orderings": ["random"], "ratios": [0, 0.5, 1.0]}
    study["logger"] = "none"
    config = tmp_path / "bt2.yaml"
    config.write_text(yaml.safe_dump({"study": study}, sort_keys=False))  # the order of methods is the order of stages
    assert main(["upgrade", "--config", str(config)]) == 0
    # φ_n* is the study's own independent model, read from its selected checkpoint
    independent = json.loads((out / "train" / "independent" / "done.json").read_text())["checkpoint"]
    stage = yaml.safe_load((out / "train" / "bt2" / "config.yaml").read_text())
    assert stage["model"]["init_args"]["upgrade"]["reference_checkpoint"] == independent
    # the embedding grows by add_dim; the cross-test reads its first old_dim coordinates (BT²'s truncation)
    own = FeatureSet.load(out / "features" / "bt2.pt")
    projected = FeatureSet.load(out / "features" / "bt2.in_old_space.pt")
    assert own.features.shape[1] == 520 and projected.features.shape[1] == 512
    torch.testing.assert_close(projected.features, own.features[:, :512])
    report = json.loads((out / "report.json").read_text())
    cells = {(c["query"], c["gallery"]): c["mAP"] for c in report["compatibility_matrix"]["cells"]}
    old_q, old_g = FeatureSet.load(out / "features" / "old.pt").split()
    q = torch.nn.functional.normalize(projected.split()[0].features, dim=1)
    g = torch.nn.functional.normalize(old_g.features, dim=1)
    cross = evaluate_rank_reference(1 - q @ g.T, old_q.pids, old_g.pids, old_q.camids, old_g.camids)
    assert cells[("bt2", "old")] == pytest.approx(100 * cross.mAP, abs=1e-4)
    assert ("bt2", "bt2") in cells and "bt2" in report["curves"]
    rows = {r["method"]: r for r in report["study"]}
    assert "through its first old-dimension coordinates (truncate adapter)" in rows["bt2"]["note"]


@pytest.mark.parametrize("methods, message", [
    ({"bt2": {"compatible_losses": [{"name": "bt2"}], "reference": "independent"}, "independent": {}},
     "reference must name an independently trained method listed before it"),
    ({"bct": {"compatible_losses": [{"name": "bct"}]},
      "bt2": {"compatible_losses": [{"name": "bt2"}], "reference": "bct"}},
     "reference must name an independently trained method"),
    ({"independent": {}, "bt2": {"reference": "independent"}}, "give compatible_losses"),
])
def test_a_reference_model_is_checked_before_anything_trains(tiny_synthetic, tmp_path, methods, message):
    cfg = _study(tiny_synthetic, tmp_path / "out")
    cfg["study"]["methods"] = methods
    with pytest.raises(ValueError, match=message):
        StudyConfig.load(cfg)
