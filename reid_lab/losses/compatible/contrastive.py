"""New-to-old InfoNCE and the cross-rank machinery shared with the RACT losses.

:class:`ContrastiveN2O` is the ``contra`` baseline of OpenCompatible and the ablation of the RACT paper
(B. Zhang et al., ICLR 2022, arXiv 2201.09724) without new-to-new negatives; with
``positives="same_label"`` it is openBCT's ``--contra`` (all same-label old features as positives).
:func:`gather_batch` and :func:`n2o_infonce` are reused by :mod:`reid_lab.losses.compatible.ract`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)


def gather_batch(
    new_features: Tensor, old_features: Tensor, labels: Tensor, gather: bool = True
) -> tuple[Tensor, Tensor, Tensor, int]:
    """All-gather the batch over ranks so that negatives come from the global batch.

    New features are gathered *with* gradients (``torch.distributed.nn.functional.all_gather``: the backward
    pass sums every rank's gradient into the rank that owns the sample, so that the DDP-averaged gradient is
    the gradient of the global-batch mean loss); old features and labels are gathered without. In a single
    process (no initialised process group) or with ``gather=False`` nothing is gathered.

    Every rank must hold the same batch size (drop the last incomplete batch); a mismatch raises.

    Args:
        new_features: ``(B, d)`` local new features.
        old_features: ``(B, d)`` local old features.
        labels: ``(B,)`` local labels.
        gather: gather when a process group is initialised.

    Returns:
        ``(new_all (B_g, d), old_all (B_g, d), labels_all (B_g,), offset)`` where ``offset`` is the global index
        of local sample 0 (``rank · B``); ``B_g = world_size · B``.
    """
    if not (gather and dist.is_available() and dist.is_initialized()):
        return new_features, old_features, labels, 0
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size == 1:
        return new_features, old_features, labels, 0
    size = torch.tensor([new_features.shape[0]], device=new_features.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(
            f"gather_batch needs the same batch size on every rank, got {[int(s) for s in sizes]}; "
            "use drop_last=True in the training sampler"
        )
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    new_all = torch.cat(all_gather_with_grad(new_features.contiguous()), dim=0)
    old_list = [torch.empty_like(old_features) for _ in range(world_size)]
    dist.all_gather(old_list, old_features.contiguous())
    label_list = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(label_list, labels.contiguous())
    return new_all, torch.cat(old_list, dim=0), torch.cat(label_list, dim=0), rank * new_features.shape[0]


def hardest(similarities: Tensor, topk: int | None) -> Tensor:
    """Keep the ``topk`` largest entries of each row (all when None); ``-inf`` marks non-negatives.

    ``(B, N) -> (B, min(topk, N))``. Rows with fewer than ``topk`` negatives keep some ``-inf`` entries, which
    contribute ``e^{-inf} = 0`` to a softmax denominator, i.e. they are simply absent.
    """
    if topk is None or topk >= similarities.shape[1]:
        return similarities
    return torch.topk(similarities, topk, dim=1).values


def n2o_infonce(
    new_features: Tensor,
    old_features: Tensor,
    labels: Tensor,
    temperature: float,
    topk: int | None = None,
    with_n2n: bool = False,
    gather: bool = True,
    positives: Literal["paired", "same_label"] = "paired",
) -> tuple[Tensor, dict[str, Tensor]]:
    """InfoNCE of new features against old positives, with different-label samples as negatives.

    ``positives="paired"`` — RACT Eq. (3) (B. Zhang et al., ICLR 2022), per local anchor ``i``, on
    L2-normalised ``n, o``::

        L_i = −log [ e^{⟨n_i,o_i⟩/τ} / ( e^{⟨n_i,o_i⟩/τ} + Σ_{j∈N_i} e^{⟨n_i,o_j⟩/τ} [+ Σ_{j∈N_i} e^{⟨n_i,n_j⟩/τ}] ) ]

    ``positives="same_label"`` — openBCT ``--contra`` (``main.py``): every old feature of the (gathered) batch
    with the anchor's label, ``P_i = {j : y_j = y_i}`` (``o_i`` included), is a positive, each in its own
    softmax against the same negatives, averaged over ``P_i``::

        L_i = (1/|P_i|) Σ_{p∈P_i} −log [ e^{⟨n_i,o_p⟩/τ} / ( e^{⟨n_i,o_p⟩/τ} + Σ_{j∈N_i} e^{⟨n_i,o_j⟩/τ} [+ …] ) ]

    ``N_i`` = samples of the (gathered) batch with ``y_j != y_i``; the bracketed new-to-new sum is present when
    ``with_n2n``. With ``topk`` only the ``k`` most similar negatives of each kind are kept. ``L`` is the mean
    over local anchors. An anchor without negatives has ``L_i = 0``.

    Returns:
        ``(loss, diagnostics)``: the scalar loss and detached scalars ``pos_sim`` (mean ``⟨n_i,o_i⟩``),
        ``hardest_n2o_sim`` / ``hardest_n2n_sim`` (mean over anchors with negatives of the largest negative
        similarity) and ``n2o_violation_rate`` / ``n2n_violation_rate`` (share of those anchors whose
        hardest negative beats the positive — the RACT paper's cause of negative flips).
    """
    new_n = l2_normalize(new_features)
    old_n = l2_normalize(old_features.detach())
    new_all, old_all, labels_all, _ = gather_batch(new_n, old_n, labels, gather)
    negatives = labels.view(-1, 1) != labels_all.view(1, -1)  # (B, B_g)
    pos = (new_n * old_n).sum(dim=1, keepdim=True)  # (B, 1)
    n2o = (new_n @ old_all.t()).masked_fill(~negatives, float("-inf"))
    blocks = [pos, hardest(n2o, topk)]
    if with_n2n:
        n2n = (new_n @ new_all.t()).masked_fill(~negatives, float("-inf"))
        blocks.append(hardest(n2n, topk))
    if positives == "paired":
        logits = torch.cat(blocks, dim=1) / temperature
        loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    elif positives == "same_label":
        loss = _same_label_infonce(new_n @ old_all.t(), labels.view(-1, 1) == labels_all.view(1, -1),
                                   torch.cat(blocks[1:], dim=1), negatives.any(dim=1), temperature)
    else:
        raise ValueError(f"positives must be 'paired' or 'same_label', got {positives!r}")

    with torch.no_grad():
        has_neg = negatives.any(dim=1)
        diagnostics = {"pos_sim": pos.mean()}
        kinds = [("n2o", n2o)] + ([("n2n", n2n)] if with_n2n else [])
        for kind, sims in kinds:
            if bool(has_neg.any()):
                top = sims[has_neg].max(dim=1).values
                diagnostics[f"hardest_{kind}_sim"] = top.mean()
                diagnostics[f"{kind}_violation_rate"] = (top > pos[has_neg, 0]).float().mean()
            else:
                diagnostics[f"hardest_{kind}_sim"] = pos.new_zeros(())
                diagnostics[f"{kind}_violation_rate"] = pos.new_zeros(())
    return loss, diagnostics


def _same_label_infonce(
    pos_sims: Tensor, pos_mask: Tensor, neg_sims: Tensor, has_neg: Tensor, temperature: float
) -> Tensor:
    """Mean over anchors of the mean over positives ``p`` of ``log(e^{s_p/τ} + Σ_neg e^{s/τ}) − s_p/τ``.

    ``pos_sims``/``pos_mask`` ``(B, B_g)``; ``neg_sims`` ``(B, K)`` with ``-inf`` for absent negatives;
    ``has_neg`` ``(B,)``. Rows without negatives get ``log Σ_neg = -inf`` (loss 0) without NaN gradients.
    """
    safe = neg_sims.masked_fill(~has_neg.unsqueeze(1), 0.0) / temperature
    neg_lse = torch.logsumexp(safe, dim=1).masked_fill(~has_neg, float("-inf")).unsqueeze(1)  # (B, 1)
    pos = pos_sims / temperature
    per_positive = torch.logaddexp(pos, neg_lse.expand_as(pos)) - pos  # (B, B_g)
    mask = pos_mask.to(per_positive.dtype)
    return ((per_positive * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


class ContrastiveN2O(CompatibleLoss):
    """New-to-old InfoNCE: old positives, negatives the old features of different-label samples.

    ``positives="paired"`` (default): the RACT paper's ``contra`` ablation and OpenCompatible ``contra``
    (B. Zhang et al., ICLR 2022) = RACT Eq. (3) without the new-to-new negatives, the only positive being the
    old feature of the same image::

        L_i = −log [ e^{⟨n_i,o_i⟩/τ} / ( e^{⟨n_i,o_i⟩/τ} + Σ_{j∈N_i} e^{⟨n_i,o_j⟩/τ} ) ],   L = mean_i L_i

    ``positives="same_label"``: openBCT's ``--contra`` baseline (``main.py``, τ = 0.05, "following supervised
    contrastive learning"): every old feature of the batch with the anchor's label is a positive, each in its
    own softmax against the negatives, averaged over the positives (see :func:`n2o_infonce`).

    On L2-normalised features, ``N_i`` = samples with a different label (of the global batch when gathering).

    Args:
        weight: multiplier applied by the host.
        temperature: ``τ`` (openBCT ``--temp`` default 0.05).
        topk: keep only the ``k`` hardest negatives per anchor (None = all).
        gather: all-gather negatives across ranks when a process group is initialised.
        positives: ``"paired"`` (RACT / OpenCompatible) or ``"same_label"`` (openBCT).
    """

    name = "contrastive"

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.05,
        topk: int | None = None,
        gather: bool = True,
        positives: Literal["paired", "same_label"] = "paired",
    ) -> None:
        super().__init__(weight)
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be a positive int or None, got {topk}")
        if positives not in ("paired", "same_label"):
            raise ValueError(f"positives must be 'paired' or 'same_label', got {positives!r}")
        self.temperature = float(temperature)
        self.topk = topk
        self.gather = gather
        self.positives = positives

    with_n2n: bool = False  # RACT adds the new-to-new negatives

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        loss, diagnostics = n2o_infonce(
            inputs.new_features,
            inputs.old_features,
            inputs.labels,
            self.temperature,
            topk=self.topk,
            with_n2n=self.with_n2n,
            gather=self.gather,
            positives=self.positives,
        )
        parts = {f"{self.name}/loss": loss.detach()}
        parts.update({f"{self.name}/{key}": value for key, value in diagnostics.items()})
        return CompatibleLossOutput(loss, parts)
