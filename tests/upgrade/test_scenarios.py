"""Upgrade scenarios: split counts checked by hand on a small training set, determinism, files and configs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from reid_lab.data.records import ImageRecord, relabel
from reid_lab.upgrade.scenario import ScenarioConfig, load_scenario
from reid_lab.upgrade.split_files import load_split, save_split
from reid_lab.upgrade.splits import SCENARIO_KINDS, chain_splits, label_map, split_training_set

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "scenario"

# pid -> number of images; pid 0 has a single image (the open-data rule), 37 images in all.
COUNTS = [1, 2, 3, 4, 5, 6, 7, 2, 3, 4]


def make_records() -> list[ImageRecord]:
    return [
        ImageRecord(f"train/{pid:04d}_c{i % 3}_{i:02d}.jpg", pid, i % 3)
        for pid, n in enumerate(COUNTS)
        for i in range(n)
    ]


def pids(records: list[ImageRecord]) -> set[int]:
    return {r.pid for r in records}


def paths(records: list[ImageRecord]) -> set[str]:
    return {r.path for r in records}


def per_pid(records: list[ImageRecord]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in records:
        counts[r.pid] = counts.get(r.pid, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ the four kinds


def test_extended_data_covers_every_identity_with_half_of_its_images() -> None:
    records = make_records()
    split = split_training_set(records, "extended_data", old_fraction=0.5, seed=0)
    # round half up, at least one: n=1->1, 2->1, 3->2, 4->2, 5->3, 6->3, 7->4
    assert per_pid(split.old) == {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 1, 8: 2, 9: 2}
    assert len(split.old) == 21
    assert paths(split.old) < paths(split.new)
    assert sorted(split.new) == sorted(records)
    assert split.dropped == []
    assert split.summary() == {
        "kind": "extended_data", "old_fraction": 0.5, "seed": 0, "old_ids": 10, "old_images": 21,
        "new_ids": 10, "new_images": 37, "shared_ids": 10, "shared_images": 21, "dropped_images": 0,
    }


def test_extended_data_keeps_at_least_one_image_per_identity() -> None:
    split = split_training_set(make_records(), "extended_data", old_fraction=0.01, seed=3)
    assert per_pid(split.old) == dict.fromkeys(range(10), 1)


@pytest.mark.parametrize(("fraction", "num_old_ids"), [(0.5, 5), (0.35, 4), (0.3, 3), (0.01, 1), (0.99, 9)])
def test_extended_class_takes_all_images_of_a_fraction_of_identities(fraction: float, num_old_ids: int) -> None:
    records = make_records()
    split = split_training_set(records, "extended_class", old_fraction=fraction, seed=0)
    # round half up (0.35 * 10 -> 4), clamped to 1 .. N-1 so that the new side gains an identity
    assert len(pids(split.old)) == num_old_ids
    assert split.old == sorted((r for r in records if r.pid in pids(split.old)), key=lambda r: r.path)
    assert sorted(split.new) == sorted(records)
    assert paths(split.old) < paths(split.new)


def test_open_data_splits_images_of_the_same_identities_and_drops_single_image_ids() -> None:
    split = split_training_set(make_records(), "open_data", old_fraction=0.5, seed=0)
    assert paths(split.old).isdisjoint(paths(split.new))
    assert pids(split.old) == pids(split.new) == set(range(1, 10))
    assert [r.pid for r in split.dropped] == [0]
    # clamp(round half up, 1, n-1): n=2->1, 3->2, 4->2, 5->3, 6->3, 7->4
    assert per_pid(split.old) == {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 1, 8: 2, 9: 2}
    assert per_pid(split.new) == {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 1, 8: 1, 9: 2}
    assert len(split.old) + len(split.new) + len(split.dropped) == 37
    summary = split.summary()
    assert (summary["shared_ids"], summary["shared_images"], summary["dropped_images"]) == (9, 0, 1)


def test_open_data_picks_the_same_old_images_as_extended_data() -> None:
    records = make_records()
    open_split = split_training_set(records, "open_data", old_fraction=0.5, seed=4)
    extended = split_training_set(records, "extended_data", old_fraction=0.5, seed=4)
    assert paths(open_split.old) == paths(extended.old) - paths(open_split.dropped)


def test_open_class_gives_disjoint_identities() -> None:
    records = make_records()
    split = split_training_set(records, "open_class", old_fraction=0.3, seed=0)
    assert len(pids(split.old)) == 3
    assert pids(split.old).isdisjoint(pids(split.new))
    assert pids(split.old) | pids(split.new) == set(range(10))
    assert sorted(split.old + split.new) == sorted(records)


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("kind", SCENARIO_KINDS)
def test_split_is_deterministic_and_independent_of_input_order(kind: str) -> None:
    records = make_records()
    shuffled = list(records)
    random.Random(123).shuffle(shuffled)
    first = split_training_set(records, kind, old_fraction=0.5, seed=7)
    assert split_training_set(records, kind, old_fraction=0.5, seed=7) == first
    assert split_training_set(shuffled, kind, old_fraction=0.5, seed=7) == first
    assert first.old == sorted(first.old, key=lambda r: r.path)


@pytest.mark.parametrize("kind", SCENARIO_KINDS)
def test_different_seed_gives_a_different_split(kind: str) -> None:
    records = make_records()
    assert split_training_set(records, kind, seed=0).old != split_training_set(records, kind, seed=1).old


# ------------------------------------------------------------------------------------------ chains


def test_extended_class_chain_is_nested() -> None:
    records = make_records()
    steps = chain_splits(records, "extended_class", [0.33, 0.66, 1.0], seed=0)
    # round half up over 10 ids: 3.3 -> 3, 6.6 -> 7, 10
    assert [len(pids(s)) for s in steps] == [3, 7, 10]
    assert paths(steps[0]) < paths(steps[1]) < paths(steps[2]) == paths(records)
    # a two-step chain is the plain split
    split = split_training_set(records, "extended_class", old_fraction=0.33, seed=0)
    assert steps[0] == split.old


def test_extended_data_chain_is_nested_per_identity() -> None:
    steps = chain_splits(make_records(), "extended_data", [0.25, 0.5, 1.0], seed=2)
    assert paths(steps[0]) <= paths(steps[1]) <= paths(steps[2])
    assert all(pids(s) == set(range(10)) for s in steps)
    assert len(steps[2]) == 37


def test_open_class_chain_is_disjoint() -> None:
    steps = chain_splits(make_records(), "open_class", [0.33, 0.66, 1.0], seed=0)
    assert [len(pids(s)) for s in steps] == [3, 4, 3]
    for i in range(3):
        for j in range(i + 1, 3):
            assert pids(steps[i]).isdisjoint(pids(steps[j]))
    assert set().union(*map(pids, steps)) == set(range(10))


def test_open_data_chain_is_disjoint_over_the_same_identities() -> None:
    steps = chain_splits(make_records(), "open_data", [0.33, 0.66, 1.0], seed=0)
    # identities with fewer images than steps (pids 0, 1, 7: 1 + 2 + 2 images) are dropped
    assert all(pids(s) == {2, 3, 4, 5, 6, 8, 9} for s in steps)
    for i in range(3):
        for j in range(i + 1, 3):
            assert paths(steps[i]).isdisjoint(paths(steps[j]))
    assert sum(len(s) for s in steps) == 37 - 5


# ------------------------------------------------------------------------------------------ label map


def test_label_map_by_hand() -> None:
    old = [ImageRecord("a", 2, 0), ImageRecord("b", 5, 0), ImageRecord("c", 7, 1), ImageRecord("d", 5, 1)]
    new = [ImageRecord(p, pid, 0) for p, pid in [("e", 9), ("f", 1), ("g", 7), ("h", 2), ("i", 5)]]
    # new classes (sorted pids) 1, 2, 5, 7, 9 -> old classes (sorted pids 2, 5, 7) or -1
    assert label_map(old, new).tolist() == [-1, 0, 1, 2, -1]


def test_label_map_agrees_with_relabelled_subsets() -> None:
    split = split_training_set(make_records(), "extended_class", old_fraction=0.5, seed=0)
    mapping = label_map(split.old, split.new)
    assert mapping.shape == (10,)
    assert int((mapping >= 0).sum()) == 5
    old_label = {r.path: r.pid for r in relabel(split.old)}
    for record in relabel(split.new):
        assert int(mapping[record.pid]) == old_label.get(record.path, -1)


def test_label_map_open_class_is_all_new() -> None:
    split = split_training_set(make_records(), "open_class", old_fraction=0.5, seed=0)
    assert label_map(split.old, split.new).tolist() == [-1] * 5


# ------------------------------------------------------------------------------------------ files


def test_save_load_round_trip_and_subset_format(tmp_path: Path) -> None:
    split = split_training_set(make_records(), "open_data", old_fraction=0.5, seed=0)
    written = save_split(split, tmp_path / "split")
    assert set(written) == {"old", "new", "split"}
    old = json.loads(written["old"].read_text())
    assert old["paths"] == [r.path for r in split.old]
    assert (old["kind"], old["old_fraction"], old["seed"], old["num_ids"], old["num_images"]) == (
        "open_data", 0.5, 0, 9, 20,
    )
    meta = json.loads(written["split"].read_text())
    assert (meta["old_images"], meta["new_images"], meta["dropped_images"]) == (20, 16, 1)
    assert load_split(tmp_path / "split") == split
    assert not [p for p in (tmp_path / "split").iterdir() if p.name.endswith(".tmp")]


def test_saved_subset_is_readable_by_the_data_module(tmp_path: Path) -> None:
    from reid_lab.data.subset import select_subset

    records = make_records()
    split = split_training_set(records, "extended_class", old_fraction=0.5, seed=0)
    written = save_split(split, tmp_path)
    assert sorted(select_subset(records, str(written["old"]))) == sorted(split.old)


def test_resaving_the_same_split_is_a_no_op(tmp_path: Path) -> None:
    split = split_training_set(make_records(), "extended_data", old_fraction=0.5, seed=0)
    written = save_split(split, tmp_path)
    before = {name: os.stat(path).st_mtime_ns for name, path in written.items()}
    os.utime(written["old"], ns=(1, 1))  # a rewrite would change this
    save_split(split, tmp_path)
    assert os.stat(written["old"]).st_mtime_ns == 1
    assert os.stat(written["split"]).st_mtime_ns == before["split"]


def test_saving_a_different_split_needs_overwrite(tmp_path: Path) -> None:
    records = make_records()
    first = split_training_set(records, "extended_class", old_fraction=0.5, seed=0)
    second = split_training_set(records, "extended_class", old_fraction=0.5, seed=1)
    save_split(first, tmp_path)
    with pytest.raises(FileExistsError, match="different upgrade split"):
        save_split(second, tmp_path)
    assert load_split(tmp_path) == first
    save_split(second, tmp_path, overwrite=True)
    assert load_split(tmp_path) == second


def test_load_split_rejects_a_missing_or_edited_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="split.json"):
        load_split(tmp_path)
    split = split_training_set(make_records(), "open_class", old_fraction=0.5, seed=0)
    written = save_split(split, tmp_path)
    payload = json.loads(written["old"].read_text())
    payload["num_images"] += 1
    written["old"].write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="num_images"):
        load_split(tmp_path)


# ------------------------------------------------------------------------------------------ configs and errors


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_scenario_config_loads(path: Path) -> None:
    assert path.read_text().startswith("# ")
    config = load_scenario(path)
    assert config.kind in SCENARIO_KINDS
    steps = config.chain(make_records())
    assert len(steps) == (len(config.fractions) if config.fractions else 2)


def test_scenario_configs_say_what_they_change() -> None:
    assert len(list(CONFIG_DIR.glob("*.yaml"))) >= 7
    arch = load_scenario(CONFIG_DIR / "extended_class_r18_to_r50.yaml")
    assert (arch.old_model["backbone"], arch.new_model["backbone"]) == ("resnet18", "resnet50")
    dims = load_scenario(CONFIG_DIR / "extended_class_dim_change.yaml")
    assert (dims.old_model["embedding_dim"], dims.new_model["embedding_dim"]) == (512, 256)
    chain = load_scenario(CONFIG_DIR / "chain_extended_class.yaml")
    assert chain.fractions == [0.33, 0.66, 1.0]
    assert {load_scenario(CONFIG_DIR / f"{kind}.yaml").kind for kind in SCENARIO_KINDS} == set(SCENARIO_KINDS)


def test_load_scenario_accepts_dicts() -> None:
    config = load_scenario({"scenario": {"kind": "open_class", "old_fraction": 0.3}})
    assert config == ScenarioConfig(kind="open_class", old_fraction=0.3)
    assert load_scenario({"kind": "open_class", "old_fraction": 0.3}) == config


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "closed_set"}, "kind must be one of"),
        ({"kind": "open_class", "old_fraction": 0}, "old_fraction must be in"),
        ({"kind": "open_class", "old_fraction": 1.5}, "old_fraction must be in"),
        ({"kind": "open_class", "old_fraction": "half"}, "old_fraction must be a number"),
        ({"kind": "open_class", "seed": 1.5}, "seed must be an integer"),
        ({"kind": "open_class", "old_frac": 0.5}, "unknown key.*'old_frac'.*allowed keys: kind, old_fraction"),
        ({"old_fraction": 0.5}, "missing 'kind'"),
        ({"kind": "open_class", "new_model": {"embedding_dim": -3}}, "embedding_dim must be a positive"),
        ({"kind": "extended_class", "fractions": [0.66, 0.33, 1.0]}, "strictly increasing"),
    ],
)
def test_load_scenario_errors_name_the_key(body: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_scenario({"scenario": body})


def test_load_scenario_file_without_scenario_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: open_class\n")
    with pytest.raises(ValueError, match="top-level 'scenario:'"):
        load_scenario(path)


@pytest.mark.parametrize("fraction", [0, 1.0, 1.5, -0.2, True])
def test_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match="old_fraction"):
        split_training_set(make_records(), "extended_class", old_fraction=fraction)


def test_split_rejects_bad_kind_and_records() -> None:
    records = make_records()
    with pytest.raises(ValueError, match="kind must be one of extended_data"):
        split_training_set(records, "extended", old_fraction=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="records is empty"):
        split_training_set([], "open_class")
    with pytest.raises(ValueError, match="twice"):
        split_training_set(records + records[:1], "open_class")
    with pytest.raises(ValueError, match="at least 2 identities"):
        split_training_set([ImageRecord("a", 0, 0), ImageRecord("b", 0, 1)], "open_class")
    with pytest.raises(ValueError, match="fractions"):
        chain_splits(records, "open_class", [0.5])
