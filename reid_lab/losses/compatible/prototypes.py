"""Dataset-level class prototypes in the old embedding space (LCE centres/boundaries, UniBCT refinement).

Pure functions. The host runs the frozen old model (and, for refinement, the current new model) over the
*new* training set and calls these with the stacked features; the results feed
:attr:`CompatibleInputs.prototypes` and ``extras["boundaries"]``.

One scale convention: prototypes are **unit-norm** rows, before (:func:`class_centres`) and after
(:func:`refine_prototypes`) refinement, so a plugin that reads ``prototypes`` sees the same scale whichever
the host last computed, and the logit scale is the plugin's explicit ``scale``. Refinement with the identity
graph (``alpha = 0``) returns :func:`class_centres` exactly.

References:
    - LCE: Meng et al., "Learning Compatible Embeddings", ICCV 2021 (arXiv 2108.01958);
      the class centre / boundary definitions follow the released code (IrvingMeng/LCE, ``save_lcefeat``).
    - UniBCT: Zhang et al., "Towards Universal Backward-Compatible Representation Learning", IJCAI 2022
      (arXiv 2203.01583), Eq. 9-10 (structural prototype refinement).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from reid_lab.losses.compatible.base import l2_normalize

__all__ = ["class_boundaries", "class_centres", "refine_prototypes"]


def _work_dtype(x: Tensor) -> torch.dtype:
    """At least float32, so half-precision features do not lose the means or the matrix inverse."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_labels(features: Tensor, labels: Tensor, num_classes: int, what: str) -> Tensor:
    """Validate ``labels`` against ``features`` and return the per-class counts ``(num_classes,)``."""
    if features.dim() != 2:
        raise ValueError(f"{what} must be (N, d), got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {features.shape[0]} (rows of {what}), got shape {tuple(labels.shape)}"
        )
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = empty[:20]
        more = f" (and {len(empty) - 20} more)" if len(empty) > 20 else ""
        raise ValueError(
            f"no sample for class id(s) {shown}{more} out of {num_classes}: a prototype needs at least one "
            f"feature per class; pass the features of the whole new training set"
        )
    return counts


