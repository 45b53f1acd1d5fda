"""``ReIDModule``: a ReID encoder (backbone + pooling + BNNeck), its own weighted losses, the Market protocol."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.losses import build_loss
from reid_lab.models.reid_model import ReIDModel
from reid_lab.modules.base import EmbeddingModule, TrainingOutput
from reid_lab.modules.optim import build_optimizer, lr_schedule
from reid_lab.upgrade.class_state import identity_of_new

DEFAULT_LOSSES: list[dict[str, Any]] = [
    {"name": "ce", "epsilon": 0.1},
    {"name": "triplet", "margin": 0.3},
]


class ReIDModule(EmbeddingModule):
    """A ReID model trained with composable losses and evaluated with the Market-1501 protocol.

    The defaults are the BoT recipe (Luo et al. CVPRW'19): ResNet-50 with last stride 1, global average
    pooling, BNNeck, cross-entropy with label smoothing 0.1 + batch-hard triplet (margin 0.3), Adam 3.5e-4 with
    weight decay 5e-4, linear warm-up over 10 epochs from 1% of the learning rate, step decay at epochs 40
    and 70, test feature after the BN layer compared by cosine distance.

    Args:
        backbone: backbone name (``resnet18|34|50``, ``resnet50_ibn_a``, ``timm:<name>``).
        num_classes: training identities (linked from the data module by the CLI).
        last_stride: stride of the last backbone stage (1 doubles the final feature map, BoT).
        last_activation: False: pool the backbone's map before its last activation (``mobilenet_v2``, timm's
            EfficientNet / MobileNet family), so no channel starts dead (docs/trials.md).
        pooling: ``avg``, ``max``, ``gem`` or ``avgmax``.
        embedding_dim: optional linear reduction of the pooled feature before the BNNeck.
        neck_feat: test embedding taken ``before`` or ``after`` the BNNeck BatchNorm.
        weights: optional local file with backbone weights (never downloaded).
        pretrained: ``"imagenet"``: backbone weights shipped in an installed package (``mobilenet_v2``,
            ``timm:efficientnet_lite0``, ``timm:tf_efficientnet_lite0``), recorded as the space's ``init``.
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
        space_label: human-readable name of the embedding space (e.g. ``study/version``); the space's
            identity is a hash of the encoder's weights (see :mod:`reid_lab.embedding.space`).
        upgrade: train this model to be compatible with an old one:
            ``{"old_checkpoint": path, "compatible_losses": [{"name": "bct"}, ...], "adapter": "linear"}``
            (see :class:`~reid_lab.upgrade.host.CompatibilityHost`; ``pairings`` defaults to ``[image->image]``). Validation then also reports the
            cross-test (new queries against old gallery features) as ``val/cross/i2i/*``.
        classifier: ``"linear"`` (learned, BoT) or ``"simplex"``: the fixed d-Simplex classifier of CoReS
            (Biondi et al., TPAMI 2023) with ``simplex_classes`` pre-allocated vertices. Each training class is
            scored against the vertex of its *identity* in the dataset's whole training split (the parsers number
            it ``0 .. N-1`` for every subset a version trains on), so an old and a new model trained with this head
            on any subsets share their classifier and are compatible by construction, with no old model in the
            loop. The identities are read from the data module's training set when the fit starts.
        simplex_classes: ``K`` for ``classifier: simplex``, at least the number of identities of the whole
            training split. Given without ``embedding_dim``, the embedding is reduced to ``K - 1`` dimensions, as
            in CoReS's official model, so every direction of it belongs to the simplex (with the backbone's 1280
            dimensions and zero-padded vertices the demo's old and new models shared only 6-13 % of their feature
            energy with the trained vertices and were not compatible; docs/results.md). Neither given:
            ``K = D + 1``.
        basis_transform: BT² (Zhou et al. 2023, arXiv 2211.03989): ``{"old_dim": d_old, "add_dim": 32, "scale":
            2.0, "orthogonal_map": ...}`` adds :class:`~reid_lab.models.basis_transform.BasisTransform` on top of
            the BNNeck. The test embedding grows to ``D + add_dim``; its first ``old_dim`` coordinates are trained
            against the old model through ``upgrade: {adapter: truncate, compatible_losses: [{name: bt2}],
            reference_checkpoint: <independent new model>}``, while the model's own losses train the BNNeck's
            feature (the ``bt2`` plugin pulls it towards the independent model's).
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
        pretrained: str | None = None,
        last_activation: bool = True,
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
        space_label: str | None = None,
        upgrade: dict[str, Any] | None = None,
        classifier: str = "linear",
        simplex_classes: int | None = None,
        basis_transform: dict[str, Any] | None = None,
    ) -> None:
        if num_classes <= 0:
            raise ValueError(
                f"num_classes must be the number of training identities (> 0), got {num_classes}; "
                "with the CLI it is linked from the data module"
            )
        if classifier not in ("linear", "simplex"):
            raise ValueError(f"classifier must be 'linear' or 'simplex', got {classifier!r}")
        simplex = classifier == "simplex"
        if simplex and simplex_classes is not None and embedding_dim is None:
            embedding_dim = int(simplex_classes) - 1  # CoReS: d = K - 1
        encoder = ReIDModel(
            backbone=backbone,
            num_classes=int(simplex_classes or 0) if simplex else num_classes,
            classifier=classifier,
            last_stride=last_stride,
            pooling=pooling,
            embedding_dim=embedding_dim,
            neck_feat=neck_feat,
            weights=weights,
            timm_kwargs=timm_kwargs,
            pretrained=pretrained,
            last_activation=last_activation,
            basis_transform=basis_transform,
        )
        super().__init__(encoder, distance=distance, flip_test=flip_test, max_rank=max_rank,
                         space_label=space_label, upgrade=upgrade)
        self.save_hyperparameters()
        self.losses = nn.ModuleList(_build_losses(losses if losses is not None else DEFAULT_LOSSES))
        for loss in self.losses:
            loss.bind(encoder.num_classes, encoder.feature_dim)
        # simplex head: the identity (vertex) of each training class, (num_classes,), set when the fit starts
        self.class_identity: Tensor | None
        if classifier == "simplex":
            self.register_buffer("class_identity", torch.full((num_classes,), -1, dtype=torch.long))
        else:
            self.class_identity = None

    @property
    def model(self) -> ReIDModel:
        """The encoder (a :class:`ReIDModel`)."""
        return self.encoder

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.encoder(images)

    def space_model_name(self) -> str:
        return self.hparams.backbone

    def _build_host(self) -> None:
        super()._build_host()
        basis = self.encoder.basis
        if basis is None:
            return
        if self.host.adapter_kind != "truncate":
            raise ValueError(f"model.init_args.basis_transform: BT² compares the first old_dim coordinates with old "
                             f"features; set upgrade.adapter: truncate (got {self.host.adapter_kind!r})")
        if basis.old_dim != self.host.old_dim:
            raise ValueError(f"model.init_args.basis_transform.old_dim is {basis.old_dim}, but the old model "
                             f"({self.host.old_checkpoint}) embeds {self.host.old_dim} dimensions")

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
        if self.class_identity is not None:
            self.class_identity.copy_(self._training_identities())
            self._identities_set = True
        super().on_fit_start()

    def _training_identities(self) -> Tensor:
        """``(num_classes,)`` identity of each training class in the whole training split (simplex head)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "training_set_view"):
            raise ValueError("classifier: simplex needs a data module with training_set_view() (the identity of each "
                             "training class in the whole training split)")
        view = datamodule.training_set_view()
        identity = identity_of_new(view.records, view.raw_records)
        k = self.encoder.num_classes
        if identity.shape != self.class_identity.shape:
            raise ValueError(f"classifier: simplex: the data has {identity.numel()} training classes, the model "
                             f"num_classes {self.class_identity.numel()}")
        if int(identity.max()) >= k:
            raise ValueError(f"classifier: simplex: the training split has identities up to {int(identity.max())}, "
                             f"beyond the {k} pre-allocated vertices; set model simplex_classes above "
                             f"{int(identity.max())} (at most embedding dim + 1 = {self.encoder.embedding_dim + 1})")
        return identity.to(self.class_identity.device)

    def training_output(self, batch: dict[str, Any]) -> TrainingOutput:
        outputs = self.encoder(batch["image"])
        logits, targets = outputs.get("logits"), batch["pid"]
        if self.class_identity is not None:
            if not getattr(self, "_identities_set", False):
                raise RuntimeError("classifier: simplex: the training identities are set when a fit starts "
                                   "(on_fit_start); train through a Lightning Trainer")
            # simplex head (identities set at fit start): the model's own losses score the K vertices against each
            # image's identity; the host and the accuracy see the logits of this version's classes, in their order
            targets, logits = self.class_identity[targets], outputs["logits"][:, self.class_identity]
        total, parts = self.compute_losses(outputs, targets)
        branches = {"image": outputs["branch"]} if "branch" in outputs else {}
        return TrainingOutput(loss=total, embeddings={"image": outputs["embedding"]}, labels=batch["pid"],
                              parts=parts, logits=logits, branches=branches)

    # -------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        center_params = [p for loss in self.losses if loss.name == "center" for p in loss.parameters()]
        center_ids = {id(p) for p in center_params} if hp.center_lr is not None else set()
        main_params = [p for p in self.parameters() if p.requires_grad and id(p) not in center_ids]
        groups = [{"params": main_params, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if center_ids:
            groups.append({"params": center_params, "lr": hp.center_lr, "weight_decay": 0.0})
        optimizer = build_optimizer(hp.optimizer, groups, lr=hp.lr, momentum=hp.momentum)
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 120
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else max_epochs
        steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
        schedule = lr_schedule(
            hp.scheduler, max_epochs, hp.milestones if hp.milestones is not None else [40, 70], hp.gamma,
            hp.warmup_epochs, hp.warmup_factor, steps_per_epoch=steps_per_epoch,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(groups))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
