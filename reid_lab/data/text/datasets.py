"""Map-style datasets and batch samplers for image–caption training and text-to-image evaluation.

Training draws one caption per image and epoch. The draw happens in the batch sampler, in the main process,
which hands the dataset ``(image index, caption index)`` pairs: loader workers (persistent or not) need no
epoch state, and the draw depends only on ``(seed, epoch)``.

Lightning tells a loader's sampler the epoch through ``loader.batch_sampler.sampler.set_epoch`` (it does not
call the batch sampler's own ``set_epoch``); :class:`CaptionPairBatchSampler` exposes its identity sampler
there, so both the PK shuffle and the caption draw change with every epoch and replay on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from reid_lab.data.text.records import CaptionedImage, CaptionQuery

Tokenize = Callable[[Sequence[str]], Tensor]


def read_rgb(path: str, what: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image; an unreadable file raises an error naming it and ``what`` it is."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise OSError(f"cannot read image {path!r} ({what}): {err}; expected a file PIL can open") from err


def draw_captions(num_captions: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """The caption drawn for every image in ``epoch``: ``(N,)`` ints, entry ``i`` uniform in ``[0, num_captions[i])``.

    Deterministic in ``(seed, epoch)``; a stream separate from the PK sampler's shuffle (``[seed, epoch]``).
    """
    counts = np.asarray(num_captions, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, 1])
    return np.minimum((rng.random(len(counts)) * counts).astype(np.int64), counts - 1)


class RandomBatchSampler(Sampler[list[int]]):
    """Plain shuffled batches (no identity structure), reshuffled per epoch from ``(seed, epoch)``; drops the last
    incomplete batch. Each of ``num_replicas`` ranks takes every ``num_replicas``-th batch."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if size < batch_size * num_replicas:
            raise ValueError(f"{size} training images cannot fill one batch of {batch_size} on {num_replicas} rank(s)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch, 2]).permutation(self.size)
        size = self.batch_size
        batches = [order[b * size : (b + 1) * size].tolist() for b in range(len(self) * self.num_replicas)]
        yield from batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.num_replicas)


class _PairBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a batch sampler with ``set_epoch`` / ``epoch`` (Lightning calls ``batch_sampler.sampler.set_epoch``)
    and turns its index batches into ``(image index, caption index)`` pairs (:meth:`pairs_of`)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        return int(self.sampler.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def pairs_of(self) -> Callable[[int], tuple[int, int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pair = self.pairs_of()  # once per epoch
        for batch in self.sampler:
            yield [pair(int(j)) for j in batch]

    def __len__(self) -> int:
        return len(self.sampler)


class CaptionPairBatchSampler(_PairBatchSampler):
    """Turns the image-index batches of ``sampler`` into ``(image index, caption index)`` pairs.

    Args:
        sampler: a batch sampler over the training images with ``set_epoch`` / ``epoch`` (e.g.
            :class:`~reid_lab.data.sampler.PKBatchSampler`).
        num_captions: ``(N,)`` captions of every training image.
        seed: seed of the caption draw (see :func:`draw_captions`).
    """

    def __init__(self, sampler, num_captions: Sequence[int], seed: int = 0) -> None:
        super().__init__(sampler)
        self.num_captions = list(num_captions)
        self.seed = seed

    def pairs_of(self) -> Callable[[int], tuple[int, int]]:
        drawn = draw_captions(self.num_captions, self.seed, self.epoch)
        return lambda i: (i, int(drawn[i]))


class EveryCaptionBatchSampler(_PairBatchSampler):
    """Batches of ``(image index, caption index)`` pairs where every caption of every image is one unit of
    ``sampler`` (``captions_per_image: all``, as IRRA's training set lists each caption as its own pair).

    Args:
        sampler: a batch sampler over ``range(len(pairs))`` with ``set_epoch`` / ``epoch`` (PK or random).
        pairs: ``(image index, caption index)`` of every unit.
    """

    def __init__(self, sampler, pairs: Sequence[tuple[int, int]]) -> None:
        super().__init__(sampler)
        self.pairs = list(pairs)

    def pairs_of(self) -> Callable[[int], tuple[int, int]]:
        return self.pairs.__getitem__


class CaptionPairDataset(Dataset):
    """Training pairs: item ``(i, c)`` is image ``i`` of ``records`` with its caption ``c``.

    Each item: ``image`` (transformed), ``text`` ``(L,)`` int64, ``pid`` and ``index`` (= ``i``), int64 scalars.
    """

    def __init__(self, records: Sequence[CaptionedImage], transform: Callable, tokenize: Tokenize) -> None:
        self.records = list(records)
        self.transform = transform
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        index, caption = key
        record = self.records[index]
        image = read_rgb(record.path, f"training image of pid {record.pid}")
        return {
            "image": self.transform(image),
            "text": self.tokenize([record.captions[caption]])[0],
            "pid": torch.tensor(record.pid, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }


class QueryGalleryDataset(Dataset):
    """Caption queries followed by gallery images, as one index space (``0 .. num_query + num_gallery - 1``).

    A caption item: ``text`` ``(L,)`` int64, ``pid``, ``index``, ``is_query`` (True). An image item: ``image``,
    ``pid``, ``index``, ``is_query`` (False) and, when ``with_camids``, ``camid``. Batch them with
    :class:`QueryGalleryBatchSampler` so that no batch mixes the two kinds.
    """

    def __init__(
        self,
        queries: Sequence[CaptionQuery],
        gallery: Sequence[CaptionedImage],
        transform: Callable,
        tokenize: Tokenize,
        with_camids: bool = False,
    ) -> None:
        self.queries, self.gallery = list(queries), list(gallery)
        self.transform, self.tokenize, self.with_camids = transform, tokenize, with_camids

    @property
    def num_query(self) -> int:
        return len(self.queries)

    def __len__(self) -> int:
        return len(self.queries) + len(self.gallery)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index < len(self.queries):
            query = self.queries[index]
            return {
                "text": self.tokenize([query.text])[0],
                "pid": torch.tensor(query.pid, dtype=torch.long),
                "index": torch.tensor(index, dtype=torch.long),
                "is_query": torch.tensor(True),
            }
        record = self.gallery[index - len(self.queries)]
        item = {
            "image": self.transform(read_rgb(record.path, f"gallery image of pid {record.pid}")),
            "pid": torch.tensor(record.pid, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "is_query": torch.tensor(False),
        }
        if self.with_camids:
            item["camid"] = torch.tensor(record.camid, dtype=torch.long)
        return item


class QueryGalleryBatchSampler(Sampler[list[int]]):
    """In-order batches of at most ``batch_size`` over ``[0, num_query)`` and then ``[num_query, total)``: the
    last query batch may be short, so that no batch holds both captions and images."""

    def __init__(self, num_query: int, num_gallery: int, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_query, self.num_gallery, self.batch_size = num_query, num_gallery, batch_size

    def _ranges(self) -> list[range]:
        bounds = [(0, self.num_query), (self.num_query, self.num_query + self.num_gallery)]
        return [range(lo, min(lo + self.batch_size, hi)) for start, hi in bounds
                for lo in range(start, hi, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for r in self._ranges():
            yield list(r)

    def __len__(self) -> int:
        return len(self._ranges())
