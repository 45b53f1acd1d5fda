"""IRRA's two losses besides SDM (Jiang & Ye, CVPR'23; official code anosorae/IRRA): implicit relation
reasoning by masked-language modelling, and the identity (ID) loss.

* :func:`mask_caption_tokens`: BERT's masking as IRRA's ``ImageTextMLMDataset`` applies it to a caption's ids:
  each ordinary token is chosen with probability 0.15; a chosen token becomes the mask id (80 %), a random
  ordinary id (10 %) or stays (10 %), and its label is the original id; every other position is labelled
  :data:`IGNORE_INDEX`. A caption with no chosen token gets its first ordinary token masked (IRRA masks
  position 1).
* :class:`MLMLoss`: ``CE(scores, labels)`` averaged over the labelled (masked) positions; the scores come from
  :class:`reid_lab.models.irra.CrossModalMLM` on the text states of the masked caption and the image tokens.
  Its options (``depth``, ``heads``) configure that block, which the CLIP module builds.
* :class:`IDLoss`: IRRA's ``compute_id``: one linear classifier (bias, weights ~ N(0, 0.001)) over the
  identities on the un-normalised image and text embeddings, ``(CE(W i + b, y) + CE(W t + b, y)) / 2``. It has
  the image–text call signature ``loss(image, text, pids, logit_scale)``; its classifier is made by
  :meth:`IDLoss.bind`.

Deviations: IRRA marks unmasked positions with label 0 (its pad id) and ignores 0; here the ignore index is
-100, so no real token id is lost. For open_clip's byte-pair vocabulary the mask id is 49405, the slot IRRA's
tokenizer frees for ``<|mask|>`` by dropping the last merge (here that merge, ``jekyll</w>``, would still be
produced by the tokenizer and read as a mask by the model; the synthetic and person-description captions do
not contain it). The masking runs on the training device from torch's random state (seeded by
``seed_everything``) rather than in the data loader's workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reid_lab.losses.image_text import ImageTextLoss

IGNORE_INDEX = -100  # label of the positions the MLM loss ignores (PyTorch's cross-entropy default)


@dataclass(frozen=True)
class MaskVocabulary:
    """What masking needs of a text tower's vocabulary.

    Attributes:
        vocab_size: ids the text tower embeds (the MLM head's classes).
        mask_id: the id that replaces a masked token.
        special_ids: ids never masked nor drawn as random replacements (padding, start / end, mask, ...).
    """

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> MaskVocabulary:
        """The vocabulary of an open_clip tokenizer: ``SimpleTokenizer`` (byte-pair, IRRA's) or ``HFTokenizer``
        (a ``transformers`` tokenizer with a mask token, e.g. BERT's ``[MASK]``)."""
        inner = getattr(tokenizer, "tokenizer", None)
        if inner is not None and getattr(inner, "mask_token_id", None) is not None:  # open_clip's HFTokenizer
            return cls(len(inner), int(inner.mask_token_id), tuple(sorted(set(inner.all_special_ids))))
        if hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "eot_token_id"):  # SimpleTokenizer
            mask_id = int(tokenizer.sot_token_id) - 1  # IRRA's <|mask|> slot (49405): the last merge's id
            return cls(int(tokenizer.vocab_size), mask_id,
                       (0, mask_id, int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)))
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token: IRRA's MLM needs open_clip's "
                         "SimpleTokenizer or a Hugging Face tokenizer with a mask token")

    def ordinary_ids(self, device: torch.device | None = None) -> Tensor:
        """``(V',)`` the ids a masked token may be replaced by: every id but the special ones."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool, device=device)
        keep[list(self.special_ids)] = False
        return keep.nonzero().squeeze(1)


def mask_caption_tokens(ids: Tensor, vocabulary: MaskVocabulary, probability: float = 0.15,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT / IRRA masking of caption ids.

    Args:
        ids: ``(B, L)`` int64 token ids of the captions (as the data module makes them).
        vocabulary: the mask id and the special ids (see :class:`MaskVocabulary`).
        probability: chance of an ordinary token to be chosen (IRRA: 0.15).
        generator: random source on ``ids``' device; None: torch's global one.

    Returns:
        ``(masked ids, labels)``, both ``(B, L)`` int64: the chosen positions hold the mask id (80 %), a random
        ordinary id (10 %) or their own id (10 %) and are labelled with the original id; other positions keep
        their id and are labelled :data:`IGNORE_INDEX`.
    """
    ordinary = ~torch.isin(ids, torch.tensor(vocabulary.special_ids, device=ids.device))
    draw = torch.rand(ids.shape, device=ids.device, generator=generator)
    chosen = ordinary & (draw < probability)
    # a caption with nothing chosen gets its first ordinary token masked (IRRA forces one per caption)
    none = ~chosen.any(dim=1) & ordinary.any(dim=1)
    first = ordinary.long().argmax(dim=1)
    chosen[none.nonzero().squeeze(1), first[none]] = True
    forced = torch.zeros_like(chosen)
    forced[none.nonzero().squeeze(1), first[none]] = True
    # within the chosen: draw / probability is uniform in [0, 1): < 0.8 mask, < 0.9 random id, else keep
    within = draw / probability
    to_mask = chosen & ((within < 0.8) | forced)
    to_random = chosen & ~to_mask & (within < 0.9)
    replacements = vocabulary.ordinary_ids(ids.device)
    random_ids = replacements[torch.randint(len(replacements), ids.shape, device=ids.device, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(ids, vocabulary.mask_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked, labels


class MLMLoss(nn.Module):
    """IRRA's implicit relation reasoning loss: cross-entropy of the masked tokens (``compute_mlm``).

    Args:
        weight: multiplier applied by the module (IRRA's ``mlm_loss_weight``, 1).
        probability: masking probability (0.15).
        depth / heads: the fusion block's transformer layers (IRRA: 4) and attention heads (None:
            ``embed_dim // 64``), see :class:`reid_lab.models.irra.CrossModalMLM`.
    """

    name = "mlm"

    def __init__(self, weight: float = 1.0, probability: float = 0.15, depth: int = 4, heads: int | None = None):
        super().__init__()
        if not 0.0 < probability < 1.0:
            raise ValueError(f"mlm probability must be in (0, 1), got {probability}")
        self.weight, self.probability, self.depth, self.heads = float(weight), float(probability), int(depth), heads

    def mask(self, ids: Tensor, vocabulary: MaskVocabulary) -> tuple[Tensor, Tensor]:
        """:func:`mask_caption_tokens` at this loss's probability."""
        return mask_caption_tokens(ids, vocabulary, self.probability)

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        """``scores`` ``(..., V)`` logits and ``labels`` ``(...)`` (``IGNORE_INDEX`` where unmasked) ``->`` the mean
        cross-entropy over the labelled positions."""
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)


class IDLoss(ImageTextLoss):
    """IRRA's ID loss: a shared identity classifier on the image and the text embeddings (``compute_id``).

    ``L = (CE(W i + b, y) + CE(W t + b, y)) / 2`` on the un-normalised ``(B, D)`` embeddings; IRRA's weight
    (``id_loss_weight``) is 1. Call :meth:`bind` once with the number of training identities.
    """

    name = "id"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.classifier: nn.Linear | None = None

    def bind(self, num_classes: int, embed_dim: int) -> None:
        """Create the ``embed_dim -> num_classes`` classifier (IRRA's init: weights N(0, 0.001), bias 0)."""
        if num_classes <= 0:
            raise ValueError("the id loss needs num_classes > 0 (the training identities, linked from the data)")
        self.classifier = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:
        if self.classifier is None:
            raise RuntimeError("IDLoss.bind(num_classes, embed_dim) must be called before the loss is used")
        return (F.cross_entropy(self.classifier(image.float()), pids)
                + F.cross_entropy(self.classifier(text.float()), pids)) / 2


IRRA_LOSSES = {"mlm": MLMLoss, "id": IDLoss}
