"""Text-to-person data: caption dataset parsers, caption tokenizers, image–caption datasets and samplers.

The LightningDataModule lives in :mod:`reid_lab.data.text_datamodule` (``reid_lab.data.TextImageDataModule``).
"""

from reid_lab.data.text.parsers import (
    FORMATS,
    TEXT_DATASETS,
    CaptionFormat,
    load_caption_dataset,
    load_cuhkpedes,
    load_icfgpedes,
    load_rstpreid,
    load_synthetic_captions,
    load_text_dataset,
)
from reid_lab.data.text.records import (
    CaptionedImage,
    CaptionQuery,
    TextReIDSplits,
    caption_queries,
    relabel_captioned,
)
from reid_lab.data.text.tokenizers import CaptionTokenizer, HFTokenizer, OpenCLIPTokenizer, VLMTextTokenizer

__all__ = [
    "FORMATS",
    "TEXT_DATASETS",
    "CaptionFormat",
    "CaptionQuery",
    "CaptionTokenizer",
    "CaptionedImage",
    "HFTokenizer",
    "OpenCLIPTokenizer",
    "TextReIDSplits",
    "VLMTextTokenizer",
    "caption_queries",
    "load_caption_dataset",
    "load_cuhkpedes",
    "load_icfgpedes",
    "load_rstpreid",
    "load_synthetic_captions",
    "load_text_dataset",
    "relabel_captioned",
]
