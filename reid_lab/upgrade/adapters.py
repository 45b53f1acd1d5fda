"""Feature-space adapters for model upgrades: dimension adapters and forward-compatible transformations.

- :class:`DimensionAdapter` maps the new model's features to the old space's dimension before a
  backward-compatible loss (openBCT's truncation / zero-padding, or a learnable projection).
- :class:`FCTTransformation` is the forward-compatible transformation ``h(phi_old(x), s(x)) -> new space`` of
  FCT (Ramanujan et al., "Forward Compatible Training for Large-Scale Embedding Retrieval Systems",
  CVPR 2022, arXiv 2112.02805), optionally with FastFill's uncertainty head (Jaeckle et al., "FastFill:
  Efficient Compatible Model Update", ICLR 2023, arXiv 2303.04766).
- :func:`fct_loss`, :func:`fastfill_loss`, :func:`train_transformation` train it on precomputed features
  after ``phi_new`` is trained. FastFill's sigma-ordered backfilling policy (the uncertainty head's
  ``log sigma^2``, largest first) is :func:`reid_lab.metrics.backfill.order_by_sigma`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DimensionAdapter",
    "FCTTransformation",
    "fastfill_loss",
    "fct_loss",
    "train_transformation",
]


class DimensionAdapter(nn.Module):
    """Map new features ``(B, in_dim)`` to the old space's dimension ``(B, out_dim)``.

    Kinds (all are the identity when ``in_dim == out_dim``):

    - ``"truncate"``: the first ``out_dim`` coordinates (openBCT ``models/resnet.py``; needs
      ``in_dim >= out_dim``);
    - ``"pad"``: zero-pad to ``out_dim`` (openBCT, when the new model is smaller; needs ``in_dim <= out_dim``);
    - ``"linear"``: a learnable bias-free projection ``W (out_dim, in_dim)``, initialised to the rectangular
      identity so that training starts from truncation / padding.

    Args:
        in_dim: ``d_new``.
        out_dim: ``d_old``.
        kind: ``"linear"``, ``"truncate"`` or ``"pad"``.

    Example:
        >>> DimensionAdapter(3, 2, "truncate")(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[1., 2.]])
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: Literal["linear", "truncate", "pad"] = "linear"
    ) -> None:
        super().__init__()
        if kind not in ("linear", "truncate", "pad"):
            raise ValueError(f"kind must be 'linear', 'truncate' or 'pad', got {kind!r}")
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        if kind == "truncate" and in_dim < out_dim:
            raise ValueError(
                f"'truncate' needs in_dim >= out_dim, got {in_dim} < {out_dim}; use 'pad' or 'linear'"
            )
        if kind == "pad" and in_dim > out_dim:
            raise ValueError(
                f"'pad' needs in_dim <= out_dim, got {in_dim} > {out_dim}; use 'truncate' or 'linear'"
            )
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind
        self.proj: nn.Linear | None = None
        if kind == "linear" and in_dim != out_dim:
            self.proj = nn.Linear(in_dim, out_dim, bias=False)
            nn.init.eye_(self.proj.weight)

    @property
    def is_identity(self) -> bool:
        """True when the adapter returns its input unchanged."""
        return self.in_dim == self.out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, out_dim)``."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected features with last dim {self.in_dim}, got {tuple(x.shape)}")
        if self.is_identity:
            return x
        if self.proj is not None:
            return self.proj(x)
        if self.kind == "truncate":
            return x[..., : self.out_dim]
        return F.pad(x, (0, self.out_dim - self.in_dim))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, kind={self.kind!r}"


