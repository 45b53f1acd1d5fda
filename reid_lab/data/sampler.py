"""Batch order: PK identity sampling for training, query / gallery in proportion for evaluation.

PK sampling: batches of P identities x K images each (Hermans et al. 2017, "In Defense of the Triplet Loss"),
the sampler every ReID recipe with a triplet loss relies on. :func:`check_pk_identities` refuses a training
set with fewer than P identities before anything runs.

Evaluation loaders yield queries, then the gallery. When the Trainer reads only a prefix of them
(``--trainer.limit_val_batches`` / ``limit_test_batches``, :func:`reads_a_prefix`), that prefix would be
queries alone; :func:`interleave_in_proportion` then orders query and gallery items (or whole batches) so that
every prefix holds both in proportion to their sizes: a smaller query set ranked against a smaller gallery.

The sampler is DDP-aware on its own: each rank gets a disjoint, equally long share of the epoch's batches,
built from the same seeded shuffle on every rank, so the trainer must not wrap it in a DistributedSampler
(``Trainer(use_distributed_sampler=False)``; the DataModule takes care of it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

T = TypeVar("T")


class TooFewIdentities(ValueError):
    """The training set has fewer identities than one PK batch needs (P = batch_size / num_instances)."""


def check_pk_identities(num_identities: int, batch_size: int, num_instances: int, where: str = "the training set",
                        option_prefix: str = "") -> None:
    """Refuse PK sampling that cannot fill one batch: P = ``batch_size // num_instances`` distinct identities.

    Args:
        num_identities: identities of the training set.
        batch_size / num_instances: the data module's options (``num_instances`` 0: no PK sampling).
        where: what the training set is, for the message (e.g. ``"synthetic (data/synthetic) training set"``).
        option_prefix: how the options are spelled to the user (``"--data.init_args."`` on the command line).

    Raises:
        TooFewIdentities: one line naming the identity count and the options to change.
    """
    if num_instances < 1:
        return
    needed = batch_size // num_instances
    if num_identities >= needed:
        return
    fits = max(1, num_identities) * num_instances  # the largest batch of whole identities this set can fill
    raise TooFewIdentities(
        f"PK sampling needs at least P = batch_size / num_instances = {batch_size} / {num_instances} = {needed} identities "
        f"per batch, {where} has {num_identities}: lower {option_prefix}batch_size to at most {fits} "
        f"({option_prefix}num_instances {num_instances} images per identity), or set {option_prefix}num_instances 0 "
        "for plain random batches"
    )


def reads_a_prefix(trainer, validation: bool) -> bool:
    """Whether ``trainer`` reads only a prefix of an evaluation loader: its ``limit_val_batches`` (validation)
    or ``limit_test_batches`` is anything but the default 1.0 (an int counts batches, a float a share)."""
    limit = getattr(trainer, "limit_val_batches" if validation else "limit_test_batches", 1.0) \
        if trainer is not None else 1.0
    return not (isinstance(limit, float) and limit == 1.0)


def interleave_in_proportion(first: Sequence[T], second: Sequence[T]) -> list[T]:
    """Merge two sequences, each in its own order, so that every prefix holds both in proportion to their sizes.

    Item ``i`` of a sequence of length ``n`` sits at ``(i + 0.5) / n`` of the way; the merge sorts by that
    position (``first`` before ``second`` on a tie). A prefix of ``m`` items thus holds
    ``round(m * len(first) / (len(first) + len(second)))`` items of ``first``, give or take one.

    Example: ``interleave_in_proportion([q0, q1], [g0, g1, g2, g3])`` is ``[g0, q0, g1, g2, q1, g3]``.
    """
    keyed = [((i + 0.5) / len(first), 0, i) for i in range(len(first))]
    keyed += [((j + 0.5) / len(second), 1, j) for j in range(len(second))]
    keyed.sort()
    return [first[i] if source == 0 else second[i] for _, source, i in keyed]


def proportional_query_gallery_batches(num_query: int, num_gallery: int, batch_size: int) -> list[list[int]]:
    """Index batches over ``[0, num_query)`` (queries) and ``[num_query, num_query + num_gallery)`` (gallery)
    of at most ``batch_size`` items, each holding queries and gallery in proportion
    (:func:`interleave_in_proportion`); queries keep their order among queries, gallery among gallery."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = interleave_in_proportion(range(num_query), range(num_query, num_query + num_gallery))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
        check_pk_identities(len(self.index_of), batch_size, num_instances)
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
