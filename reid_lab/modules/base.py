"""``EmbeddingModule``: what every reid_lab LightningModule shares, whatever its encoder.

It owns the encoder (an :class:`~reid_lab.embedding.encoder.Encoder`), the optional upgrade host (a frozen
old encoder plus compatible-loss plugins), the embedding-space record, the checkpoint contract (the encoder
spec, so any checkpoint can be the old model of a later upgrade), test-time embedding through one
:class:`~reid_lab.embedding.embedder.Embedder`, validation / test metrics and ``predict`` rows.

A subclass builds its encoder, passes it to ``super().__init__`` and implements :meth:`training_output`
(its own losses); it may override :meth:`build_metric` (the evaluation protocol) and ``monitor_metric`` (which
of the protocol's numbers selects the best checkpoint).

Metric keys name their protocol: ``val/i2i/mAP`` (image -> image ReID), ``test/t2i/R1`` (caption -> image),
``val/cross/i2i/mAP`` (the upgrade cross-test); the printed lines carry the same prefix and count epochs from 1,
as the training lines and checkpoint names do (:mod:`reid_lab.modules.checkpointing`).
"""

from __future__ import annotations

import inspect
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from reid_lab.embedding.checkpoint import sub_state_dict
from reid_lab.embedding.embedder import Embedder
from reid_lab.embedding.encoder import MODALITIES, Encoder
from reid_lab.embedding.space import make_space, weights_digest
from reid_lab.metrics.reid_metric import PROTOCOL_TAGS, RetrievalMetric
from reid_lab.modules.checkpointing import EmbeddingCheckpoint, validation_source
from reid_lab.upgrade.host import CompatibilityHost, training_schedule

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."


