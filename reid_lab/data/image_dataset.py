"""A map-style dataset over :class:`~reid_lab.data.records.ImageRecord` lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from reid_lab.data.records import ImageRecord


class ImageDataset(Dataset):
    """Reads ``records[i]`` as an RGB PIL image and applies ``transform``.

    Each item is a dict: ``image`` (transformed), ``pid``, ``camid``, ``index`` (position in ``records``) and,
    when ``is_query`` is given, ``is_query``. An unreadable image raises an error that names the file.

    Args:
        records: the images.
        transform: PIL image -> tensor.
        is_query: optional per-record flag (the evaluation loader concatenates query and gallery).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable | None = None,
        is_query: Sequence[bool] | None = None,
    ) -> None:
        if is_query is not None and len(is_query) != len(records):
            raise ValueError(f"is_query has {len(is_query)} entries for {len(records)} records")
        self.records = list(records)
        self.transform = transform
        self.is_query = None if is_query is None else [bool(q) for q in is_query]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            with Image.open(record.path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise OSError(
                f"cannot read image {record.path!r} (pid {record.pid}, camid {record.camid}): {err}; "
                f"expected a file PIL can open (jpg, png, ...)"
            ) from err
        item = {
            "image": self.transform(image) if self.transform is not None else image,
            "pid": torch.tensor(record.pid, dtype=torch.long),
            "camid": torch.tensor(record.camid, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.is_query is not None:
            item["is_query"] = torch.tensor(self.is_query[index])
        return item
