"""Evaluation batches split across DDP ranks without duplicates, in an order a gather puts back together.

Under DDP every rank runs the evaluation loop. If each rank read the whole split, the retrieval metric (which
concatenates its query / gallery states across ranks) would rank every item twice: with duplicated gallery
items AP changes (a positive and its copy share one rank step, a negative and its copy push every positive
further down), so ``val/i2i/mAP`` and ``test/i2i/mAP`` would silently differ from a one-device run. Lightning's
``DistributedSampler`` is off here (``use_distributed_sampler: false``, the PK sampler shards training itself),
and it would pad the split with repeated items anyway.

:class:`ShardedBatchSampler` gives rank ``r`` of ``W`` one contiguous block of the batches (block sizes differ
by at most one batch, nothing repeated, nothing dropped). Gathering per-rank states in rank order (what
``torch.distributed.all_gather`` and torchmetrics do) then restores the one-device order exactly, so even ties
(broken by gallery position) resolve as on one device. With one process it is the plain batch sampler.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized

import torch.distributed as dist
from torch.utils.data import BatchSampler, Sampler, SequentialSampler


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(num_items: int, rank: int, num_replicas: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous block of ``num_items`` (sizes differ by at most one)."""
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    base, extra = divmod(num_items, num_replicas)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's contiguous block of the batches of ``batch_sampler`` (see the module docstring).

    Args:
        batch_sampler: any iterable of index batches with a length (e.g. a ``BatchSampler``).
        num_replicas / rank: default from ``torch.distributed`` when initialised (else 1 / 0), read when the
            sampler is built (Lightning builds evaluation loaders after the process group is up).
    """

    def __init__(self, batch_sampler: Iterable[list[int]], num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        if not isinstance(batch_sampler, Sized):
            raise TypeError("ShardedBatchSampler needs a batch sampler with a length")
        default_rank, default_world = world()
        self.batch_sampler = batch_sampler
        self.num_replicas = default_world if num_replicas is None else int(num_replicas)
        self.rank = default_rank if rank is None else int(rank)
        self.start, self.stop = shard_bounds(len(batch_sampler), self.rank, self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if self.start <= i < self.stop:
                yield list(batch)

    def __len__(self) -> int:
        return self.stop - self.start


def sequential_batches(num_items: int, batch_size: int) -> ShardedBatchSampler:
    """Batches ``[0, b), [b, 2b) ...`` of ``num_items`` in order, sharded across the ranks."""
    return ShardedBatchSampler(BatchSampler(SequentialSampler(range(num_items)), batch_size, drop_last=False))
