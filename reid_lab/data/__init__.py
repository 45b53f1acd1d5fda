"""Data: dataset parsers, records, transforms, PK sampling and the ReID DataModule.

``ReIDDataModule`` is imported lazily so that the parsers and record types load without Lightning.
"""

from reid_lab.data.records import DatasetFormatError, ImageRecord, ReIDSplits, relabel

__all__ = ["DatasetFormatError", "ImageRecord", "ReIDDataModule", "ReIDSplits", "relabel"]


def __getattr__(name: str):
    if name == "ReIDDataModule":
        from reid_lab.data.datamodule import ReIDDataModule

        return ReIDDataModule
    raise AttributeError(f"module 'reid_lab.data' has no attribute {name!r}")
