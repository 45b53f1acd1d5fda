"""Dataset parsers: each turns a dataset folder into :class:`~reid_lab.data.records.ReIDSplits`.

One module per dataset; :data:`DATASETS` maps the short names used in configs to the loaders.

>>> list_datasets()
['cuhk03np', 'dukemtmc', 'folder', 'market1501', 'msmt17', 'synthetic', 'veri776']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from reid_lab.data.datasets.cuhk03np import load_cuhk03np
from reid_lab.data.datasets.dukemtmc import load_dukemtmc
from reid_lab.data.datasets.folder import load_folder
from reid_lab.data.datasets.market1501 import load_market1501
from reid_lab.data.datasets.msmt17 import load_msmt17
from reid_lab.data.datasets.synthetic import load_synthetic
from reid_lab.data.datasets.veri776 import load_veri776
from reid_lab.data.records import ReIDSplits

DATASETS: dict[str, Callable[..., ReIDSplits]] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "cuhk03np": load_cuhk03np,
    "veri776": load_veri776,
    "folder": load_folder,
    "synthetic": load_synthetic,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(DATASETS)


def load_dataset(name: str, root: str | Path, **options) -> ReIDSplits:
    """Load the dataset called ``name`` from ``root``.

    Args:
        name: a key of :data:`DATASETS` (case-insensitive).
        root: the dataset folder or a parent holding it under its conventional name.
        **options: keyword options of that dataset's loader (e.g. ``variant="labeled"`` for ``cuhk03np``).

    Raises:
        ValueError: unknown dataset name (the message lists the available ones).
        TypeError: an option the loader does not take (the message lists the ones it takes).
        DatasetFormatError: the data on disk does not match the dataset's layout.
    """
    loader = DATASETS.get(name.lower())
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    signature = inspect.signature(loader)
    try:
        signature.bind(root, **options)
    except TypeError as error:
        accepted = [param for param in signature.parameters if param != "root"]
        raise TypeError(
            f"dataset {name!r}: {error}; options it takes: {', '.join(accepted) or 'none'}"
        ) from None
    return loader(root, **options)


__all__ = [
    "DATASETS",
    "list_datasets",
    "load_cuhk03np",
    "load_dataset",
    "load_dukemtmc",
    "load_folder",
    "load_market1501",
    "load_msmt17",
    "load_synthetic",
    "load_veri776",
]
