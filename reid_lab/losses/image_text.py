"""Image–text losses of dual encoders: CLIP InfoNCE, VLM2Vec's one-directional InfoNCE, SigLIP, IRRA's similarity distribution matching, and
supervised contrastive (SupCon) across modalities.

Every loss is an ``nn.Module`` called as ``loss(image, text, pids, logit_scale)`` with ``image`` / ``text``
``(B, D)`` embeddings of matching pairs (row ``i`` of both is one image and one of its captions), ``pids``
``(B,)`` identities and the model's learnable ``logit_scale`` (log of the inverse temperature, as in
open_clip). It returns an *unweighted* scalar; the module multiplies it by ``loss.weight``. Embeddings are
L2-normalised here. Under DDP, the CLIP and SigLIP losses use open_clip's own cross-rank exchange
(:class:`open_clip.loss.ClipLoss` with ``gather_with_grad`` and ``local_loss``, :class:`SigLipLoss`); SDM and
SupCon gather every rank's pairs with gradients so their identity-aware targets see the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

__all__ = [
    "IMAGE_TEXT_LOSSES",
    "CLIPLoss",
    "ImageTextLoss",
    "InfoNCELoss",
    "SDMLoss",
    "SigLIPLoss",
    "SupConLoss",
    "build_image_text_loss",
    "pair_infonce",
]


def _unit(x: Tensor) -> Tensor:
    """L2-normalised rows, in at least float32 (half-precision logits lose the softmax's tail)."""
    return F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=-1)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ImageTextLoss(nn.Module):
    """Base class: ``weight`` and a short ``name`` for logging."""

    name = "image_text"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class CLIPLoss(ImageTextLoss):
    """Symmetric InfoNCE of CLIP (Radford et al. ICML'21): ``(CE(s·I Tᵀ, diag) + CE(s·T Iᵀ, diag)) / 2``,
    ``s = exp(logit_scale)``, the pairs of the batch as the only positives (open_clip's ``ClipLoss``)."""

    name = "clip"

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:
        rank, world = _rank_world()
        loss = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, rank=rank, world_size=world)
        return loss(_unit(image), _unit(text), logit_scale.exp())


