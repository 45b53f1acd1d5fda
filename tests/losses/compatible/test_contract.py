"""Contract of every entry of ``COMPATIBLE_LOSSES``, on inputs shaped as the upgrade host builds them.

timm-style registry test: each plugin, given everything the host can build or *only* the optional inputs it
declares (``needs`` / ``uses``, so that ``needs`` must be complete), returns a finite scalar loss whose gradient reaches the new model's side (its features and head) and never the
frozen old side, and named scalar parts for logging; a missing declared input is reported by name. Run with
``d_new == d_old`` and with ``d_new != d_old`` (the host's dimension adapter maps φ_new's features and head to
``d_old``; ``new_all_features`` keeps ``d_new``).
"""

from __future__ import annotations

import pytest
import torch

from reid_lab.losses.compatible import COMPATIBLE_LOSSES, build_compatible_loss
from reid_lab.losses.compatible.advbct import class_radii
from reid_lab.losses.compatible.base import EXTRAS_KEYS, CompatibleInputs
from reid_lab.losses.compatible.classifier_synthesis import class_means, synthesize_old_classifier
from reid_lab.losses.compatible.prototypes import class_boundaries, class_centres

B, C_NEW, C_OLD, D_OLD = 8, 4, 3, 6
EPOCH = 5
# plugins with a warm-up are built with one and called past it
OPTIONS = {
    "unibct": {"warmup_epochs": 2, "refresh_epochs": [2, 4]},
    # standalone AdvBCT: the host binds d_old / C_new and passes the trainer's epochs
    "advbct": {"embedding_dim": D_OLD, "num_classes": C_NEW, "max_epochs": 30},
}


class HostBatch:
    """One training batch as the host sees it: φ_new's leaves (features ``(B, d_new)``, head
    ``(C_new, d_new)``), a fixed dimension adapter ``P`` ``(d_old, d_new)`` and the frozen old side."""

    def __init__(self, d_new: int, old_requires_grad: bool) -> None:
        gen = torch.Generator().manual_seed(d_new)
        self.labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        self.new_all = torch.randn(B, d_new, generator=gen).requires_grad_(True)
        self.head = torch.randn(C_NEW, d_new, generator=gen).requires_grad_(True)
        self.adapter = torch.eye(D_OLD) if d_new == D_OLD else torch.randn(D_OLD, d_new, generator=gen)
        old = torch.randn(B, D_OLD, generator=gen)
        w_old = torch.randn(C_OLD, D_OLD, generator=gen)  # the old model's trained head (old label space)
        centres = class_centres(old, self.labels, C_NEW)
        old_classifier = synthesize_old_classifier(  # new classes 0-2 were old classes 0-2; 3 is new
            w_old, torch.tensor([0, 1, 2, -1]), class_means(old, self.labels, C_NEW)
        )
        frozen = {
            "old_features": old,
            "old_logits": old @ w_old.t(),
            "old_classifier": old_classifier,
            "prototypes": centres,
            "old_class_weight": w_old,
            "boundaries": class_boundaries(old, self.labels, centres),
        }
        frozen["reference_features"] = torch.randn(B, d_new, generator=gen)  # φ_n* (BT²), in the branch's dim
        frozen["old_means"], frozen["old_radii"] = class_radii(old, self.labels, C_NEW)
        frozen["old_radii"] = frozen["old_radii"] * 0.5  # tighter than the data: some samples violate
        self.frozen = {k: v.clone().requires_grad_(old_requires_grad) for k, v in frozen.items()}

    def inputs(self, keys: set[str]) -> CompatibleInputs:
        """Inputs holding the always-present fields plus only the optional ``keys``."""
        available = {
            "new_logits": self.new_all @ self.head.t(),
            "old_logits": self.frozen["old_logits"],
            "old_classifier": self.frozen["old_classifier"],
            "prototypes": self.frozen["prototypes"],
            "new_all_features": self.new_all,
            "old_class_weight": self.frozen["old_class_weight"],
        }
        extras = {
            "new_classifier": self.head @ self.adapter.t(),
            "boundaries": self.frozen["boundaries"],
            "old_class_index": torch.tensor([0, 1, 2]),
            "old_means": self.frozen["old_means"],
            "old_radii": self.frozen["old_radii"],
            "old_seen": torch.tensor([True, True, True, False]),
            "class_identity": torch.tensor([3, 0, 2, 1]),  # identities in the whole training split
            "new_branch": self.new_all,  # the feature a basis transformation mixes (BT²'s f)
            "reference_features": self.frozen["reference_features"],
        }
        return CompatibleInputs(
            new_features=self.new_all @ self.adapter.t(),
            old_features=self.frozen["old_features"],
            labels=self.labels,
            epoch=EPOCH,
            extras={k: v for k, v in extras.items() if k in keys},
            **{k: v for k, v in available.items() if k in keys},
        )


