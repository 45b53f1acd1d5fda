"""Data: dataset parsers, records, transforms, PK sampling, the ReID DataModule and the text-to-person one.

``ReIDDataModule`` and ``TextImageDataModule`` are imported lazily so that the parsers and record types load
without Lightning.
"""

from reid_lab.data.records import DatasetFormatError, ImageRecord, ReIDSplits, relabel

__all__ = ["DatasetFormatError", "ImageRecord", "PairDataModule", "ReIDDataModule", "ReIDSplits",
           "TextImageDataModule", "relabel"]


def __getattr__(name: str):
    if name == "ReIDDataModule":
        from reid_lab.data.datamodule import ReIDDataModule

        return ReIDDataModule
    if name == "TextImageDataModule":
        from reid_lab.data.text_datamodule import TextImageDataModule

        return TextImageDataModule
    if name == "PairDataModule":
        from reid_lab.data.pair_datamodule import PairDataModule

        return PairDataModule
    raise AttributeError(f"module 'reid_lab.data' has no attribute {name!r}")
