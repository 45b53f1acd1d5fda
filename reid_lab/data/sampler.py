"""PK identity sampling: batches of P identities x K images each (Hermans et al. 2017, "In Defense of the
Triplet Loss"), the sampler every ReID recipe with a triplet loss relies on.

The sampler is DDP-aware on its own: each rank gets a disjoint, equally long share of the epoch's batches,
built from the same seeded shuffle on every rank, so the trainer must not wrap it in a DistributedSampler
(``Trainer(use_distributed_sampler=False)``; the DataModule takes care of it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """Yields index batches of ``num_instances`` (K) images for each of ``batch_size // K`` (P) identities.

    One epoch visits every identity about ``len(images of id) // K`` times (at least once), in the spirit of
    fast-reid's ``NaiveIdentitySampler`` / torchreid's ``RandomIdentitySampler``: an identity with fewer
    than K images is sampled with replacement; its images are otherwise drawn without replacement.

    Args:
        pids: ``(N,)`` identity of every dataset index.
        batch_size: images per batch on one rank (P * K).
        num_instances: K, images per identity in a batch.
        seed: base seed; the epoch's shuffle uses ``seed + epoch`` (call :meth:`set_epoch`).
        num_replicas: world size (default: from ``torch.distributed`` if initialised, else 1).
        rank: this rank (default: from ``torch.distributed`` if initialised, else 0).
        drop_last: kept for API symmetry; incomplete batches are never produced.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int = 4,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances (K) must be >= 1, got {num_instances}")
        if batch_size % num_instances != 0:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of num_instances K ({num_instances}) for PK sampling"
            )
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_ids_per_batch = batch_size // num_instances
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        index_of: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            index_of[int(pid)].append(index)
        self.index_of = dict(sorted(index_of.items()))
        if len(self.index_of) < self.num_ids_per_batch:
            raise ValueError(
                f"PK sampling needs at least P = batch_size / K = {self.num_ids_per_batch} identities, "
                f"the training set has {len(self.index_of)}; lower batch_size or raise num_instances"
            )
        self._num_batches = self._count_batches()

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the shuffle of ``epoch`` (same on every rank)."""
        self.epoch = epoch

    @property
    def sampler(self) -> PKBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``
        only, so a batch sampler that shuffles per epoch must be reachable there (without this every epoch
        repeated epoch 0's batches)."""
        return self

    def _count_batches(self) -> int:
        chunks = sum(max(1, len(v) // self.num_instances) for v in self.index_of.values())
        global_batches = chunks // self.num_ids_per_batch
        return max(1, global_batches // self.num_replicas)

    def _global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.num_instances
        # Split every identity's (shuffled) images into chunks of K; pad short ids by re-sampling.
        chunks_of: dict[int, list[list[int]]] = {}
        for pid, indices in self.index_of.items():
            idx = np.asarray(indices)
            if len(idx) < k:
                idx = rng.choice(idx, size=k, replace=True)
            else:
                idx = rng.permutation(idx)
            usable = (len(idx) // k) * k
            chunks_of[pid] = [idx[i : i + k].tolist() for i in range(0, usable, k)]
        # Pick the P identities with the most chunks left (random among equals): identities are used up
        # evenly, so an epoch leaves at most a few chunks of the largest identities unused.
        batches: list[list[int]] = []
        pids = list(chunks_of)
        remaining = np.array([len(chunks_of[pid]) for pid in pids], dtype=np.float64)
        p = self.num_ids_per_batch
        while (remaining > 0).sum() >= p:
            priority = remaining + rng.random(len(pids))
            priority[remaining == 0] = -1.0
            chosen = np.argpartition(-priority, p - 1)[:p]
            batch: list[int] = []
            for c in np.sort(chosen).tolist():
                batch.extend(chunks_of[pids[c]].pop())
                remaining[c] -= 1
            batches.append(batch)
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        n = self._num_batches
        if len(batches) < n * self.num_replicas:  # pad by wrapping so every rank yields n batches
            batches = (batches * (n * self.num_replicas // max(1, len(batches)) + 1))[: n * self.num_replicas]
        yield from batches[self.rank * n : (self.rank + 1) * n]

    def __len__(self) -> int:
        return self._num_batches