def declared(name: str) -> set[str]:
    cls = COMPATIBLE_LOSSES[name]
    return set(cls.needs) | set(cls.uses)


ALL_INPUTS = {
    "new_logits",
    "old_logits",
    "old_classifier",
    "prototypes",
    "new_all_features",
    "old_class_weight",
} | EXTRAS_KEYS


@pytest.mark.parametrize("given", ["all", "declared"])
@pytest.mark.parametrize("old_requires_grad", [False, True], ids=["old-frozen", "old-trap"])
@pytest.mark.parametrize("d_new", [D_OLD, 10], ids=["d_new=d_old", "d_new=10"])
@pytest.mark.parametrize("name", sorted(COMPATIBLE_LOSSES))
def test_plugin_contract(name: str, d_new: int, old_requires_grad: bool, given: str) -> None:
    plugin = build_compatible_loss(name, **OPTIONS.get(name, {}))
    batch = HostBatch(d_new, old_requires_grad)
    out = plugin(batch.inputs(ALL_INPUTS if given == "all" else declared(name)))

    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.item() != 0.0  # past warm-up, random batch: every term is active
    for part, value in out.parts.items():
        assert isinstance(part, str) and part
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value), part
        assert not value.requires_grad, f"part {part} keeps the graph alive"

    out.loss.backward()
    grad = batch.new_all.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # with old_requires_grad the frozen tensors are traps: a plugin must detach them
    for key, value in batch.frozen.items():
        assert value.grad is None, f"{name} sent gradient into the frozen {key}"


@pytest.mark.parametrize("name", sorted(COMPATIBLE_LOSSES))
def test_every_needed_input_is_checked_by_name(name: str) -> None:
    plugin = build_compatible_loss(name, **OPTIONS.get(name, {}))
    cls = COMPATIBLE_LOSSES[name]
    assert set(cls.needs) | set(cls.uses) <= ALL_INPUTS
    for key in cls.needs:
        batch = HostBatch(D_OLD, old_requires_grad=False)
        with pytest.raises(ValueError, match=key):
            plugin(batch.inputs(declared(name) - {key}))


def test_prototype_refresh_is_declared() -> None:
    # the host reads `refreshes_prototypes` instead of special-casing plugin names
    refreshing = {name for name, cls in COMPATIBLE_LOSSES.items() if cls.refreshes_prototypes}
    assert refreshing == {"unibct"}
    for name in sorted(COMPATIBLE_LOSSES):
        cls = COMPATIBLE_LOSSES[name]
        plugin = build_compatible_loss(name, **OPTIONS.get(name, {}))
        asked = [epoch for epoch in range(30) if plugin.on_train_epoch_start(epoch)]
        if cls.refreshes_prototypes:
            assert "prototypes" in cls.needs
        else:
            assert asked == [], name
    unibct = build_compatible_loss("unibct", **OPTIONS["unibct"])
    assert [epoch for epoch in range(30) if unibct.on_train_epoch_start(epoch)] == [2, 4]


def test_undeclared_input_names_are_rejected() -> None:
    from reid_lab.losses.compatible.base import CompatibleLoss

    with pytest.raises(TypeError, match="unknown inputs"):
        type("Typo", (CompatibleLoss,), {"needs": frozenset({"prototype"})})
