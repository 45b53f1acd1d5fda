"""``ReIDModule``: backbone + pooling + BNNeck, the model's own weighted losses, ReID evaluation."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from reid_lab.losses import build_loss
from reid_lab.metrics.reid_metric import ReIDMetric
from reid_lab.models.reid_model import ReIDModel
from reid_lab.upgrade.host import CompatibilityHost
from reid_lab.embedding.space import make_space

DEFAULT_LOSSES: list[dict[str, Any]] = [
    {"name": "ce", "epsilon": 0.1},
    {"name": "triplet", "margin": 0.3},
]


class ReIDModule(L.LightningModule):
    """A ReID model trained with composable losses and evaluated with the Market-1501 protocol.

    The defaults are the BoT recipe (Luo et al. CVPRW'19): ResNet-50 with last stride 1, global average
    pooling, BNNeck, cross-entropy with label smoothing 0.1 + batch-hard triplet (margin 0.3), Adam 3.5e-4 with
    weight decay 5e-4, linear warm-up over 10 epochs from 1% of the learning rate, step decay at epochs 40
    and 70, test feature after the BN layer compared by cosine distance.

    Args:
        backbone: backbone name (``resnet18|34|50``, ``resnet50_ibn_a``, ``timm:<name>``).
        num_classes: training identities (linked from the data module by the CLI).
        last_stride: stride of the last backbone stage (1 doubles the final feature map, BoT).
        pooling: ``avg``, ``max``, ``gem`` or ``avgmax``.
        embedding_dim: optional linear reduction of the pooled feature before the BNNeck.
        neck_feat: test embedding taken ``before`` or ``after`` the BNNeck BatchNorm.
        weights: optional local file with backbone weights (never downloaded).
        timm_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``).
        losses: the model's own losses, each ``{"name": <ce|triplet|circle|arcface|cosface|center>, "weight":
            float, **options}``; the total is the weighted sum.
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr / weight_decay / momentum: optimiser settings.
        center_lr: learning rate of the center-loss centres inside the main optimiser (``None``: the main
            ``lr``). BoT trains them with a separate SGD at lr 0.5; with Adam the main lr works well.
        scheduler: ``multistep``, ``cosine`` or ``none``; updated every optimiser step (epochs converted to steps).
        milestones / gamma: multistep decay points (epochs) and factor.
        warmup_epochs / warmup_factor: linear warm-up (per step, may be fractional) from ``warmup_factor * lr``.
        distance: ``cosine`` or ``euclidean`` (squared) for evaluation.
        flip_test: average the embeddings of each image and its horizontal flip at test time.
        max_rank: CMC length.
        space_id: name of the embedding space this model defines (default: derived from the backbone,
            dimension and a hash of the weights when a checkpoint is saved).
        upgrade: train this model to be compatible with an old one:
            ``{"old_checkpoint": path, "compatible_losses": [{"name": "bct"}, ...], "adapter": "linear"}``
            (see :class:`~reid_lab.upgrade.host.CompatibilityHost`). Validation then also reports the
            cross-test (new queries against old gallery features) as ``val/cross_*``.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 0,
        last_stride: int = 1,
        pooling: str = "avg",
        embedding_dim: int | None = None,
        neck_feat: str = "after",
        weights: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        losses: list[dict[str, Any]] | None = None,
        optimizer: str = "adam",
        lr: float = 3.5e-4,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        center_lr: float | None = None,
        scheduler: str = "multistep",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_epochs: float = 10,
        warmup_factor: float = 0.01,
        distance: str = "cosine",
        flip_test: bool = False,
        max_rank: int = 50,
        space_id: str | None = None,
        upgrade: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_classes <= 0:
            raise ValueError(
                f"num_classes must be the number of training identities (> 0), got {num_classes}; "
                "with the CLI it is linked from the data module"
            )
        self.model = ReIDModel(
            backbone=backbone,
            num_classes=num_classes,
            last_stride=last_stride,
            pooling=pooling,
            embedding_dim=embedding_dim,
            neck_feat=neck_feat,
            weights=weights,
            timm_kwargs=timm_kwargs,
        )
        self.losses = nn.ModuleList(_build_losses(losses if losses is not None else DEFAULT_LOSSES))
        for loss in self.losses:
            loss.bind(num_classes, self.model.embedding_dim)
        self.val_metric = ReIDMetric(metric=distance, max_rank=max_rank)
        self.test_metric = ReIDMetric(metric=distance, max_rank=max_rank)
        self._space: dict[str, Any] | None = None
        self.host: CompatibilityHost | None = None
        if upgrade is not None:
            self.host = CompatibilityHost(new_dim=self.model.embedding_dim, **upgrade)
            self.val_cross_metric = ReIDMetric(metric=distance, max_rank=max_rank)

    # ------------------------------------------------------------------------------------------ model
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Test embeddings ``(B, D)`` of ``images`` ``(B, 3, H, W)``, flip-averaged when ``flip_test``."""
        embedding = self.model(images)["embedding"]
        if self.hparams.flip_test:
            embedding = (embedding + self.model(torch.flip(images, dims=[3]))["embedding"]) / 2
        return embedding

    def embedding_space(self) -> dict[str, Any]:
        """The embedding-space record of this model (see :mod:`reid_lab.embedding.space`)."""
        if self._space is None:
            self._space = make_space(
                self.hparams.backbone,
                self.model.embedding_dim,
                space_id=self.hparams.space_id,
                distance=self.hparams.distance,
                normalized=self.hparams.distance == "cosine",
                state_dict=self.model.state_dict(),
                parent=self.host.old_space.get("space_id") if self.host is not None else None,
            )
        return self._space

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._space is None or self.hparams.space_id is None:
            self._space = None  # weights changed since the last save: re-derive the hashed id
        checkpoint["embedding_space"] = self.embedding_space()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._space = checkpoint.get("embedding_space")

    # --------------------------------------------------------------------------------------- training
    def compute_losses(self, outputs: dict[str, Tensor], pids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the model's own losses and the unweighted value of each."""
        parts: dict[str, Tensor] = {}
        total = outputs["embedding"].new_zeros(())
        for loss in self.losses:
            value = loss(outputs, pids)
            parts[_unique_key(parts, loss.name)] = value.detach()
            total = total + loss.weight * value
        return total, parts

    def on_fit_start(self) -> None:
        if self.host is not None:
            dm = self.trainer.datamodule
            self.host.prepare(dm.train_records, dm.splits.train, dm.test_transform, self.model,
                              batch_size=dm.eval_batch_size, num_workers=dm.num_workers)

    def on_train_epoch_start(self) -> None:
        if self.host is not None and self.host.on_train_epoch_start(self.current_epoch):
            dm = self.trainer.datamodule
            self.host.refresh_prototypes(dm.train_records, dm.test_transform, self.model,
                                         batch_size=dm.eval_batch_size, num_workers=dm.num_workers)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.model(batch["image"])
        total, parts = self.compute_losses(outputs, batch["pid"])
        if self.host is not None:
            compat, compat_parts = self.host(batch["image"], outputs, batch["pid"], self.current_epoch,
                                             new_classifier=self.model.classifier_weight)
            total = total + compat
            parts.update(compat_parts)
        batch_size = batch["pid"].numel()
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if "logits" in outputs:
            acc = (outputs["logits"].argmax(1) == batch["pid"]).float().mean()
            self.log("train/acc", acc, prog_bar=True, batch_size=batch_size)
        return total

    # ------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, metric: ReIDMetric, batch: dict[str, Tensor]) -> None:
        metric.update(self.embed(batch["image"]), batch["pid"], batch["camid"], batch["is_query"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(self.val_metric, batch)
        if self.host is not None:  # cross-test: new (adapted) query features against old gallery features
            new = self.host.adapter(self.embed(batch["image"]).float())
            old = self.host.old(batch["image"])["embedding"]
            mixed = torch.where(batch["is_query"].unsqueeze(1), new, old)
            self.val_cross_metric.update(mixed, batch["pid"], batch["camid"], batch["is_query"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(self.test_metric, batch)

    def _log_metric(self, metric: ReIDMetric, prefix: str) -> None:
        if self.trainer.sanity_checking:  # a few query-only batches: nothing to rank yet
            metric.reset()
            return
        results = metric.compute()
        self.log_dict({f"{prefix}/{k}": v for k, v in results.items()}, prog_bar=False, sync_dist=False)
        metric.reset()
        summary = "  ".join(f"{k} {float(v):.2f}" for k, v in results.items())
        self.print(f"[epoch {self.current_epoch}] {prefix}: {summary}")

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")
        if self.host is not None:
            self._log_metric(self.val_cross_metric, "val/cross")

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return {
            "embedding": self.embed(batch["image"]),
            "pid": batch["pid"],
            "camid": batch["camid"],
            "index": batch["index"],
            "is_query": batch["is_query"],
        }

    # -------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        center_params = [p for loss in self.losses if loss.name == "center" for p in loss.parameters()]
        center_ids = {id(p) for p in center_params} if hp.center_lr is not None else set()
        main_params = [p for p in self.parameters() if p.requires_grad and id(p) not in center_ids]
        groups = [{"params": main_params, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if center_ids:
            groups.append({"params": center_params, "lr": hp.center_lr, "weight_decay": 0.0})
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=hp.lr)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        elif hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            raise ValueError(f"optimizer must be one of adam, adamw, sgd; got {hp.optimizer!r}")
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 120
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else max_epochs
        steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
        schedule = lr_schedule(
            hp.scheduler, max_epochs, hp.milestones if hp.milestones is not None else [40, 70], hp.gamma,
            hp.warmup_epochs, hp.warmup_factor, steps_per_epoch=steps_per_epoch,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(groups))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_schedule(
    kind: str,
    max_epochs: int,
    milestones: list[int],
    gamma: float,
    warmup_epochs: float,
    warmup_factor: float,
    steps_per_epoch: int = 1,
):
    """Learning-rate multiplier per optimiser step: linear warm-up, then multistep or cosine decay.

    Epoch quantities (``warmup_epochs``, ``milestones``, ``max_epochs``) are converted with
    ``steps_per_epoch``, so the warm-up ramps smoothly over its steps (fast-reid warms up per iteration) and
    short CPU schedules do not lose a whole epoch at 1% of the learning rate.
    """
    if kind not in ("multistep", "cosine", "none"):
        raise ValueError(f"scheduler must be one of multistep, cosine, none; got {kind!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        if epoch < warmup_epochs:
            alpha = epoch / warmup_epochs
            return warmup_factor * (1 - alpha) + alpha
        if kind == "multistep":
            return gamma ** sum(epoch >= m for m in milestones)
        if kind == "cosine":
            span = max(1e-8, max_epochs - warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup_epochs) / span)))
        return 1.0

    return factor


def _build_losses(specs: list[dict[str, Any]]) -> list[nn.Module]:
    if not specs:
        raise ValueError("losses is empty: give at least one loss, e.g. [{name: ce}, {name: triplet}]")
    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"losses[{i}] must be a mapping with a 'name' key, got {spec!r}")
        options = {k: v for k, v in spec.items() if k != "name"}
        built.append(build_loss(spec["name"], **options))
    return built


def _unique_key(existing: dict, name: str) -> str:
    key, n = name, 1
    while key in existing:
        n += 1
        key = f"{name}_{n}"
    return key
