"""A study's evaluation split, embedded by one model: image queries (ReID) or caption queries (text-to-person)
against the image gallery, through the data module's own test loader."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reid_lab.data.datamodule import ReIDDataModule
from reid_lab.data.records import ImageRecord
from reid_lab.data.text_datamodule import TextImageDataModule
from reid_lab.embedding.embedder import Embedder
from reid_lab.embedding.features import FeatureSet

EvaluationData = ReIDDataModule | TextImageDataModule


def training_images(dm: EvaluationData) -> list[ImageRecord]:
    """The whole training split as image records ``(path, pid, camid)``, what an upgrade scenario splits.

    Caption datasets give their captioned images (pids as parsed); both kinds of data module accept the
    resulting ``train_subset`` files, since a subset names images by path.
    """
    if isinstance(dm, TextImageDataModule):
        return [ImageRecord(r.path, r.pid, r.camid) for r in dm.splits.train]
    return list(dm.splits.train)


def evaluation_records(dm: EvaluationData) -> tuple[list[Any], list[bool]]:
    """Query then gallery records of the test split, and the ``is_query`` flags (the test loader's order)."""
    return dm.eval_records("test") if isinstance(dm, TextImageDataModule) else dm.eval_records()


def embed_evaluation_split(embedder: Embedder, dm: EvaluationData,
                           keep_logits: bool = False) -> tuple[FeatureSet, Tensor | None]:
    """Embed the test split of ``dm`` with ``embedder``: every query (image or caption) and gallery image.

    Batches come from ``dm.test_dataloader()`` (homogeneous: each holds images or captions), so the
    evaluation transform is the one ``reid-lab test`` uses; captions are tokenized again by the encoder's own
    ``tokenizer()`` when it has one (the versions of a study may read different vocabularies).

    Returns:
        The :class:`FeatureSet` (``(N, D)`` features, pids, ``is_query``; camids for image queries and None for
        caption queries, whose protocol has no camera filter; items = image paths and caption texts;
        ``modality`` image with ``query_modality`` text for caption queries; the embedder's space record), and
        with ``keep_logits`` the ``(num_gallery, C)`` classifier logits of the gallery images (None otherwise).

    Raises:
        ValueError: the embedder cannot embed the queries' modality (a ReID CNN asked for captions).
    """
    records, is_query = evaluation_records(dm)
    query_modality = "text" if isinstance(dm, TextImageDataModule) else "image"
    modalities = tuple(getattr(embedder.encoder, "modalities", ("image",)))
    if query_modality not in modalities:
        raise ValueError(f"the evaluation split has {query_modality} queries but the model embeds only "
                         f"{list(modalities)}: caption queries need a dual encoder (e.g. CLIPModule)")
    device = embedder.device
    # Captions are tokenized by the model's own tokenizer when it has one: the data module's tokenizer belongs to
    # the stage whose data it is, and another text tower (an open_clip model, a VLM) reads other token ids.
    own_tokenizer = getattr(embedder.encoder, "tokenizer", None)
    tokenize = own_tokenizer() if query_modality == "text" and callable(own_tokenizer) else None
    parts: dict[str, list[Tensor]] = {"embedding": [], "pid": [], "is_query": [], "index": [], "camid": []}
    logits: list[Tensor] = []
    for batch in dm.test_dataloader():
        modality = "text" if "text" in batch else "image"
        inputs = batch[modality]
        if modality == "text" and tokenize is not None:
            inputs = tokenize([records[int(i)].text for i in batch["index"]]).long()
        out = embedder({modality: inputs.to(device)})
        parts["embedding"].append(out[modality].float().cpu())
        for key in ("pid", "is_query", "index"):
            parts[key].append(batch[key].cpu())
        if "camid" in batch:
            parts["camid"].append(batch["camid"].cpu())
        if keep_logits and modality == "image" and "logits" in out:
            logits.append(out["logits"].float().cpu()[~batch["is_query"].bool()])
    index = torch.cat(parts["index"])
    flags = torch.cat(parts["is_query"]).bool()
    expected_query = torch.tensor(is_query, dtype=torch.bool)
    # the loader must visit the records in evaluation_records() order: items and flags are taken from both
    if not (torch.equal(index, torch.arange(len(records))) and torch.equal(flags, expected_query)):
        raise RuntimeError(f"{type(dm).__name__}.test_dataloader() does not yield the evaluation records in order")
    camids = None
    if query_modality == "image":
        camids = torch.cat(parts["camid"])
    items = [r.text if hasattr(r, "text") else r.path for r in records]
    features = FeatureSet(torch.cat(parts["embedding"]), torch.cat(parts["pid"]).long(), camids, flags, items,
                          dict(embedder.space), "image", query_modality)
    gallery_logits = torch.cat(logits) if keep_logits and logits else None
    return features, gallery_logits