@torch.no_grad()
def class_centres(old_features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """LCE class centres of the old embeddings on the new training set.

    ``c_k = normalise( (1/n_k) * sum_{i: y_i = k} normalise(phi_o(x_i)) )`` (LCE, released code ``save_lcefeat``).

    Args:
        old_features: ``(N, d)`` old-model embeddings of the new training images (any norm).
        labels: ``(N,)`` int class labels in ``[0, num_classes)``.
        num_classes: ``C``, number of rows of the result.

    Returns:
        ``(C, d)`` unit-norm class centres (dtype at least float32); the same convention as
        :func:`refine_prototypes`.

    Raises:
        ValueError: if some class has no sample (the message names the class ids).

    Example:
        >>> f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
        >>> class_centres(f, torch.tensor([0, 0, 1]), 2)
        tensor([[0.7071, 0.7071],
                [1.0000, 0.0000]])
    """
    counts = _check_labels(old_features, labels, num_classes, "old_features")
    feats = l2_normalize(old_features.to(_work_dtype(old_features)))
    sums = feats.new_zeros(num_classes, feats.shape[1]).index_add_(0, labels.long(), feats)
    return l2_normalize(sums / counts.unsqueeze(1).to(feats.dtype))


@torch.no_grad()
def class_boundaries(old_features: Tensor, labels: Tensor, centres: Tensor) -> Tensor:
    """LCE class boundaries: the cosine of the loosest old sample to its class centre.

    ``cos theta_k = min_{i: y_i = k} cos(phi_o(x_i), c_k)`` (LCE; the boundary term asks every new
    feature to be at least this close to its old centre).

    Args:
        old_features: ``(N, d)`` old-model embeddings of the new training images (any norm).
        labels: ``(N,)`` int class labels in ``[0, C)``.
        centres: ``(C, d)`` class centres, e.g. from :func:`class_centres` (re-normalised here).

    Returns:
        ``(C,)`` boundary cosines in ``[-1, 1]``.

    Raises:
        ValueError: if some class has no sample (the message names the class ids).
    """
    num_classes = centres.shape[0]
    _check_labels(old_features, labels, num_classes, "old_features")
    dtype = _work_dtype(old_features)
    feats = l2_normalize(old_features.to(dtype))
    cents = l2_normalize(centres.to(device=feats.device, dtype=dtype))
    labels = labels.long().to(feats.device)
    cos = (feats * cents[labels]).sum(dim=1)
    out = cos.new_full((num_classes,), float("inf"))
    return out.scatter_reduce(0, labels, cos, reduce="amin", include_self=True)


@torch.no_grad()
def refine_prototypes(
    old_features: Tensor,
    new_features: Tensor,
    labels: Tensor,
    num_classes: int,
    alpha: float = 0.9,
    tau: float = 0.05,
) -> Tensor:
    """UniBCT structural prototype refinement (Zhang et al., IJCAI 2022, Eq. 9-10), as unit-norm prototypes.

    For every class ``c`` with ``n_c`` images, with ``F_o`` ``(n_c, d_old)`` the L2-normalised old features and
    ``F_n`` ``(n_c, d_new)`` the L2-normalised features of the current new model for those images:

    1. ``A = softmax_row(F_n F_n^T / tau)`` with the diagonal set to ``-inf`` (no self-loops), so that each
       row ``i`` is a distribution over the other images ``j`` of the class;
    2. ``F~_o = (1 - alpha) (I - alpha A)^{-1} F_o`` (personalised-PageRank closed form, Eq. 9);
    3. ``p_c = normalise(mean of the rows of F~_o)`` (Eq. 10, then L2-normalised).

    Scale convention: the result has unit rows like :func:`class_centres`
    (``normalise(mean(normalise(φ_o)))``), and ``alpha = 0`` (identity graph) returns :func:`class_centres`
    exactly, so refining never changes the scale the loss sees, only the direction of each prototype.

    Deviations from the public re-implementation (yuleung/MixBCT ``refine_prototype.py``):

    - MixBCT propagates the *raw* old features and keeps the raw mean, whereas its unrefined prototypes
      (``tools/get_feature/get_avg_feature.py``) are L2-normalised means: the prototypes' norm jumps from 1
      to the old model's feature norm at the first refresh. Here ``F_o`` rows are normalised first (as in
      :func:`class_centres`) and the prototype is re-normalised, so the scale stays 1 and the logit scale
      is the plugin's explicit ``scale`` (:class:`~reid_lab.losses.compatible.unibct.UniBCTLoss`).
    - ``F_n`` rows are L2-normalised before the similarity, so ``tau`` acts on cosines whatever the new
      model's feature norm.
    - MixBCT normalises ``A`` over dim 0 (each *column* sums to one). Then ``1^T A = 1^T`` and
      ``1^T (1 - alpha)(I - alpha A)^{-1} = 1^T``, so the mean of the rows of ``F~_o`` equals the plain mean of
      ``F_o`` exactly: the refinement is a no-op for the prototype. Here each *row* sums to one, so every row of
      ``F~_o`` is a convex combination of old features and the mean weights each image by how much the other
      images of its class propagate to it: images the new model finds central count more, outliers less.

    Edge cases: a class with one image keeps its (normalised) feature (``n_c = 1``: no neighbour, no
    refinement); ``alpha = 0`` gives :func:`class_centres`.

    Args:
        old_features: ``(N, d_old)`` frozen old-model features of the new training set (any norm).
        new_features: ``(N, d_new)`` current new-model features of the same images, same order.
        labels: ``(N,)`` int class labels in ``[0, num_classes)``.
        num_classes: ``C``.
        alpha: propagation coefficient in ``[0, 1)``; 0.9 in MixBCT.
        tau: similarity temperature (> 0); 0.05 in MixBCT.

    Returns:
        ``(C, d_old)`` unit-norm refined prototypes (dtype at least float32, on ``old_features``' device).

    Raises:
        ValueError: on shape mismatches, ``alpha`` outside ``[0, 1)``, ``tau <= 0``, or a class without sample
            (the message names the class ids).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1) (I - alpha A must be invertible), got {alpha}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    counts = _check_labels(old_features, labels, num_classes, "old_features")
    if new_features.dim() != 2 or new_features.shape[0] != old_features.shape[0]:
        raise ValueError(
            f"new_features must be (N, d_new) with N = {old_features.shape[0]}, got {tuple(new_features.shape)}"
        )
    dtype = _work_dtype(old_features)
    device = old_features.device
    f_old = l2_normalize(old_features.to(dtype))
    f_new = l2_normalize(new_features.to(device=device, dtype=dtype))
    labels = labels.long().to(device)

    order = torch.argsort(labels, stable=True)
    per_class = torch.split(order, counts.tolist())
    by_size: dict[int, list[int]] = defaultdict(list)
    for c, idx in enumerate(per_class):
        by_size[idx.numel()].append(c)

    protos = f_old.new_empty(num_classes, f_old.shape[1])
    # Classes of equal size are solved as one batch: (k, n, n) systems instead of a Python loop over classes.
    for n, classes in by_size.items():
        idx = torch.stack([per_class[c] for c in classes])  # (k, n)
        fo = f_old[idx]  # (k, n, d_old)
        if n == 1:
            protos[classes] = fo[:, 0]
            continue
        fn = f_new[idx]  # (k, n, d_new)
        edges = fn @ fn.transpose(1, 2) / tau
        eye = torch.eye(n, dtype=torch.bool, device=device)
        edges = edges.masked_fill(eye, float("-inf"))
        adj = torch.softmax(edges, dim=2)
        system = torch.eye(n, dtype=dtype, device=device) - alpha * adj
        refined = (1.0 - alpha) * torch.linalg.solve(system, fo)
        protos[classes] = refined.mean(dim=1)
    return l2_normalize(protos)