def _block(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear (no bias, BN follows) -> BatchNorm1d -> ReLU."""
    return nn.Sequential(
        nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True)
    )


class FCTTransformation(nn.Module):
    """FCT transformation ``h(phi_old(x), s(x))`` from the old embedding (+ side-info) to the new space.

    In the spirit of ml-fct's ``MLP_BN_SIDE_PROJECTION`` (FCT, Ramanujan et al., CVPR 2022):

    - old branch: ``d_old -> 2*d_old -> 2*d_new`` (Linear/BN/ReLU twice);
    - side-info branch (when ``side_info_dim > 0``): ``d_s -> 2*d_s -> 2*d_new`` (same blocks);
    - mixer on the concatenation: ``(2 or 4)*d_new -> hidden -> hidden`` (Linear/BN/ReLU) ``-> d_new`` (Linear).

    ml-fct writes the layers as 1x1 convolutions on ``(B, d, 1, 1)``; linear layers are equivalent here.
    With ``uncertainty=True`` (FastFill, Jaeckle et al., ICLR 2023) a linear head on the last hidden
    layer also predicts ``s = log sigma^2`` per sample, and :meth:`forward` returns ``(features, log_var)``.

    Args:
        old_dim: ``d_old``.
        new_dim: ``d_new``.
        side_info_dim: ``d_s``; 0 = no side-information branch.
        hidden_dim: mixer width (2048 in FCT).
        uncertainty: add the FastFill ``log sigma^2`` head.

    Example:
        >>> h = FCTTransformation(4, 3, side_info_dim=2, hidden_dim=8, uncertainty=True).eval()
        >>> feats, log_var = h(torch.randn(5, 4), torch.randn(5, 2))
        >>> tuple(feats.shape), tuple(log_var.shape)
        ((5, 3), (5,))
    """

    def __init__(
        self,
        old_dim: int,
        new_dim: int,
        side_info_dim: int = 0,
        hidden_dim: int = 2048,
        uncertainty: bool = False,
    ) -> None:
        super().__init__()
        if min(old_dim, new_dim, hidden_dim) <= 0 or side_info_dim < 0:
            raise ValueError(
                f"dims must be positive (side_info_dim >= 0), got old_dim={old_dim}, new_dim={new_dim}, "
                f"side_info_dim={side_info_dim}, hidden_dim={hidden_dim}"
            )
        self.old_dim, self.new_dim, self.side_info_dim = old_dim, new_dim, side_info_dim
        self.hidden_dim, self.uncertainty = hidden_dim, uncertainty
        self.old_branch = nn.Sequential(_block(old_dim, 2 * old_dim), _block(2 * old_dim, 2 * new_dim))
        self.side_branch = (
            nn.Sequential(_block(side_info_dim, 2 * side_info_dim), _block(2 * side_info_dim, 2 * new_dim))
            if side_info_dim > 0
            else None
        )
        mixed = 2 * new_dim * (2 if side_info_dim > 0 else 1)
        self.mixer = nn.Sequential(_block(mixed, hidden_dim), _block(hidden_dim, hidden_dim))
        self.head = nn.Linear(hidden_dim, new_dim)
        self.log_var_head = nn.Linear(hidden_dim, 1) if uncertainty else None

    def forward(
        self, old_features: Tensor, side_info: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Transform old features into the new space.

        Args:
            old_features: ``(B, d_old)`` stored old embeddings.
            side_info: ``(B, d_s)`` side-information, required iff ``side_info_dim > 0``.

        Returns:
            ``(B, d_new)`` transformed features, or ``((B, d_new), (B,))`` with ``log sigma^2`` when
            ``uncertainty``.
        """
        if old_features.dim() != 2 or old_features.shape[1] != self.old_dim:
            raise ValueError(f"old_features must be (B, {self.old_dim}), got {tuple(old_features.shape)}")
        parts = [self.old_branch(old_features)]
        if self.side_branch is not None:
            if side_info is None:
                raise ValueError(
                    f"this transformation was built with side_info_dim={self.side_info_dim}; pass side_info"
                )
            if side_info.shape != (old_features.shape[0], self.side_info_dim):
                raise ValueError(
                    f"side_info must be ({old_features.shape[0]}, {self.side_info_dim}), got {tuple(side_info.shape)}"
                )
            parts.append(self.side_branch(side_info))
        elif side_info is not None:
            raise ValueError("side_info given, but this transformation was built with side_info_dim=0")
        hidden = self.mixer(torch.cat(parts, dim=1))
        out = self.head(hidden)
        if self.log_var_head is None:
            return out
        return out, self.log_var_head(hidden).squeeze(1)


def fct_loss(pred: Tensor, target: Tensor) -> Tensor:
    """FCT transformation loss ``mean_i ||h_i - phi_n(x_i)||^2`` (Ramanujan et al., CVPR 2022).

    Squared L2 norm summed over the ``d`` dimensions, averaged over the batch (not ``F.mse_loss``, which
    also divides by ``d``).

    Args:
        pred: ``(B, d)`` transformed old features ``h``.
        target: ``(B, d)`` new features ``phi_n(x)``.

    Returns:
        scalar.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return (pred - target).pow(2).sum(dim=1).mean()


def _apply_classifier(new_classifier: Tensor | Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
    if isinstance(new_classifier, Tensor):
        return h @ new_classifier.to(h.dtype).t()
    return new_classifier(h)


def fastfill_loss(
    pred: Tensor,
    log_var: Tensor,
    target: Tensor,
    labels: Tensor | None = None,
    new_classifier: Tensor | Callable[[Tensor], Tensor] | None = None,
    mu_sim: float = 1.0,
    mu_disc: float = 1.0,
    mu_u: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FastFill uncertainty-aware transformation loss (Jaeckle et al., ICLR 2023).

    ``L = mean_i [ 1/2 * exp(-s_i) * (mu_sim * ||h_i - phi_n(x_i)||^2 / d + mu_disc * CE_ls(W_n h_i, y_i))
    + mu_u * s_i ]``

    with ``s_i = log sigma_i^2`` and ``W_n`` the frozen new classifier (the discriminative term is used only
    when both ``labels`` and ``new_classifier`` are given). Coefficients as read from ml-fct (2023):
    ``mu_sim = mu_disc = 1``, ``mu_u = 0.5``, label smoothing 0.1 [reference dossier, from a third-party port].

    Args:
        pred: ``(B, d)`` transformed features ``h``.
        log_var: ``(B,)`` predicted ``s = log sigma^2``.
        target: ``(B, d)`` new features ``phi_n(x)``.
        labels: ``(B,)`` int labels in the new classifier's label space.
        new_classifier: frozen new classifier, a ``(C, d)`` weight (logits ``h W^T``) or a callable
            ``(B, d) -> (B, C)``; its parameters are not updated by :func:`train_transformation`.
        mu_sim: weight of the similarity term.
        mu_disc: weight of the discriminative term.
        mu_u: weight of the uncertainty regulariser.
        label_smoothing: label smoothing of ``CE_ls``.

    Returns:
        ``(loss, parts)``: scalar loss and detached parts ``fastfill/sim``, ``fastfill/disc`` (if used),
        ``fastfill/log_var`` (batch means of the per-sample terms before the ``exp(-s)`` weighting).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if log_var.shape != (pred.shape[0],):
        raise ValueError(f"log_var must be ({pred.shape[0]},), got {tuple(log_var.shape)}")
    sim = (pred - target).pow(2).mean(dim=1)  # ||h - phi_n||^2 / d
    per_sample = mu_sim * sim
    parts = {"fastfill/sim": sim.mean().detach()}
    if labels is not None and new_classifier is not None:
        logits = _apply_classifier(new_classifier, pred)
        disc = F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)
        per_sample = per_sample + mu_disc * disc
        parts["fastfill/disc"] = disc.mean().detach()
    loss = (0.5 * torch.exp(-log_var) * per_sample + mu_u * log_var).mean()
    parts["fastfill/log_var"] = log_var.mean().detach()
    return loss, parts


def train_transformation(
    model: FCTTransformation,
    old_features: Tensor,
    new_features: Tensor,
    side_info: Tensor | None = None,
    labels: Tensor | None = None,
    new_classifier: Tensor | Callable[[Tensor], Tensor] | None = None,
    epochs: int = 80,
    lr: float = 5e-4,
    batch_size: int = 256,
    weight_decay: float = 3.05e-5,
    seed: int = 0,
    warmup_epochs: int = 0,
    bn_eval_fraction: float = 0.5,
) -> FCTTransformation:
    """Train an FCT / FastFill transformation on precomputed features (FCT recipe, compact).

    Adam (``lr = 5e-4``, ``weight_decay = 3.05e-5``) with a per-step cosine schedule after an optional linear
    warm-up (FCT: 5 warm-up epochs, 80 epochs, batch 1024); BatchNorm layers are switched to eval mode for the
    last ``bn_eval_fraction`` of the epochs (FCT freezes BN for the second half). Uses :func:`fastfill_loss`
    when ``model.uncertainty`` else :func:`fct_loss`. Batches are shuffled with a generator seeded by ``seed``;
    a trailing batch of one sample is dropped (BatchNorm needs two). The data stay on their device; the model
    is moved there.

    Args:
        model: the transformation to train (in place).
        old_features: ``(N, d_old)`` old embeddings of the new training set.
        new_features: ``(N, d_new)`` trained new model's embeddings of the same images (targets).
        side_info: ``(N, d_s)`` side-information, iff the model has a side branch.
        labels: ``(N,)`` labels for FastFill's discriminative term.
        new_classifier: frozen new classifier for FastFill's discriminative term (see :func:`fastfill_loss`).
        epochs: number of passes over the data.
        lr: peak learning rate.
        batch_size: mini-batch size.
        weight_decay: Adam weight decay.
        seed: shuffling seed.
        warmup_epochs: linear warm-up epochs.
        bn_eval_fraction: share of the final epochs with BatchNorm in eval mode (0 disables).

    Returns:
        ``model``, trained, in eval mode.
    """
    n = old_features.shape[0]
    if new_features.shape[0] != n or (side_info is not None and side_info.shape[0] != n):
        raise ValueError("old_features, new_features (and side_info) must have the same number of rows")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    if epochs <= 0 or batch_size <= 0:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    device = old_features.device
    model.to(device)
    old_features = old_features.detach()
    new_features = new_features.detach().to(device)
    side_info = side_info.detach().to(device) if side_info is not None else None
    labels = labels.to(device) if labels is not None else None
    if isinstance(new_classifier, Tensor):
        new_classifier = new_classifier.detach().to(device)

    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    bn_eval_from = epochs - int(round(bn_eval_fraction * epochs)) if bn_eval_fraction > 0 else epochs

    for epoch in range(epochs):
        model.train()
        if epoch >= bn_eval_from:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < 2 and n >= 2:
                continue
            side = side_info[idx] if side_info is not None else None
            out = model(old_features[idx], side)
            if model.uncertainty:
                pred, log_var = out
                batch_labels = labels[idx] if labels is not None else None
                loss, _ = fastfill_loss(pred, log_var, new_features[idx], batch_labels, new_classifier)
            else:
                loss = fct_loss(out, new_features[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()
