"""``CLIPModule``: a dual encoder trained with image–text losses, evaluated text → image (no camera filter).

The shared :class:`~reid_lab.modules.base.EmbeddingModule` gives it everything else: the upgrade host (its
pairings default to ``image->image`` and ``text->text`` against another CLIP model, ``image->image`` against
a ReID CNN; ``text->image`` keeps new caption queries searchable in an old image gallery), checkpoints that
rebuild the encoder, space records with both modalities, predict rows of either modality.

Training batches hold ``image`` ``(B, 3, H, W)``, ``text`` ``(B, L)`` token ids of a caption of that image, and
``pid`` ``(B,)``. Evaluation batches are homogeneous: query captions then gallery images (``is_query``).
On caption data ``test`` reports, beside caption -> image retrieval (``test/t2i/*``), image -> caption
retrieval (``test/i2t/*``: image queries, every test caption the gallery, a caption matches when it describes
the image's identity, nothing removed), caption -> caption retrieval (``test/t2t/*``: each caption against the
other captions, itself removed) and zero-shot identity classification of the test images among the test
identities (``test/zeroshot/top1``, ``top5``; class = the identity's captions averaged, open_clip's
zero-shot classifier recipe; chance printed), all computed by :mod:`reid_lab.metrics`.

IRRA (Jiang & Ye, CVPR'23) is three entries of ``losses``: ``{name: sdm}``, ``{name: mlm}`` (implicit relation
reasoning: the caption's masked tokens predicted from its text states fused with the image tokens by a
cross-modal block, :mod:`reid_lab.models.irra`; used in training only) and ``{name: id}`` (an identity
classifier on both embeddings), see :mod:`reid_lab.losses.irra` and ``configs/experiments/synthetic_irra.yaml``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.losses import build_loss
from reid_lab.losses.image_text import IMAGE_TEXT_LOSSES, build_image_text_loss
from reid_lab.losses.irra import IGNORE_INDEX, IRRA_LOSSES, MaskVocabulary, MLMLoss
from reid_lab.metrics.reid_metric import RetrievalMetric
from reid_lab.metrics.zero_shot import ZeroShotIdentityMetric
from reid_lab.models.clip import CLIPEncoder
from reid_lab.models.irra import CrossModalMLM, image_tokens, text_tokens
from reid_lab.modules.base import EmbeddingModule, TrainingOutput, batch_modality, check_tokenizer
from reid_lab.modules.optim import build_optimizer, per_step_scheduler

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps exp(logit_scale) to 100 after every step


class CLIPModule(EmbeddingModule):
    """CLIP-style image–text training (open_clip towers, see :class:`~reid_lab.models.clip.CLIPEncoder`).

    Args:
        model_name / model_cfg / text_tower / context_length / lock_text / weights: the encoder (model_name may be
            ``local-dir:<folder>`` in open_clip's layout, model_cfg a JSON file).
        force_image_size: ``[H, W]`` overriding the config's image size (open_clip's name for it).
        image_backbone / image_pretrained: a reid_lab backbone as the image tower (e.g. ``mobilenet_v2`` with
            ``imagenet`` weights from an installed package).
        num_classes: training identities (linked from the data module); used by image-side ReID losses and
            IRRA's ``id`` loss.
        losses: image–text losses ``[{name: clip | infonce | siglip | sdm | supcon | mlm | id, weight, **options}]``
            (default CLIP InfoNCE); ``mlm`` and ``id`` are IRRA's (:mod:`reid_lab.losses.irra`; ``mlm`` takes
            ``probability``, ``depth``, ``heads``).
        image_losses: ReID losses on the image embedding (``triplet``; ``ce`` adds a linear classifier).
        optimizer / lr / weight_decay / momentum: optimiser (no weight decay on gains, biases, logit scale).
        scheduler / milestones / gamma / warmup_epochs / warmup_factor: per-step schedule.
        distance / max_rank / space_label / upgrade: see :class:`EmbeddingModule`.
    """

    monitor_metric = "R1"  # val/t2i/R1 on caption data (val/i2i/R1 when evaluated on ReID data)
    protocol = "cross_modal"

    def __init__(
        self,
        model_name: str | None = None,
        model_cfg: dict[str, Any] | str | None = None,
        force_image_size: tuple[int, int] | None = None,
        text_tower: str | None = None,
        context_length: int = 32,
        lock_text: bool = False,
        weights: str | None = None,
        image_backbone: str | None = None,
        image_pretrained: str | None = None,
        num_classes: int = 0,
        losses: list[dict[str, Any]] | None = None,
        image_losses: list[dict[str, Any]] | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_epochs: float = 1,
        warmup_factor: float = 0.01,
        distance: str = "cosine",
        max_rank: int = 50,
        space_label: str | None = None,
        upgrade: dict[str, Any] | None = None,
    ) -> None:
        encoder = CLIPEncoder(model_name=model_name, model_cfg=model_cfg, image_size=force_image_size,
                              text_tower=text_tower, context_length=context_length, lock_text=lock_text,
                              weights=weights, image_backbone=image_backbone, image_pretrained=image_pretrained)
        super().__init__(encoder, distance=distance, max_rank=max_rank, space_label=space_label, upgrade=upgrade)
        self.save_hyperparameters()
        built = _build(losses if losses is not None else [{"name": "clip"}], _text_image_loss, "losses")
        mlm = [loss for loss in built if isinstance(loss, MLMLoss)]
        if len(mlm) > 1:
            raise ValueError("losses: give the mlm loss at most once")
        self.losses = nn.ModuleList(loss for loss in built if not isinstance(loss, MLMLoss))
        for loss in self.losses:
            if loss.name == "id":
                loss.bind(num_classes, encoder.embedding_dim)
        self.mlm_loss: MLMLoss | None = mlm[0] if mlm else None
        self.mlm: CrossModalMLM | None = None
        if self.mlm_loss is not None:
            self._mask_vocabulary = MaskVocabulary.of(encoder.tokenizer())
            self.mlm = CrossModalMLM(encoder.embedding_dim, self._mask_vocabulary.vocab_size,
                                     depth=self.mlm_loss.depth, heads=self.mlm_loss.heads)
        self.image_losses = nn.ModuleList(_build(image_losses or [], build_loss, "image_losses", allow_empty=True))
        needs_classifier = any(loss.name in ("ce", "arcface", "cosface") for loss in self.image_losses)
        if needs_classifier and num_classes <= 0:
            raise ValueError("image_losses with a classifier (ce) need num_classes > 0 (linked from the data)")
        self.classifier = nn.Linear(encoder.embedding_dim, num_classes, bias=False) if needs_classifier else None
        for loss in self.image_losses:
            loss.bind(num_classes, encoder.embedding_dim)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "tokenize"):
            check_tokenizer(datamodule.tokenize, self.encoder.tokenizer())

    # --------------------------------------------------------------------------------------- training
    def training_output(self, batch: dict[str, Any]) -> TrainingOutput:
        if self.mlm is not None:  # one image pass gives the embedding and the tokens IRRA's fusion attends to
            image, tokens = image_tokens(self.encoder.model, batch["image"])
        else:
            image = self.encoder.encode_image(batch["image"])
        text = self.encoder.encode_text(batch["text"])
        pids = batch["pid"]
        total = image.new_zeros(())
        parts: dict[str, Tensor] = {}
        for loss in self.losses:
            value = loss(image, text, pids, self.encoder.logit_scale)
            parts[loss.name] = value.detach()
            total = total + loss.weight * value
        if self.mlm is not None:
            masked, labels = self.mlm_loss.mask(batch["text"], self._mask_vocabulary)
            _, states = text_tokens(self.encoder.model, masked)
            positions = labels != IGNORE_INDEX
            scores = self.mlm(states, tokens, positions)  # (masked tokens, vocab)
            value = self.mlm_loss(scores, labels[positions])
            parts["mlm"] = value.detach()
            parts["mlm_acc"] = (scores.detach().argmax(1) == labels[positions]).float().mean()
            total = total + self.mlm_loss.weight * value
        logits = self.classifier(image) if self.classifier is not None else None
        outputs = {"features": image, "bn_features": image, "embedding": image,
                   **({"logits": logits} if logits is not None else {})}
        for loss in self.image_losses:
            value = loss(outputs, pids)
            parts[f"image/{loss.name}"] = value.detach()
            total = total + loss.weight * value
        parts["logit_scale"] = self.encoder.logit_scale.detach().exp()
        return TrainingOutput(loss=total, embeddings={"image": image, "text": text}, labels=pids, parts=parts,
                              logits=logits)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.encoder.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def space_model_name(self) -> str:
        return "clip"

    # ------------------------------------------------------------------------------------- evaluation
    def on_test_start(self) -> None:
        # On caption data the test loop also ranks images against captions and captions against captions, and
        # classifies images zero-shot; the caption -> image metric stays the base module's test_metric.
        self.caption_test_metrics = None
        if self.protocol == "cross_modal":
            options = {"metric": self.distance, "max_rank": self.max_rank}
            self.caption_test_metrics = nn.ModuleDict({
                "i2t": RetrievalMetric(protocol="image_to_text", **options),
                "t2t": RetrievalMetric(protocol="text_to_text", **options),
                "zeroshot": ZeroShotIdentityMetric(),
            }).to(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        modality = batch_modality(batch)
        embedding = self.embedder()(batch)[modality]
        self.update_metric(self.test_metric, batch, embedding)
        extra = getattr(self, "caption_test_metrics", None)  # set by on_test_start
        if extra is not None:
            is_caption = modality == "text"
            extra["i2t"].update(embedding, batch["pid"], not is_caption)  # images query, captions are the gallery
            if is_caption:
                extra["t2t"].update(embedding, batch["pid"])
            extra["zeroshot"].update(embedding, batch["pid"], is_caption)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        for metric in (getattr(self, "caption_test_metrics", None) or {}).values():
            try:
                self._log_metric(metric, "test")
            except ValueError as err:  # e.g. one caption per identity: no caption -> caption match to rank
                metric.reset()
                self.print(f"{self.evaluation_label()} test/{metric.tag}: not reported ({err})")

    # -------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # open_clip's rule: no weight decay on gains, biases and the temperature
            (no_decay if p.ndim < 2 or "bias" in name or "logit_scale" in name or "ln" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = build_optimizer(hp.optimizer, groups, lr=hp.lr, momentum=hp.momentum)
        return {"optimizer": optimizer,
                "lr_scheduler": per_step_scheduler(self, optimizer, hp.scheduler, hp.milestones or [], hp.gamma,
                                                   hp.warmup_epochs, hp.warmup_factor)}


def _text_image_loss(name: str, **options) -> nn.Module:
    """An image–text loss (:data:`~reid_lab.losses.image_text.IMAGE_TEXT_LOSSES`) or one of IRRA's (``mlm``, ``id``)."""
    cls = IRRA_LOSSES.get(name)
    if cls is None:
        if name not in IMAGE_TEXT_LOSSES:
            raise ValueError(f"unknown image-text loss {name!r}; available: "
                             f"{', '.join(sorted({*IMAGE_TEXT_LOSSES, *IRRA_LOSSES}))}")
        return build_image_text_loss(name, **options)
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"image-text loss {name!r} ({cls.__name__}): {err}") from err


def _build(specs: list[dict[str, Any]], factory, where: str, allow_empty: bool = False) -> list[nn.Module]:
    if not specs and not allow_empty:
        raise ValueError(f"{where} is empty: give at least one loss, e.g. [{{name: clip}}]")
    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{where}[{i}] must be a mapping with a 'name' key, got {spec!r}")
        built.append(factory(spec["name"], **{k: v for k, v in spec.items() if k != "name"}))
    return built