class SigLIPLoss(ImageTextLoss):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. ICCV'23), open_clip's ``SigLipLoss``.

    ``L = -(1/B) Σ_ij log σ(z_ij (t·<i_i, t_j> + b))``, ``z_ij = 1`` for the batch's pairs and -1 otherwise.
    The scale ``t`` and bias ``b`` are this loss's own learnable parameters, initialised as in the paper
    (``t = 10``, ``b = -10``); the model's ``logit_scale`` is not used.
    """

    name = "siglip"

    def __init__(self, weight: float = 1.0, init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__(weight)
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:
        rank, world = _rank_world()
        loss = SigLipLoss(rank=rank, world_size=world)
        return loss(_unit(image), _unit(text), self.log_scale.exp(),
                    self.bias)


class InfoNCELoss(ImageTextLoss):
    """One-directional InfoNCE of VLM2Vec (Jiang et al. ICLR'25): query → target with in-batch negatives.

    With queries ``Q`` and targets ``T`` ``(B, D)`` L2-normalised and ``s = exp(logit_scale)`` (VLM2Vec fixes the
    temperature at ``1 / s = 0.02``), ``L = (1/B) Σ_i -log( exp(s q_i·t_i) / Σ_j exp(s q_i·t_j) )``: the other
    targets of the batch (of every rank under DDP, gathered with gradients) are the negatives. Caption queries
    search image targets (``direction: text2image``, the text-to-person task); ``image2text`` reverses the
    roles and ``both`` averages the two (then equal to :class:`CLIPLoss`). Identity is ignored, as in VLM2Vec:
    another image of the same person in the batch counts as a negative (use ``supcon`` or ``sdm`` to treat it
    as a positive).
    """

    name = "infonce"
    DIRECTIONS = ("text2image", "image2text", "both")

    def __init__(self, weight: float = 1.0, direction: str = "text2image") -> None:
        super().__init__(weight)
        if direction not in self.DIRECTIONS:
            raise ValueError(f"infonce direction must be one of {self.DIRECTIONS}, got {direction!r}")
        self.direction = direction

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:
        rank, world = _rank_world()
        image, text = _unit(image), _unit(text)
        all_image, all_text, _ = _gather_with_grad(image, text, pids)
        offset = rank * image.shape[0]  # this rank's pairs sit at rows offset.. of the gathered batch
        targets = torch.arange(image.shape[0], device=image.device) + offset
        scale = logit_scale.exp()
        losses = []
        if self.direction in ("text2image", "both"):
            losses.append(F.cross_entropy(scale * text @ all_image.T, targets))
        if self.direction in ("image2text", "both"):
            losses.append(F.cross_entropy(scale * image @ all_text.T, targets))
        return sum(losses) / len(losses)


def pair_infonce(query: Tensor, target: Tensor, negatives: Tensor | None, logit_scale: Tensor) -> Tensor:
    """VLM2Vec's InfoNCE on instruction pairs with hard negatives, across ranks.

    ``query`` / ``target`` ``(B, D)``, ``negatives`` ``(B * K, D)`` or None, L2-normalised here; the candidates of
    every query are all targets and all hard negatives of the *global* batch (in-batch plus hard negatives, as
    VLM2Vec), the positive is its own target: ``L = mean_i CE(s · q_i Cᵀ, i)``, ``s = exp(logit_scale)``.

    Under DDP the targets and negatives of every rank are gathered *with* gradients (VLM2Vec gathers its
    representations across ranks, without gradients but with the local part re-inserted and the loss scaled by
    the world size; the gradients are the same) and each rank's loss is the mean over its own queries, so DDP's
    average of the ranks' gradients is the gradient of the full batch's loss. Ranks may hold different numbers
    of pairs or negatives (a short last batch); a rank without negatives gathers none.
    """
    q, t = _unit(query), _unit(target)
    n = _unit(negatives) if negatives is not None and negatives.numel() else t[:0]
    rank, world = _rank_world()
    offset = 0
    if world > 1:
        sizes = _gathered_sizes([t.shape[0], n.shape[0]], t.device)
        offset = int(sum(size[0] for size in sizes[:rank]))
        t = _gather_rows_with_grad(t, [size[0] for size in sizes])
        n = _gather_rows_with_grad(n, [size[1] for size in sizes]) if any(size[1] for size in sizes) else n
    candidates = torch.cat([t, n]) if n.shape[0] else t
    logits = logit_scale.exp() * q @ candidates.T
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device) + offset)


class SDMLoss(ImageTextLoss):
    """Similarity distribution matching of IRRA (Jiang & Ye, CVPR'23), identity-aware.

    With ``S = scale · Î Tᵀ`` (cosine similarities of the normalised embeddings) and the target
    distribution ``q_ij = [pid_i = pid_j] / #{k: pid_k = pid_i}`` (every caption of the same person is a
    positive), ``L = mean_i KL(softmax(S_i) ‖ q_i) + mean_i KL(softmax(Sᵀ_i) ‖ q_i)``, with ``ε = 1e-8`` inside
    the log of ``q`` as in IRRA's ``compute_sdm``. IRRA fixes ``scale = 1 / 0.02``; ``scale=None`` uses the
    model's learnable ``exp(logit_scale)`` instead.
    """

    name = "sdm"

    def __init__(self, weight: float = 1.0, scale: float | None = 50.0, epsilon: float = 1e-8) -> None:
        super().__init__(weight)
        self.scale = scale
        self.epsilon = float(epsilon)

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:
        image, text, pids = _gather_with_grad(_unit(image), _unit(text), pids)
        scale = logit_scale.exp() if self.scale is None else self.scale
        same = (pids.unsqueeze(0) == pids.unsqueeze(1)).float()
        target = same / same.sum(dim=1, keepdim=True)
        log_target = torch.log(target + self.epsilon)
        i2t = scale * image @ text.T
        losses = []
        for logits in (i2t, i2t.T):
            log_p = F.log_softmax(logits, dim=1)
            losses.append((log_p.exp() * (log_p - log_target)).sum(dim=1).mean())
        return losses[0] + losses[1]


class SupConLoss(ImageTextLoss):
    """Supervised contrastive loss (Khosla et al., "Supervised Contrastive Learning", NeurIPS'20), cross-modal
    and identity-aware, as CLIP-ReID's ``SupConLoss`` (Li et al. AAAI'23) applies it between images and texts.

    With ``image`` / ``text`` ``(B, D)`` L2-normalised, ``S = s · Î Tᵀ`` ``(B, B)``, ``s = exp(logit_scale)``,
    and the positives of anchor ``a`` ``P(a) = {b: pid_b = pid_a}`` (every caption of the same person is a
    positive of an image, every image of the same person a positive of a caption)::

        L_i2t = (1/B) Σ_a  -(1/|P(a)|) Σ_{b ∈ P(a)} log( exp(S_ab)  / Σ_k exp(S_ak) )
        L_t2i = the same on Sᵀ (caption anchors against the images)
        L     = (L_i2t + L_t2i) / 2

    Each anchor's own pair is in ``P(a)``, so ``|P(a)| >= 1``. With all identities distinct ``P(a) = {a}`` and
    ``L`` is CLIP's symmetric InfoNCE (:class:`CLIPLoss`). CLIP-ReID sums the two directions (``weight=2``
    reproduces it) at a fixed temperature; here the temperature is the model's learnable ``logit_scale``, as
    in the other losses. Under DDP the pairs of every rank are gathered with gradients (as :class:`SDMLoss`),
    so positives and negatives span the global batch.
    """

    name = "supcon"

    def forward(self, image: Tensor, text: Tensor, pids: Tensor, logit_scale: Tensor) -> Tensor:
        image, text, pids = _gather_with_grad(_unit(image), _unit(text), pids)
        positive = (pids.unsqueeze(0) == pids.unsqueeze(1)).to(image.dtype)  # symmetric: serves both directions
        num_positive = positive.sum(dim=1)
        i2t = logit_scale.exp() * image @ text.T
        total = image.new_zeros(())
        for logits in (i2t, i2t.T):
            log_prob = F.log_softmax(logits, dim=1)
            total = total - ((positive * log_prob).sum(dim=1) / num_positive).mean()
        return total / 2


def _gather_with_grad(image: Tensor, text: Tensor, pids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rank, world = _rank_world()
    if world == 1:
        return image, text, pids
    from torch.distributed.nn.functional import all_gather  # with gradients, unlike dist.all_gather

    gathered_pids = [torch.empty_like(pids) for _ in range(world)]
    dist.all_gather(gathered_pids, pids.contiguous())
    return torch.cat(all_gather(image)), torch.cat(all_gather(text)), torch.cat(gathered_pids)


def _gathered_sizes(sizes: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``sizes`` (one small all-gather): ``[[sizes of rank 0], [sizes of rank 1], ...]``."""
    local = torch.tensor(sizes, dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [o.tolist() for o in out]


def _gather_rows_with_grad(x: Tensor, sizes: list[int]) -> Tensor:
    """``(n_r, D)`` rows of every rank ``r`` concatenated in rank order, with gradients back to each rank.

    ``sizes``: every rank's ``n_r``. Rows are padded to the largest ``n_r`` for the collective (which needs one
    shape) and the padding is dropped after it.
    """
    from torch.distributed.nn.functional import all_gather  # with gradients, unlike dist.all_gather

    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    parts = all_gather(padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


IMAGE_TEXT_LOSSES: dict[str, type[ImageTextLoss]] = {
    "clip": CLIPLoss,
    "infonce": InfoNCELoss,
    "siglip": SigLIPLoss,
    "sdm": SDMLoss,
    "supcon": SupConLoss,
}


def build_image_text_loss(name: str, **options) -> ImageTextLoss:
    """Instantiate the image–text loss ``name`` (``clip``, ``infonce``, ``siglip``, ``sdm``, ``supcon``); errors list the names."""
    cls = IMAGE_TEXT_LOSSES.get(name)
    if cls is None:
        raise ValueError(f"unknown image-text loss {name!r}; available: {', '.join(sorted(IMAGE_TEXT_LOSSES))}")
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"image-text loss {name!r} ({cls.__name__}): {err}") from err
