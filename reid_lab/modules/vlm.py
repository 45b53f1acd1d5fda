"""``VLMEmbeddingModule``: a VLM2Vec-style embedder (:class:`~reid_lab.models.vlm.VLMEncoder`) trained with
contrastive image–text losses, optionally through GradCache.

Everything else comes from :class:`~reid_lab.modules.base.EmbeddingModule`: the upgrade host (a VLM's caption
queries and images can be trained compatible with an old CLIP, ReID CNN or VLM gallery through the same
plugins and pairings), checkpoints that rebuild the encoder (resolved config, processor digest, LoRA options),
space records, evaluation under the data's protocol (caption → image without camera filter, or image → image
ReID), predict rows.

Training batches are those of :class:`~reid_lab.data.TextImageDataModule` with a
:class:`~reid_lab.data.text.VLMTextTokenizer`: ``image`` ``(B, 3, H, W)``, ``text`` ``(B, L)`` (the caption
queries, instruction included) and ``pid`` ``(B,)``. The default loss is VLM2Vec's one-directional InfoNCE
(caption query → image target, in-batch negatives) at the fixed temperature 0.02.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from reid_lab.data.text.vlm_processor import item_prompt
from reid_lab.losses.image_text import build_image_text_loss, pair_infonce
from reid_lab.metrics.candidates import list_hits, mmeb_summary
from reid_lab.models.vlm import VLMEncoder
from reid_lab.modules.base import EmbeddingModule, TrainingOutput, check_tokenizer
from reid_lab.modules.clip import _build
from reid_lab.modules.grad_cache import grad_cache_backward, slice_batch
from reid_lab.modules.guards import check_training_loss
from reid_lab.modules.optim import build_optimizer, per_step_scheduler


class VLMEmbeddingModule(EmbeddingModule):
    """VLM2Vec-style training of a transformers VLM as an embedder.

    Args:
        model_path / model_cfg / processor_path / pooling / instructions / context_length / lora /
            gradient_checkpointing / prompt_format / adapter_path: the encoder (see
            :class:`~reid_lab.models.vlm.VLMEncoder`; ``prompt_format: vlm2vec`` embeds as VLM2Vec does).
        losses: image–text losses ``[{name: infonce | clip | sdm | supcon | siglip, weight, **options}]``
            (default ``[{name: infonce}]``: caption → image InfoNCE).
        temperature: the softmax temperature of the losses (VLM2Vec: 0.02); the loss scale is ``1 / temperature``.
        learnable_temperature: train ``log(1 / temperature)`` (clamped to ``[0, log 100]`` as open_clip does).
        grad_cache_chunk: embed the batch in chunks of this many items through GradCache (exact full-batch
            gradients, one chunk's activation memory; see :mod:`reid_lab.modules.grad_cache`). Uses Lightning's
            manual optimisation; under DDP the all-reduce waits for the last chunk (``no_sync`` before it).
        num_classes: linked from the data module (unused by the default losses).
        optimizer / lr / weight_decay / momentum / scheduler / milestones / gamma / warmup_epochs /
            warmup_factor: optimiser and per-step schedule (no weight decay on gains, biases, temperature).
        distance / max_rank / space_label / upgrade: see :class:`EmbeddingModule`.
    """

    protocol = "cross_modal"
    monitor_metric = "R1"  # val/t2i/R1 on caption data; instruction pairs select on val/pairs/P@1

    def __init__(
        self,
        model_path: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        processor_path: str | None = None,
        pooling: str = "last",
        instructions: dict[str, str] | None = None,
        context_length: int = 48,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        losses: list[dict[str, Any]] | None = None,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        grad_cache_chunk: int | None = None,
        num_classes: int = 0,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        scheduler: str = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_epochs: float = 0.5,
        warmup_factor: float = 0.01,
        distance: str = "cosine",
        max_rank: int = 50,
        space_label: str | None = None,
        upgrade: dict[str, Any] | None = None,
        prompt_format: str = "reid_lab",
        adapter_path: str | None = None,
    ) -> None:
        encoder = VLMEncoder(model_path=model_path, model_cfg=model_cfg, processor_path=processor_path,
                             pooling=pooling, instructions=instructions, context_length=context_length, lora=lora,
                             gradient_checkpointing=gradient_checkpointing, prompt_format=prompt_format,
                             adapter_path=adapter_path)
        super().__init__(encoder, distance=distance, max_rank=max_rank, space_label=space_label, upgrade=upgrade)
        self.save_hyperparameters()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=bool(learnable_temperature))
        self.losses = nn.ModuleList(_build(losses if losses is not None else [{"name": "infonce"}],
                                           build_image_text_loss, "losses"))
        if grad_cache_chunk is not None and int(grad_cache_chunk) <= 0:
            raise ValueError(f"grad_cache_chunk must be a positive number of items, got {grad_cache_chunk}")
        self.grad_cache_chunk = int(grad_cache_chunk) if grad_cache_chunk else None
        self.automatic_optimization = self.grad_cache_chunk is None
        self._pair_counts: dict[str, list[int]] = {}  # split -> [hits, queries, candidates per query]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "tokenize"):
            check_tokenizer(datamodule.tokenize, self.encoder.tokenizer())
        if self._on_pairs() and self._trainer.is_global_zero:
            splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
            for split in splits:
                print(self.describe_pair_lengths(datamodule, split), flush=True)

    def describe_pair_lengths(self, datamodule: Any, split: str) -> str:
        """What the context length does to the instruction pairs of ``split``: nothing. Pair items (query, target,
        negatives) are embedded whole (:meth:`~reid_lab.models.vlm.VLMEncoder.embed_items`); ``context_length``
        cuts caption ids only. The line gives the longest item prompt in tokens (an image counts as its
        placeholder, before the processor expands it to the image's patches) and, under ``prompt_format:
        vlm2vec``, the share of text-only items longer than VLM2Vec's ``max_len`` (``context_length - 1``), which
        VLM2Vec would cut and reid_lab does not."""
        records = datamodule.records(split)
        fmt = self.encoder.prompt_format
        prompts = {(item_prompt(fmt, i.instruction, i.text, i.image is not None), i.image is None)
                   for r in records for i in (r.query, r.target, *r.negatives)}
        texts = sorted(prompts)
        lengths = [len(ids) for ids in self.encoder.processor.tokenizer([t for t, _ in texts])["input_ids"]]
        line = (f"pairs ({split}): {len(records)} pairs, {len(texts)} distinct item prompts, the longest "
                f"{max(lengths, default=0)} tokens (images as their placeholder); pair items are embedded whole, "
                f"context_length {self.encoder.context_length} cuts captions only")
        if fmt == "vlm2vec":
            text_only = [n for n, (_, no_image) in zip(lengths, texts, strict=True) if no_image]
            over = sum(n > self.encoder.context_length - 1 for n in text_only)
            line += (f"; {over} of {len(text_only)} text-only items are longer than VLM2Vec's max_len "
                     f"{self.encoder.context_length - 1}, which VLM2Vec would cut")
        return line

    def space_model_name(self) -> str:
        return "vlm"

    def _on_pairs(self) -> bool:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "eval_protocol", None) == "pairs"

    def _on_mmeb(self) -> bool:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "eval_protocol", None) == "mmeb"

    @property
    def eval_tag(self) -> str:
        """``pairs`` on instruction pairs (:class:`~reid_lab.data.PairDataModule`), else the retrieval protocol's."""
        return "pairs" if self._on_pairs() else "mmeb" if self._on_mmeb() else super().eval_tag

    @property
    def monitor(self) -> str:
        """``val/pairs/P@1`` on instruction pairs (``val/mmeb/P@1`` on MMEB), else ``val/t2i/R1`` (``val/i2i/R1``
        on ReID data)."""
        return f"val/{self.eval_tag}/P@1" if self._on_pairs() or self._on_mmeb() else super().monitor

    # --------------------------------------------------------------------------------------- training
    def embed_training(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Training representations: ``{"image": (B, D), "text": (B, D)}`` of an image–caption batch, or
        ``{"query", "target"[, "negatives"]}`` of an instruction-pair batch."""
        if "query" in batch:
            reps = {"query": self.encoder.embed_items(batch["query"]),
                    "target": self.encoder.embed_items(batch["target"])}
            if "negatives" in batch:
                reps["negatives"] = self.encoder.embed_items(batch["negatives"])
            return reps
        return {"image": self.encoder.encode_image(batch["image"]), "text": self.encoder.encode_text(batch["text"])}

    def losses_of(self, reps: dict[str, Tensor], batch: dict[str, Any]) -> TrainingOutput:
        """The module's own losses on the batch's representations."""
        if "query" in reps:
            if self.host is not None:
                raise ValueError("instruction-pair batches carry no per-modality embeddings for the upgrade host: "
                                 "train an upgrade on TextImageDataModule or ReIDDataModule data")
            loss = pair_infonce(reps["query"], reps["target"], reps.get("negatives"), self.logit_scale)
            parts = {"pair_infonce": loss.detach(), "temperature": 1.0 / self.logit_scale.detach().exp()}
            return TrainingOutput(loss=loss, embeddings=reps, labels=batch["pid"], parts=parts)
        pids = batch["pid"]
        total = reps["image"].new_zeros(())
        parts: dict[str, Tensor] = {}
        for loss in self.losses:
            value = loss(reps["image"], reps["text"], pids, self.logit_scale)
            parts[loss.name] = value.detach()
            total = total + loss.weight * value
        parts["temperature"] = 1.0 / self.logit_scale.detach().exp()
        return TrainingOutput(loss=total, embeddings=reps, labels=pids, parts=parts)

    def training_output(self, batch: dict[str, Any]) -> TrainingOutput:
        return self.losses_of(self.embed_training(batch), batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        outputs: dict[str, Any] = {}

        def loss_fn(reps: dict[str, Tensor]):
            out = self.losses_of(reps, batch)
            total, parts = self.total_loss(batch, out)
            outputs.update(out=out, parts=parts)
            check_training_loss(self.trainer, total)  # the guard sees the loss, not the chunks' surrogates
            return total, None

        # Under DDP: no all-reduce until the last chunk's backward, which then reduces the accumulated gradients
        # (every parameter takes part in it, see grad_cache_backward); the loss gathers every rank's
        # representations as negatives, as without GradCache.
        distributed = self.trainer.world_size > 1
        total, _ = grad_cache_backward(batch, int(batch["pid"].numel()), self.grad_cache_chunk,
                                       self.embed_training, loss_fn, backward=self.manual_backward,
                                       no_sync=self.trainer.strategy.block_backward_sync if distributed else nullcontext,
                                       slicer=slice_pair_batch if "query" in batch else slice_batch,
                                       params=[p for p in self.parameters() if p.requires_grad] if distributed else ())
        optimizer.step()
        scheduler.step()
        self._clamp_temperature()
        self.log_training(total, outputs["parts"], outputs["out"])
        return None

    # ------------------------------------------------------------------------------- pair evaluation
    def _pair_step(self, batch: dict[str, Any], split: str) -> None:
        reps = {k: torch.nn.functional.normalize(v.float(), dim=1) for k, v in self.embed_training(batch).items()}
        if "negatives" not in reps:
            raise ValueError("MMEB-style evaluation needs pairs with negatives (the candidates besides the target)")
        q, t = reps["query"], reps["target"]
        n = reps["negatives"].view(q.shape[0], -1, q.shape[1])
        positive = (q * t).sum(dim=1)
        hits = positive > torch.einsum("bd,bkd->bk", q, n).max(dim=1).values  # ties count against the target
        counts = self._pair_counts.setdefault(split, [0, 0, n.shape[1] + 1])
        counts[0] += int(hits.sum())
        counts[1] += int(hits.numel())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "query" in batch:
            return self._pair_step(batch, "val")
        if "mmeb_items" in batch:
            return self._mmeb_step(batch, "val")
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "query" in batch:
            return self._pair_step(batch, "test")
        if "mmeb_items" in batch:
            return self._mmeb_step(batch, "test")
        return super().test_step(batch, batch_idx)

    def _log_pairs(self, split: str) -> bool:
        counts = self._pair_counts.pop(split, None)
        if counts is None and not self._on_pairs():
            return False
        # under DDP each rank scored its own block of pairs: sum the counts (a rank may have had no batch)
        local = torch.tensor(counts or [0, 0, 0], dtype=torch.long, device=self.device)
        hits, total = (int(v) for v in self.trainer.strategy.reduce(local[:2].clone(), reduce_op="sum").tolist())
        candidates = int(self.trainer.strategy.reduce(local[2:].clone(), reduce_op="max").item())
        if not self.trainer.sanity_checking:
            p1 = 100.0 * hits / max(total, 1)
            self.log(f"{split}/pairs/P@1", p1)
            self.print(f"{self.evaluation_label()} {split}/pairs: P@1 {p1:.2f} over {total} queries, {candidates} "
                       f"candidates each (chance {100.0 / max(candidates, 1):.2f})")
        return True

    # ------------------------------------------------------------------------------- MMEB evaluation
    def _mmeb_step(self, batch: dict[str, Any], split: str) -> None:
        """Embed a batch of MMEB's distinct items (:class:`~reid_lab.data.mmeb.MMEBDataModule`), kept by index."""
        reps = torch.nn.functional.normalize(self.encoder.embed_items(batch["mmeb_items"]).float(), dim=1)
        self.__dict__.setdefault("_mmeb_reps", {}).setdefault(split, []).append((batch["index"], reps))

    def _mmeb_table(self, split: str, num_items: int) -> Tensor:
        """``(num_items, D)`` embeddings of every MMEB item, gathered from all ranks (each embedded a block)."""
        parts = self.__dict__.get("_mmeb_reps", {}).pop(split, [])
        dim = self.encoder.embedding_dim
        index = torch.cat([i for i, _ in parts]).to(self.device) if parts else torch.zeros(0, dtype=torch.long,
                                                                                           device=self.device)
        reps = torch.cat([r for _, r in parts]) if parts else torch.zeros(0, dim, device=self.device)
        if self.trainer.world_size > 1:  # pad every rank's block to the longest, gather, drop the padding
            longest = int(self.trainer.strategy.reduce(torch.tensor(len(index), device=self.device),
                                                       reduce_op="max").item())
            pad = longest - len(index)
            index = torch.cat([index, index.new_full((pad,), -1)])
            reps = torch.cat([reps, reps.new_zeros(pad, reps.shape[1])])
            index, reps = self.all_gather(index).flatten(), self.all_gather(reps).reshape(-1, reps.shape[-1])
            keep = index >= 0
            index, reps = index[keep], reps[keep]
        table = reps.new_zeros(num_items, reps.shape[1] if len(reps) else dim)
        seen = torch.zeros(num_items, dtype=torch.bool, device=reps.device)
        table[index], seen[index] = reps, True
        if not bool(seen.all()):
            raise RuntimeError(f"MMEB {split}: {int((~seen).sum())} of {num_items} items were not embedded (every "
                               f"item must be: do not limit the {split} batches)")
        return table

    def _log_mmeb(self, split: str) -> bool:
        """Log ``{split}/mmeb/<subset>/P@1``, ``{split}/mmeb/<meta_task>/P@1`` and ``{split}/mmeb/P@1``."""
        if not self._on_mmeb():
            return False
        datamodule = self.trainer.datamodule
        subsets = datamodule.subsets()
        table = self._mmeb_table(split, sum(len(s.items) for s, _ in subsets))
        if self.trainer.sanity_checking:
            return True
        per_subset, per_subset_mmeb, tasks = {}, {}, {}
        for subset, offset in subsets:
            # queries against every item of the subset, then each row's candidates: (Q, N) not (Q, K, D)
            similarity = table[subset.queries.to(table.device) + offset] @ table[offset:offset + len(subset.items)].T
            candidates = subset.candidates.to(table.device)
            scores = torch.gather(similarity, 1, candidates.clamp(min=0))
            valid = candidates >= 0
            strict, first = list_hits(scores, valid, "strict"), list_hits(scores, valid, "first")
            per_subset[subset.name] = 100.0 * float(strict.float().mean())
            per_subset_mmeb[subset.name] = 100.0 * float(first.float().mean())
            tasks[subset.name] = subset.meta_task
            k = valid.sum(dim=1).float().mean()
            self.log(f"{split}/mmeb/{subset.name}/P@1", per_subset[subset.name])
            self.print(f"{self.evaluation_label()} {split}/mmeb/{subset.name} ({subset.meta_task}): P@1 "
                       f"{per_subset[subset.name]:.2f} over {len(strict)} queries, {float(k):.0f} candidates each "
                       f"(chance {100.0 / float(k):.2f}); ties: {int((first & ~strict).sum())} queries tie the "
                       f"positive with the best negative, a miss here, a hit under MMEB's argmax "
                       f"(P@1 {per_subset_mmeb[subset.name]:.2f})")
        summary, summary_mmeb = mmeb_summary(per_subset, tasks), mmeb_summary(per_subset_mmeb, tasks)
        for task in sorted(set(tasks.values())):
            self.log(f"{split}/mmeb/{task}/P@1", summary[task])
        self.log(f"{split}/mmeb/P@1", summary["overall"])
        parts = "  ".join(f"{task} {summary[task]:.2f}" for task in sorted(set(tasks.values())))
        self.print(f"{self.evaluation_label()} {split}/mmeb: P@1 {summary['overall']:.2f} (plain mean over "
                   f"{len(per_subset)} subsets; MMEB's tie rule: {summary_mmeb['overall']:.2f})  {parts}")
        return True

    def on_validation_epoch_end(self) -> None:
        if not self._log_pairs("val") and not self._log_mmeb("val"):
            super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        if not self._log_pairs("test") and not self._log_mmeb("test"):
            super().on_test_epoch_end()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._clamp_temperature()

    def _clamp_temperature(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))

    # -------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.requires_grad and p.ndim >= 2 and "bias" not in n]
        no_decay = [p for n, p in self.named_parameters() if p.requires_grad and (p.ndim < 2 or "bias" in n)]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = build_optimizer(hp.optimizer, [g for g in groups if g["params"]], lr=hp.lr, momentum=hp.momentum)
        return {"optimizer": optimizer,
                "lr_scheduler": per_step_scheduler(self, optimizer, hp.scheduler, hp.milestones or [], hp.gamma,
                                                   hp.warmup_epochs, hp.warmup_factor)}


def slice_pair_batch(batch: dict[str, Any], rows: slice, size: int) -> dict[str, Any]:
    """Rows ``rows`` of an instruction-pair batch: its queries, targets and pids, and the ``K`` negatives of each
    of those pairs (negatives hold ``size * K`` items, pair by pair)."""
    out: dict[str, Any] = {"pid": batch["pid"][rows], "index": batch["index"][rows]}
    for side in ("query", "target"):
        out[side] = slice_batch(batch[side], rows, size)
    if "negatives" in batch:
        k = len(batch["negatives"]["text"]) // size
        out["negatives"] = slice_batch(batch["negatives"], slice(rows.start * k, rows.stop * k), size * k)
    return out
