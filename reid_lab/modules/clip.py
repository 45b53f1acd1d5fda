"""``CLIPModule``: a dual encoder trained with image–text losses, evaluated text → image (no camera filter).

The shared :class:`~reid_lab.modules.base.EmbeddingModule` gives it everything else: the upgrade host (its
pairings default to ``image->image`` and ``text->text`` against another CLIP model, ``image->image`` against
a ReID CNN; ``text->image`` keeps new caption queries searchable in an old image gallery), checkpoints that
rebuild the encoder, space records with both modalities, predict rows of either modality.

Training batches hold ``image`` ``(B, 3, H, W)``, ``text`` ``(B, L)`` token ids of a caption of that image, and
``pid`` ``(B,)``. Evaluation batches are homogeneous: query captions then gallery images (``is_query``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.losses import build_loss
from reid_lab.losses.image_text import build_image_text_loss
from reid_lab.models.clip import CLIPEncoder
from reid_lab.modules.base import EmbeddingModule, TrainingOutput, check_tokenizer
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
        num_classes: training identities (linked from the data module); used by image-side ReID losses.
        losses: image–text losses ``[{name: clip | siglip | sdm | supcon, weight, **options}]`` (default CLIP InfoNCE).
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
        self.losses = nn.ModuleList(_build(losses if losses is not None else [{"name": "clip"}],
                                           build_image_text_loss, "losses"))
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
        image = self.encoder.encode_image(batch["image"])
        text = self.encoder.encode_text(batch["text"])
        pids = batch["pid"]
        total = image.new_zeros(())
        parts: dict[str, Tensor] = {}
        for loss in self.losses:
            value = loss(image, text, pids, self.encoder.logit_scale)
            parts[loss.name] = value.detach()
            total = total + loss.weight * value
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


def _build(specs: list[dict[str, Any]], factory, where: str, allow_empty: bool = False) -> list[nn.Module]:
    if not specs and not allow_empty:
        raise ValueError(f"{where} is empty: give at least one loss, e.g. [{{name: clip}}]")
    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{where}[{i}] must be a mapping with a 'name' key, got {spec!r}")
        built.append(factory(spec["name"], **{k: v for k, v in spec.items() if k != "name"}))
    return built
