"""Space records: identified by the weights, labels are names, claims need the strict criterion."""

from __future__ import annotations

import hashlib

import pytest
import torch

from reid_lab.embedding.space import (
    IncompatibleSpacesError,
    add_claim,
    check_compatible,
    make_space,
    weights_digest,
)


def test_digest_is_a_hash_of_every_byte():
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    h = hashlib.sha1()
    for name in ("a", "b"):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    assert weights_digest(state) == h.hexdigest()[:16]
    # a change far beyond the first bytes (the old digest only read 4 kB) changes the id
    big = {"w": torch.zeros(10_000)}
    changed = {"w": torch.zeros(10_000)}
    changed["w"][-1] = 1e-7
    assert weights_digest(big) != weights_digest(changed)


def test_retraining_with_the_same_label_is_a_new_space():
    one = make_space("resnet18", 4, state_dict={"w": torch.ones(3)}, label="study/old")
    two = make_space("resnet18", 4, state_dict={"w": torch.full((3,), 1.0001)}, label="study/old")
    assert one["label"] == two["label"] == "study/old"
    assert one["space_id"] != two["space_id"] and one["space_id"].startswith("study-old-4d-")
    with pytest.raises(IncompatibleSpacesError, match="no verified compatibility claim"):
        check_compatible(two, one)
    check_compatible(one, dict(one))  # the same space


def test_claims_need_the_criterion_to_hold_strictly():
    old = make_space("r18", 4, state_dict={"w": torch.zeros(1)})
    new = make_space("r34", 4, state_dict={"w": torch.ones(1)}, parent=old["space_id"])
    with pytest.raises(ValueError, match="not above"):
        add_claim(dict(new), old, metric="mAP", cross=40.0, reference=40.0)  # equal is not compatible
    claimed = add_claim(dict(new, claims=[]), old, metric="mAP", cross=40.5, reference=40.0)
    check_compatible(claimed, old)
    assert claimed["claims"][0]["gallery_space"] == old["space_id"]
