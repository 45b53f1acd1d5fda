"""PK sampler: batch composition, coverage, determinism and DDP sharding, checked by counting."""

from __future__ import annotations

from collections import Counter

import pytest

from reid_lab.data.sampler import PKBatchSampler


def _pids(counts: dict[int, int]) -> list[int]:
    return [pid for pid, n in counts.items() for _ in range(n)]


def test_every_batch_has_p_identities_with_k_images_each():
    pids = _pids({i: 4 + (i % 5) for i in range(20)})
    sampler = PKBatchSampler(pids, batch_size=16, num_instances=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 16
        per_id = Counter(pids[i] for i in batch)
        assert len(per_id) == 4 and set(per_id.values()) == {4}


def test_images_are_drawn_without_replacement_within_an_identity_chunk():
    pids = _pids({i: 8 for i in range(10)})
    batches = list(PKBatchSampler(pids, batch_size=8, num_instances=4, seed=1))
    used = Counter(i for b in batches for i in b)
    # 10 ids x 8 images = 20 chunks of 4 -> 10 batches of 2 ids; every image exactly once.
    assert len(batches) == 10
    assert set(used.values()) == {1} and len(used) == 80


def test_identity_with_fewer_than_k_images_is_sampled_with_replacement():
    pids = _pids({0: 2, 1: 4, 2: 4, 3: 4})
    batches = list(PKBatchSampler(pids, batch_size=8, num_instances=4, seed=0))
    for batch in batches:
        counts = Counter(pids[i] for i in batch)
        assert set(counts.values()) == {4}
        if 0 in counts:
            assert {i for i in batch if pids[i] == 0} <= {0, 1}


def test_same_seed_and_epoch_is_deterministic_and_epochs_differ():
    pids = _pids({i: 6 for i in range(12)})
    a = PKBatchSampler(pids, batch_size=12, num_instances=3, seed=5)
    b = PKBatchSampler(pids, batch_size=12, num_instances=3, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_ranks_get_disjoint_equal_shares_of_the_same_epoch():
    pids = _pids({i: 8 for i in range(16)})
    shards = [list(PKBatchSampler(pids, 8, 4, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) > 0
    flat = [tuple(b) for shard in shards for b in shard]
    assert len(set(flat)) == len(flat)
    single = {tuple(b) for b in PKBatchSampler(pids, 8, 4, seed=3, num_replicas=1, rank=0)}
    assert set(flat) <= single


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="multiple of num_instances"):
        PKBatchSampler([0, 1], batch_size=6, num_instances=4)
    with pytest.raises(ValueError, match="at least P"):
        PKBatchSampler(_pids({0: 4, 1: 4}), batch_size=16, num_instances=4)


@pytest.mark.slow
def test_the_trainer_gives_every_epoch_its_own_pk_batches(tiny_synthetic, tmp_path):
    """Through the real Trainer: epoch e's batches are the sampler's own shuffle of epoch e (they used to repeat
    epoch 0's, because Lightning never reached the batch sampler's set_epoch)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from reid_lab.data.datamodule import ReIDDataModule
    from reid_lab.modules.reid import ReIDModule

    class Record(Callback):
        def __init__(self):
            self.seen: dict[int, list[list[int]]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.setdefault(trainer.current_epoch, []).append(batch["index"].tolist())

    dm = ReIDDataModule(dataset="synthetic", root=str(tiny_synthetic), image_size=(64, 32), batch_size=8,
                        num_instances=2, num_workers=0, eval_batch_size=64)
    record = Record()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[record],
                        use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(ReIDModule(backbone="resnet18", num_classes=dm.num_classes, last_stride=2), datamodule=dm)
    reference = PKBatchSampler([r.pid for r in dm.train_records], batch_size=8, num_instances=2, seed=0)
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        assert record.seen[epoch] == [list(b) for b in reference][:2]
    assert record.seen[0] != record.seen[1]
