"""``CLIPReIDModule``: CLIP-ReID's two-stage training (Li, Sun & Li, "CLIP-ReID: Exploiting Vision-Language
Model for Image Re-Identification without Concrete Text Labels", AAAI'23) on plain ReID data (no captions).

Stage 1 (``stage: 1``): the image and text towers are frozen (and kept in eval mode); only the per-identity
prompt words of :class:`~reid_lab.models.prompt_learner.PromptLearner` learn, with the supervised contrastive
loss between image features and the prompts' text features in both directions (Eqs. 3–5)::

    L_stage1 = supcon(image, text) + supcon(text, image)     # raw features, temperature 1

As the official ``processor_clipreid_stage1.py``, the image features of the whole training set are computed once
when fitting starts, without gradients, from the un-augmented images (the data module's training set under its
evaluation transform, :meth:`training_set_view`), and every epoch iterates them in a fresh random order (one
permutation per epoch, seeded by the epoch) in batches of the data module's ``batch_size`` (official: 64); the
data module's own (augmented, PK) training batches only pace the steps. ``stage1_features: batch`` restores the
former behaviour: the features of each augmented PK batch, computed under ``no_grad``.

Stage 2 (``stage: 2``, started from a stage-1 checkpoint ``stage1_checkpoint``): the text tower and the prompts
are frozen; the text features of all ``C`` identities are computed once per epoch (no gradients) and the image
tower is fine-tuned with the ReID losses on a BNNeck head plus the image-to-text cross-entropy (Eq. 7)::

    L_stage2 = 0.25 · CE_ls(classifier(BN(f)), y) + 1.0 · triplet(f, y) + 1.0 · CE_ls(f @ Tᵀ, y)

with ``f`` the image feature (the image tower's projected output), ``T`` ``(C, D)`` the identities' text
features and ``CE_ls`` label-smoothed cross-entropy (eps 0.1), as in ``configs/person/vit_clipreid.yml`` and
``loss/make_loss.py`` of the official code. Evaluation is ReID image → image (protocol ``reid``, same-camera
junk removed) on ``f`` (``NECK_FEAT: before``), through the shared :class:`EmbeddingModule`.

Deviations from the official code (Syliz517/CLIP-ReID):

* Stage 1's epoch has as many steps as the data module's training loader (the official epoch has
  ``ceil(N / 64)``, its last batch partial); every batch is full, the permutation continuing into the next one
  (of the same epoch) when the steps outnumber ``N / batch``. Under DDP each rank takes every ``world``-th
  batch of the same order.
* One head on the projected image feature: the official ViT model has two BNNeck heads and classifiers (on the
  pre-projection CLS token and on its projection), triplet losses on three features (last-layer, CLS,
  projection) and tests on the concatenation of the pre- and post-projection features. open_clip's image
  towers expose the projected feature only, so the ID loss, the triplet loss and the test feature all use
  it. No SIE camera embeddings, no overlapping patches.
* The official stage 2 multiplies the bias learning rate by 2; here every trainable parameter shares one
  learning rate and weight decay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.embedding.checkpoint import read_checkpoint
from reid_lab.losses import build_loss
from reid_lab.losses.clip_reid import prototype_cross_entropy, supcon_loss
from reid_lab.models.clip import CLIPEncoder
from reid_lab.models.heads import BNNeckHead
from reid_lab.models.prompt_learner import DEFAULT_TEMPLATE, PromptLearner, open_clip_text_model
from reid_lab.modules.base import EmbeddingModule, TrainingOutput
from reid_lab.modules.optim import build_optimizer, lr_schedule

STAGE2_LOSSES: list[dict[str, Any]] = [
    {"name": "ce", "epsilon": 0.1, "weight": 0.25},
    {"name": "triplet", "margin": 0.3, "weight": 1.0},
]
# the official optimiser settings of each stage (configs/person/vit_clipreid.yml), used where an argument is None
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"lr": 3.5e-4, "scheduler": "cosine", "warmup_epochs": 5, "warmup_factor": 1e-5 / 3.5e-4, "milestones": []},
    2: {"lr": 5e-6, "scheduler": "multistep", "warmup_epochs": 10, "warmup_factor": 0.1, "milestones": [30, 50]},
}
TEXT_BANK_CHUNK = 64  # identities per forward pass of the text tower when stage 2 builds its text features


class CLIPReIDModule(EmbeddingModule):
    """CLIP-ReID, one stage per run (see the module docstring).

    Args:
        stage: ``1`` (learn the identity prompts) or ``2`` (fine-tune the image tower).
        stage1_checkpoint: stage 2 only: the stage-1 checkpoint (``last.ckpt`` of the stage-1 run) whose
            towers and prompts it starts from; read when fitting starts.
        model_name / model_cfg / force_image_size / image_backbone / image_pretrained / weights: the open_clip
            encoder (see :class:`~reid_lab.models.clip.CLIPEncoder`); its text tower must be open_clip's own
            transformer. Stage 2 must use the same encoder settings as stage 1.
        num_classes: training identities (linked from the data module).
        n_ctx / template / prompt_init_std: the prompts (CLIP-ReID: 4 words in "A photo of a {} person.").
        supcon_temperature: stage-1 temperature (CLIP-ReID: 1).
        stage1_features: ``cached`` (official: the un-augmented training set's features, computed once when
            fitting starts, in a random order per epoch) or ``batch`` (the features of each augmented training
            batch).
        losses: stage-2 ReID losses on the BNNeck head (default: CE with label smoothing 0.1, weight 0.25, and
            batch-hard triplet with margin 0.3, weight 1).
        i2t_weight / i2t_epsilon: weight and label smoothing of stage 2's image-to-text cross-entropy.
        optimizer / lr / weight_decay / momentum / scheduler / milestones / gamma / warmup_epochs /
            warmup_factor: optimiser and per-step schedule; ``None`` takes the official value of the stage
            (stage 1: Adam 3.5e-4, cosine, 5 warm-up epochs from 1e-5; stage 2: Adam 5e-6, steps at epochs
            30 and 50, 10 warm-up epochs from 0.1x).
        distance / flip_test / max_rank / space_label: see :class:`EmbeddingModule`.
    """

    protocol = "reid"

    def __init__(
        self,
        stage: int = 1,
        stage1_checkpoint: str | None = None,
        model_name: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        force_image_size: tuple[int, int] | None = None,
        image_backbone: str | None = None,
        image_pretrained: str | None = None,
        weights: str | None = None,
        num_classes: int = 0,
        n_ctx: int = 4,
        template: str = DEFAULT_TEMPLATE,
        prompt_init_std: float = 0.02,
        supcon_temperature: float = 1.0,
        stage1_features: str = "cached",
        losses: list[dict[str, Any]] | None = None,
        i2t_weight: float = 1.0,
        i2t_epsilon: float = 0.1,
        optimizer: str = "adam",
        lr: float | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        scheduler: str | None = None,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_epochs: float | None = None,
        warmup_factor: float | None = None,
        distance: str = "cosine",
        flip_test: bool = False,
        max_rank: int = 50,
        space_label: str | None = None,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (learn the identity prompts) or 2 (fine-tune the image tower), "
                             f"got {stage!r}")
        if stage1_features not in ("cached", "batch"):
            raise ValueError(f"stage1_features must be 'cached' (the official recipe) or 'batch', got "
                             f"{stage1_features!r}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be the number of training identities (> 0), got {num_classes}; "
                             "with the CLI it is linked from the data module")
        encoder = CLIPEncoder(model_name=model_name, model_cfg=model_cfg, image_size=force_image_size,
                              weights=weights, image_backbone=image_backbone, image_pretrained=image_pretrained)
        clip_model = open_clip_text_model(encoder.model)
        super().__init__(encoder, distance=distance, flip_test=flip_test, max_rank=max_rank, space_label=space_label)
        self.save_hyperparameters()
        self.stage = int(stage)
        self.prompt_learner = PromptLearner(num_classes, clip_model.token_embedding.embedding_dim,
                                            encoder.tokenizer(), n_ctx=n_ctx, template=template,
                                            init_std=prompt_init_std)
        self.head: BNNeckHead | None = None
        self.losses = nn.ModuleList()
        if self.stage == 1:
            frozen = list(encoder.parameters())  # both towers and the temperature: only the prompts learn
        else:
            self.head = BNNeckHead(encoder.embedding_dim, num_classes=num_classes, neck_feat="before")
            self.losses = nn.ModuleList(build_loss(s["name"], **{k: v for k, v in s.items() if k != "name"})
                                        for s in _check_specs(losses if losses is not None else STAGE2_LOSSES))
            for loss in self.losses:
                loss.bind(num_classes, encoder.embedding_dim)
            # everything but the image tower: the text tower, its projection, the temperature, the prompts
            frozen = [p for name, p in encoder.model.named_parameters() if not name.startswith("visual.")]
            frozen += list(self.prompt_learner.parameters())
        for p in frozen:
            p.requires_grad_(False)
        self._text_bank: Tensor | None = None
        self._stage1_loaded: str | None = None
        self._cached_image: Tensor | None = None  # (N, D) stage-1 image features of the training set
        self._cached_pids: Tensor | None = None  # (N,)
        self._cached_order: Tensor | None = None  # this epoch's order of the cached rows
        self._cached_step = 0  # stage-1 steps taken in this epoch

    # ------------------------------------------------------------------------------------- frozen parts
    def _frozen_modules(self) -> list[nn.Module]:
        if self.stage == 1:
            return [self.encoder]
        model = self.encoder.model
        return [model.transformer, model.token_embedding, model.ln_final]

    def train(self, mode: bool = True) -> CLIPReIDModule:
        super().train(mode)
        for module in self._frozen_modules():  # frozen towers: no dropout, fixed norm statistics
            module.eval()
        return self

    def text_features(self, pids: Tensor) -> Tensor:
        """``(B,)`` identities -> ``(B, D)`` text features of their prompts (gradients reach the prompts)."""
        return self.prompt_learner.encode(self.encoder.model, pids)

    def text_bank(self) -> Tensor:
        """``(C, D)`` the text features of every training identity, without gradients (stage 2's classifier).

        Computed on first use after each epoch start or weight load (the text side is frozen in stage 2)."""
        if self._text_bank is None:
            with torch.no_grad():
                pids = torch.arange(self.prompt_learner.num_classes, device=self.prompt_learner.cls_ctx.device)
                self._text_bank = torch.cat([self.text_features(chunk) for chunk in pids.split(TEXT_BANK_CHUNK)])
        return self._text_bank

    # ------------------------------------------------------------------------------ stage-1 feature cache
    @torch.no_grad()
    def cache_stage1_features(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Compute and keep the image features of ``batches`` (``"image"``, ``"pid"``; the training set under the
        evaluation transform), with the frozen image tower in eval mode and no gradients: stage 1's inputs."""
        self.encoder.eval()
        features, pids = [], []
        for batch in batches:
            features.append(self.encoder.encode_image(batch["image"].to(self.device)))
            pids.append(batch["pid"].to(self.device))
        self.train(self.training)  # the module's own rule puts every part back in its mode
        if not features:
            raise ValueError("CLIP-ReID stage 1: the training set is empty, no image features to cache")
        self._cached_image, self._cached_pids = torch.cat(features), torch.cat(pids)
        self._cached_order, self._cached_step = None, 0

    def cached_stage1_rows(self, batch_size: int) -> Tensor:
        """``(batch_size,)`` rows of the cache for the next stage-1 step: this epoch's permutation (seeded by the
        epoch), cut in consecutive batches; under DDP rank ``r`` takes batches ``r, r + world, ...``."""
        num = self._cached_image.shape[0]
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        start = (self._cached_step * world + rank) * batch_size
        epoch = self.current_epoch if self._trainer is not None else 0
        while self._cached_order is None or self._cached_order.numel() < start + batch_size:
            # one more permutation of the whole set (the epoch's first, or a continuation when steps outnumber it)
            rounds = 0 if self._cached_order is None else self._cached_order.numel() // num
            generator = torch.Generator().manual_seed(int(epoch) * 1_000_003 + rounds)
            order = torch.randperm(num, generator=generator).to(self._cached_image.device)
            self._cached_order = order if self._cached_order is None else torch.cat([self._cached_order, order])
        self._cached_step += 1
        return self._cached_order[start:start + batch_size]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.stage == 1 and self.hparams.stage1_features == "cached":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "training_set_view"):
                raise ValueError("CLIP-ReID stage 1 caches the training set's image features from the data module's "
                                 "training_set_view(); this data module has none (or set model.init_args."
                                 "stage1_features: batch)")
            self.cache_stage1_features(datamodule.training_set_view().batches())

    # --------------------------------------------------------------------------------------- training
    def training_output(self, batch: dict[str, Any]) -> TrainingOutput:
        pids = batch["pid"]
        if self.stage == 1:
            if self.hparams.stage1_features == "cached":
                if self._cached_image is None:
                    raise RuntimeError("CLIP-ReID stage 1 (stage1_features: cached) has no cached image features: "
                                       "fit with a Trainer (it caches them when fitting starts) or call "
                                       "cache_stage1_features first")
                rows = self.cached_stage1_rows(len(pids))
                image, pids = self._cached_image[rows], self._cached_pids[rows]
            else:
                with torch.no_grad():
                    image = self.encoder.encode_image(batch["image"])
            text = self.text_features(pids)
            t = self.hparams.supcon_temperature
            i2t, t2i = supcon_loss(image, text, pids, pids, t), supcon_loss(text, image, pids, pids, t)
            return TrainingOutput(loss=i2t + t2i, embeddings={"image": image, "text": text}, labels=pids,
                                  parts={"supcon_i2t": i2t.detach(), "supcon_t2i": t2i.detach()})
        image = self.encoder.encode_image(batch["image"])
        outputs = self.head(image)
        total = image.new_zeros(())
        parts: dict[str, Tensor] = {}
        for loss in self.losses:
            value = loss(outputs, pids)
            parts[loss.name] = value.detach()
            total = total + loss.weight * value
        bank = self.text_bank()
        i2t = prototype_cross_entropy(image, bank, pids, self.hparams.i2t_epsilon)
        parts["i2t_ce"] = i2t.detach()
        parts["i2t_acc"] = ((image.detach() @ bank.T).argmax(1) == pids).float().mean()
        total = total + self.hparams.i2t_weight * i2t
        return TrainingOutput(loss=total, embeddings={"image": image}, labels=pids, parts=parts,
                              logits=outputs.get("logits"))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._text_bank = None
        self._cached_order, self._cached_step = None, 0  # a new permutation of the stage-1 features

    def space_model_name(self) -> str:
        return "clip_reid"

    # ------------------------------------------------------------------------------------ stage 1 -> 2
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.stage == 2 and self._stage1_loaded is None:
            path = self.hparams.stage1_checkpoint
            if path is None:
                raise ValueError("CLIP-ReID stage 2 starts from stage 1: set model.init_args.stage1_checkpoint to "
                                 "the stage-1 run's checkpoint (e.g. its last.ckpt)")
            self.load_stage1(path)

    def load_stage1(self, path: str) -> None:
        """Load the towers and the identity prompts of a stage-1 checkpoint (errors name the file)."""
        checkpoint = read_checkpoint(path)  # FileNotFoundError / ValueError naming the file
        record = checkpoint.get("clip_reid")
        if not isinstance(record, dict) or record.get("stage") != 1:
            found = f"a stage-{record.get('stage')} CLIP-ReID checkpoint" if isinstance(record, dict) else \
                f"a checkpoint of {(checkpoint.get('encoder') or {}).get('class_path', 'an unknown model')}"
            raise ValueError(f"{path} is not a stage-1 CLIP-ReID checkpoint (written by CLIPReIDModule with "
                             f"stage: 1); it is {found}")
        mine = {"num_classes": self.prompt_learner.num_classes, "n_ctx": self.prompt_learner.n_ctx,
                "template": self.prompt_learner.template}
        differ = [k for k in mine if record.get(k) != mine[k]]
        spec, own = checkpoint.get("encoder") or {}, self.encoder.spec()
        theirs, ours = spec.get("init_args") or {}, own["init_args"]
        differ += [f"encoder.{k}" for k in sorted(set(theirs) | set(ours)) if _canon(theirs.get(k)) != _canon(ours.get(k))]
        if spec.get("class_path") != own["class_path"]:
            differ.append("encoder class")
        if differ:
            detail = ", ".join(f"{k}: {record.get(k)!r} there, {mine[k]!r} here" for k in mine if k in differ)
            raise ValueError(f"the stage-1 checkpoint {path} does not fit this stage-2 model: {', '.join(differ)} "
                             f"differ{' (' + detail + ')' if detail else ''}; use the stage-1 model settings "
                             "and data")
        state = {k: v for k, v in checkpoint["state_dict"].items()
                 if k.startswith(("encoder.", "prompt_learner."))}
        missing, _ = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(("encoder.", "prompt_learner."))]
        if missing:
            raise ValueError(f"the stage-1 checkpoint {path} lacks weights {missing[:5]}")
        self._stage1_loaded = str(path)
        self._text_bank = None
        self._space = None

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["clip_reid"] = {"stage": self.stage, "num_classes": self.prompt_learner.num_classes,
                                   "n_ctx": self.prompt_learner.n_ctx, "template": self.prompt_learner.template,
                                   "stage1_checkpoint": self._stage1_loaded}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("clip_reid")
        if isinstance(record, dict) and record.get("stage") != self.stage:
            hint = " (give it to stage 2 as model.init_args.stage1_checkpoint)" if record.get("stage") == 1 else ""
            raise ValueError(f"the checkpoint is a stage-{record.get('stage')} CLIP-ReID checkpoint; this module "
                             f"is stage {self.stage}{hint}")
        super().on_load_checkpoint(checkpoint)
        self._text_bank = None

    # -------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        defaults = STAGE_DEFAULTS[self.stage]

        def pick(name):
            value = hp[name]
            return defaults[name] if value is None else value

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(hp.optimizer, [{"params": params, "weight_decay": hp.weight_decay}],
                                    lr=pick("lr"), momentum=hp.momentum)
        max_epochs = self.trainer.max_epochs if self._trainer is not None and self.trainer.max_epochs else 60
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else max_epochs
        steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
        schedule = lr_schedule(pick("scheduler"), max_epochs, pick("milestones"), hp.gamma, pick("warmup_epochs"),
                               pick("warmup_factor"), steps_per_epoch=steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_specs(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"losses[{i}] must be a mapping with a 'name' key, got {spec!r}")
    return specs


def _canon(value: Any) -> str:
    """A comparable form of an init argument (tuples and lists alike, as a checkpoint reads them back)."""
    return json.dumps(value, sort_keys=True, default=str)