def batch_modality(batch: dict[str, Any]) -> str:
    """The modality of an evaluation batch (batches are homogeneous: ReID images, or captions, or images)."""
    present = [m for m in MODALITIES if m in batch]
    if len(present) != 1:
        raise ValueError(f"an evaluation batch holds one modality of {MODALITIES}; this one holds {present}")
    return present[0]


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch (CPU and every CUDA device) random states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {  # plain containers and tensors: checkpoints load with weights_only=True
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    random.setstate(_as_python_state(states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a checkpoint read back with ``weights_only`` may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def check_upgrade(upgrade: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``model.init_args.upgrade`` against :class:`CompatibilityHost`'s arguments, naming the key."""
    if upgrade is None:
        return None
    if not isinstance(upgrade, dict):
        raise ValueError(f"model.init_args.upgrade must be a mapping, got {upgrade!r}")
    allowed = set(inspect.signature(CompatibilityHost.__init__).parameters) - {
        "self", "new_dim", "new_modalities", "new_num_classes"}
    unknown = sorted(set(upgrade) - allowed)
    if unknown:
        raise ValueError(f"model.init_args.upgrade has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if "old_checkpoint" not in upgrade:
        raise ValueError("model.init_args.upgrade needs old_checkpoint (the old model's checkpoint file)")
    return {"compatible_losses": [], **upgrade}


PROBE = ["a woman in a long red coat with a black backpack", "a man wearing blue jeans and white shoes"]


def check_tokenizer(data_tokenize, model_tokenize) -> None:
    """Refuse a data module whose token ids differ from the text tower's (another vocabulary or length):
    the model would silently read the wrong words."""
    got, want = data_tokenize(PROBE), model_tokenize(PROBE)
    if got.shape != want.shape or not torch.equal(got.long(), want.long()):
        raise ValueError(
            f"the data module's tokenizer gives ids of shape {tuple(got.shape)} that differ from the text tower's "
            f"{tuple(want.shape)} on the same captions: use the tower's tokenizer and context length (e.g. "
            "OpenCLIPTokenizer for open_clip's text transformer, HFTokenizer of the packaged MiniLM for "
            "text_tower: minilm_l6)"
        )


@dataclass
class TrainingOutput:
    """What a subclass's training step produced.

    Attributes:
        loss: the weighted sum of the module's own losses (scalar, with gradients).
        embeddings: ``{modality: (B, D)}`` training embeddings (with gradients) for the upgrade host.
        labels: ``(B,)`` class labels of the batch.
        parts: named loss values for logging.
        logits: ``(B, C)`` image classifier logits, if any.
        branches: ``{modality: (B, D_f)}`` the feature an embedding was made from by a basis transformation
            (BT²'s ``f``, with gradients), for plugins that train it; empty otherwise.
    """

    loss: Tensor
    embeddings: dict[str, Tensor]
    labels: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    branches: dict[str, Tensor] = field(default_factory=dict)


class EmbeddingModule(L.LightningModule):
    """Base of ``ReIDModule`` and every other embedding module (see the module docstring).

    Args:
        encoder: the encoder being trained.
        distance: ``cosine`` or ``euclidean`` for evaluation.
        flip_test: average each image's embedding with its horizontal flip at test time.
        max_rank: CMC length.
        space_label: human-readable name of the embedding space (its identity is the weights' hash).
        upgrade: train the encoder compatible with an old one (``old_checkpoint``, ``compatible_losses``,
            ``adapter``, ``pairings``; see :class:`~reid_lab.upgrade.host.CompatibilityHost`). Validation
            then also reports the cross-test (new queries against old gallery features) as
            ``val/cross/<tag>/*``.
    """

    monitor_metric: str = "mAP"  # the number of the validation protocol that selects the best checkpoint
    monitor_mode: str = "max"
    protocol: str = "reid"  # "reid" (same-camera junk removed) or "cross_modal" (see RetrievalMetric)

    def __init__(
        self,
        encoder: Encoder,
        *,
        distance: str = "cosine",
        flip_test: bool = False,
        max_rank: int = 50,
        space_label: str | None = None,
        upgrade: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be a reid_lab Encoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.distance = distance
        self.flip_test = bool(flip_test)
        self.max_rank = max_rank
        self.space_label = space_label
        self.val_metric = self.build_metric()
        self.test_metric = self.build_metric()
        self.host: CompatibilityHost | None = None
        self._upgrade = check_upgrade(upgrade)
        if self._upgrade is not None and Path(str(self._upgrade.get("old_checkpoint", ""))).is_file():
            self._build_host()
        # else: built at setup("fit" / "validate"), where a missing old checkpoint is an error; a trained model
        # is tested, exported and used for predict without its old model (the adapter is only for training).
        self._space: dict[str, Any] | None = None

    def _build_host(self) -> None:
        self.host = CompatibilityHost(new_dim=self.encoder.embedding_dim, new_modalities=self.encoder.modalities,
                                      new_num_classes=self.encoder.num_classes, **self._upgrade)
        self.val_cross_metric = self.build_metric()

    @property
    def eval_tag(self) -> str:
        """The protocol tag of this module's metric keys under the current data: ``i2i`` or ``t2i``."""
        return PROTOCOL_TAGS[self._data_protocol()]

    @property
    def monitor(self) -> str:
        """The validation key that selects the best checkpoint, e.g. ``val/i2i/mAP``."""
        return f"val/{self.eval_tag}/{self.monitor_metric}"

    def setup(self, stage: str) -> None:
        self._follow_data_protocol()
        trainer = self._trainer
        if stage in ("fit", "validate") and trainer is not None and trainer.is_global_zero and not any(
                isinstance(c, EmbeddingCheckpoint) for c in trainer.callbacks):  # it says it with its own rule
            print(f"validation (val/{self.eval_tag}/*): {validation_source(trainer)[1]}", flush=True)
        if self._upgrade is not None and self.host is None and stage in ("fit", "validate"):
            old = self._upgrade.get("old_checkpoint")
            if not Path(str(old)).is_file():
                raise FileNotFoundError(f"model.init_args.upgrade.old_checkpoint {old} does not exist: training "
                                        "or validating against the old model needs it")
            self._build_host()
        if self.host is not None and stage == "fit":
            self._check_old_text_tokens()

    def _check_old_text_tokens(self) -> None:
        """A pairing onto the old model's text side feeds it the training batch's caption ids: refuse a data
        tokenizer that differs from the old text tower's (another vocabulary would be read as wrong words)."""
        if not any(old == "text" for _, old in self.host.pairings):
            return
        datamodule = getattr(self._trainer, "datamodule", None)
        old_tokenizer = getattr(self.host.old.encoder, "tokenizer", None)
        if datamodule is None or not hasattr(datamodule, "tokenize") or not callable(old_tokenizer):
            return
        try:
            check_tokenizer(datamodule.tokenize, old_tokenizer())
        except ValueError as err:
            pairs = [f"{n}->{o}" for n, o in self.host.pairings if o == "text"]
            raise ValueError(f"pairing {pairs} gives the old model ({self.host.old_checkpoint}) the training "
                             f"captions' token ids, but {err}. Pair the new text with the old images instead "
                             "(text->image), or train with the old text tower's tokenizer") from err

    def _data_protocol(self) -> str:
        """The protocol the module evaluates under with the current data module: the data's when the encoder
        can embed its queries (a dual encoder on a ReID data module: ReID on its image tower; on caption data,
        cross-modal), else the module's own (none declared, instruction pairs, no text tower)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        protocol = getattr(datamodule, "eval_protocol", None)
        if protocol not in ("reid", "cross_modal"):
            return self.protocol
        if protocol == "cross_modal" and "text" not in self.encoder.modalities:
            return self.protocol
        return protocol

    def _follow_data_protocol(self) -> None:
        """Evaluate under :meth:`_data_protocol` (rebuilding the metrics when it differs from the module's)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        protocol = self._data_protocol()
        if protocol == self.protocol:
            return
        self.protocol = protocol
        self.val_metric, self.test_metric = self.build_metric(), self.build_metric()
        if self.host is not None:
            self.val_cross_metric = self.build_metric()
        described = {"reid": "image queries against the image gallery, ReID protocol (same-camera junk removed)",
                     "cross_modal": "caption queries against the image gallery, no camera filter"}
        log.info("evaluation: %s (from %s)", described.get(protocol, protocol), type(datamodule).__name__)

    # ------------------------------------------------------------------------------------ embeddings
    def build_metric(self) -> RetrievalMetric:
        """The evaluation metric under the module's ``protocol``."""
        return RetrievalMetric(protocol=self.protocol, metric=self.distance, max_rank=self.max_rank)

    def update_metric(self, metric: RetrievalMetric, batch: dict[str, Any], embedding: Tensor) -> None:
        """Add a batch of query / gallery embeddings to ``metric`` (camids under the ReID protocol only)."""
        if self.protocol == "reid":
            metric.update(embedding, batch["pid"], batch["camid"], batch["is_query"])
        else:
            metric.update(embedding, batch["pid"], batch["is_query"])

    def embedder(self, into_old_space: bool = False) -> Embedder:
        """The test-time embedder: flip TTA as configured, and with ``into_old_space`` the host's adapter."""
        if into_old_space and self.host is None:
            raise ValueError("into_old_space needs an upgrade host (this module has no old model)")
        projection = self.host.adapter if into_old_space else None
        return Embedder(self.encoder, flip_test=self.flip_test, projection=projection)

    def embedding_space(self) -> dict[str, Any]:
        """The embedding-space record of the current weights (see :mod:`reid_lab.embedding.space`)."""
        if self._space is None:
            self._space = make_space(
                self.space_model_name(), self.encoder.embedding_dim, state_dict=self.encoder.state_dict(),
                label=self.space_label, parent=self.host.old_space.get("space_id") if self.host else None,
                distance=self.distance, normalized=self.distance == "cosine",
                modalities=self.encoder.modalities, init=getattr(self.encoder, "pretrained_source", None),
            )
        return self._space

    def space_model_name(self) -> str:
        """What produced the vectors, for the space record (the encoder's class by default)."""
        return type(self.encoder).__name__

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._space = None  # the weights may have changed since the record was made
        checkpoint["encoder"] = {**self.encoder.spec(), "state_prefix": ENCODER_PREFIX}
        checkpoint["embedding"] = {
            "flip_test": self.flip_test, "distance": self.distance,
            "adapter": self.host.adapter_record() if self.host is not None else None,
        }
        checkpoint["embedding_space"] = self.embedding_space()
        if self.host is not None:
            checkpoint["compatibility_state"] = self.host.state_for_checkpoint()
        checkpoint["rng_states"] = rng_states()
        logger = self._trainer.logger if self._trainer is not None else None
        if logger is not None:  # a resumed fit continues this run (and its checkpoint folder)
            checkpoint["run"] = {"logger": type(logger).__name__, "version": str(logger.version)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self.host is None:  # weights of a training-time host (adapter) are not needed without one
            for key in [k for k in state if k.startswith("host.")]:
                del state[key]
        if "encoder" not in checkpoint and not any(k.startswith(ENCODER_PREFIX) for k in state):
            legacy = [k for k in state if k.startswith("model.")]
            if not legacy:
                raise ValueError("the checkpoint holds no encoder weights (no 'encoder.' or legacy 'model.' keys)")
            for key in legacy:  # ReIDModule checkpoints before the encoder contract kept the encoder in .model
                state[ENCODER_PREFIX + key[len("model."):]] = state.pop(key)
        space = checkpoint.get("embedding_space")
        self._space = None
        if space:
            digest = weights_digest(sub_state_dict(state, ENCODER_PREFIX))
            if str(space.get("space_id", "")).endswith(digest):
                self._space = space
            else:
                log.warning("the checkpoint's space record %r does not match its weights (hash %s): it is "
                            "re-derived and its compatibility claims are dropped", space.get("space_id"), digest)
        if self.host is not None and checkpoint.get("compatibility_state"):
            self.host.load_state(checkpoint["compatibility_state"])
        self._resume_rng = checkpoint.get("rng_states")
        self._checkpoint_epoch = checkpoint.get("epoch")

    # --------------------------------------------------------------------------------------- training
    def training_output(self, batch: dict[str, Any]) -> TrainingOutput:  # pragma: no cover - abstract
        """Run the encoder on a training batch and compute the module's own losses."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        if self.host is not None:
            self.host.prepare(self.trainer.datamodule.training_set_view(), device=self.device)

    def on_train_epoch_start(self) -> None:
        # A resumed fit continues from the random state the checkpoint was written in (at the end of an epoch,
        # after its validation if any), so the next epoch's loader seed and augmentations equal the
        # uninterrupted run's. Restored here, not at load time: fit start (host preparation) draws numbers too.
        if getattr(self, "_resume_rng", None) is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None
            self._fresh_training_iterator()
        if self.host is not None:
            self.host.on_train_epoch_start(self.current_epoch, self.embedder())

    def _fresh_training_iterator(self) -> None:
        """Make the resumed epoch's training iterator from the restored random state.

        The uninterrupted run creates a new iterator (drawing its loader seed, which also seeds workers) at the
        start of every epoch, after this hook. A resumed fit in Lightning 2.x keeps the iterator it created
        before fit start (for ``estimated_stepping_batches``) when the checkpoint was written at the end of a
        training epoch without validation; its seed came from the unrestored state. Lightning's own rule for
        recreating it (``TrainingEpochLoop.on_run_start``) decides whether it is made again here.
        """
        loop = self.trainer.fit_loop
        recreated = self.trainer.current_epoch > 0 and not loop.is_resuming and not loop.epoch_loop.restarting
        fetcher = getattr(loop, "_data_fetcher", None)
        if not recreated and fetcher is not None:
            iter(fetcher)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.training_output(batch)
        total, parts = self.total_loss(batch, out)
        self.log_training(total, parts, out)
        return total

    def total_loss(self, batch: dict[str, Any], out: TrainingOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """The module's own loss plus the upgrade host's compatible losses, and every named part."""
        total, parts = out.loss, dict(out.parts)
        if self.host is not None:
            compat, compat_parts = self.host(batch, out.embeddings, out.labels, self.current_epoch,
                                             new_classifier=self.encoder.classifier_weight, new_logits=out.logits,
                                             new_branches=out.branches,
                                             **training_schedule(self._trainer, self.global_step))
            total = total + compat
            parts.update(compat_parts)
        return total, parts

    def log_training(self, total: Tensor, parts: dict[str, Tensor], out: TrainingOutput) -> None:
        """Log the training loss, its parts and (with a classifier) the batch accuracy."""
        batch_size = out.labels.numel()
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if out.logits is not None:
            acc = (out.logits.argmax(1) == out.labels).float().mean()
            self.log("train/acc", acc, prog_bar=True, batch_size=batch_size)

    # ------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        modality = batch_modality(batch)
        self.update_metric(self.val_metric, batch, self.embedder()(batch)[modality])
        if self.host is not None:  # cross-test: new (adapted) queries against the old model's gallery
            is_query = batch["is_query"]
            mixed = self.embedder(into_old_space=True)(batch)[modality]
            if not bool(is_query.all()):  # gallery items are images, embedded by the old model
                old = self.host.old.encode({"image": batch["image"]})["image"]
                mixed = torch.where(is_query.unsqueeze(1), mixed, old)
            self.update_metric(self.val_cross_metric, batch, mixed)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_metric(self.test_metric, batch, self.embedder()(batch)[batch_modality(batch)])

    def evaluation_label(self) -> str:
        """The bracket that starts a printed evaluation line. During fit: ``[epoch 4/12]``, the epoch counted
        from 1 as the ``[train] epoch 4/12`` lines and checkpoint names count it. In validate / test (which
        start at epoch 0 whatever they loaded): the loaded checkpoint's epoch, ``[test, checkpoint of epoch 4]``."""
        trainer = self._trainer
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        fn = str(getattr(fn, "value", fn or ""))
        if fn == "fit":
            total = trainer.max_epochs
            return f"[epoch {self.current_epoch + 1}{f'/{total}' if total and total > 0 else ''}]"
        loaded = getattr(self, "_checkpoint_epoch", None)  # Lightning's 0-based index of the saved epoch
        where = f"checkpoint of epoch {loaded + 1}" if loaded is not None else "initial weights"
        return f"[{fn or 'evaluation'}, {where}]"

    def _log_metric(self, metric: RetrievalMetric, prefix: str) -> None:
        if self.trainer.sanity_checking:  # a few query-only batches: nothing to rank yet
            metric.reset()
            return
        results = metric.compute()
        key = f"{prefix}/{metric.tag}"  # the protocol is part of every key: val/i2i/mAP, test/t2i/R1
        self.log_dict({f"{key}/{k}": v for k, v in results.items()}, prog_bar=False, sync_dist=False)
        summary = "  ".join(f"{k} {float(v):.2f}" for k, v in results.items())
        what = metric.describe()
        if prefix == "val/cross":
            what = f"new queries vs the old model's gallery; {what}"
        metric.reset()
        self.print(f"{self.evaluation_label()} {key}: {summary}  ({what})")

    def on_validation_epoch_end(self) -> None:
        self._log_metric(self.val_metric, "val")
        if self.host is not None:
            self._log_metric(self.val_cross_metric, "val/cross")

    def on_test_epoch_end(self) -> None:
        self._log_metric(self.test_metric, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One row per item: ``embedding``, ``pid``, ``index``, ``is_query``, ``camid`` (if any), ``modality``."""
        modality = batch_modality(batch)
        rows = {
            "embedding": self.embedder()(batch)[modality],
            "pid": batch["pid"],
            "index": batch["index"],
            "is_query": batch["is_query"],
            "modality": modality,
        }
        if "camid" in batch:
            rows["camid"] = batch["camid"]
        return rows
