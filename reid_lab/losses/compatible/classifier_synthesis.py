"""Old-space classifier rows for classes the old model never saw (BCT §3.2), as pure functions.

The BCT influence loss (Shen et al., CVPR 2020, arXiv 2003.11942) sends new features through the frozen old
classifier ``W_o``. When the new training set has classes that ``W_o`` has no row for, BCT §3.2 synthesises
one per new class from the *old* model: ``w_k = mean_{x ∈ class k} φ_o(x)``, concatenated to the trained
``W_o``. The openBCT author confirmed (issue #1) that only the new-class rows are synthesised; the openBCT
script averaging every class is a deviation that this module does not reproduce.

The host calls :func:`class_means` on old features of the new training set (also the ``prototypes`` of
:class:`~reid_lab.losses.compatible.base.CompatibleInputs`) and :func:`synthesize_old_classifier` to build
``inputs.old_classifier``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reid_lab.losses.compatible.base import l2_normalize


def class_means(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    normalize: bool = True,
    allow_missing: bool = False,
) -> Tensor:
    """Per-class mean of (L2-normalised) features: ``P_k = (1/|S_k|) Σ_{i∈S_k} f_i / ‖f_i‖``.

    BCT §3.2 (Shen et al., CVPR 2020) averages the raw old embeddings ``φ_o(x)``; with ``normalize=True``
    (default) each feature is L2-normalised first, which is the deviation we choose because retrieval and
    the cosine-logit losses compare directions, and a few large-norm images should not dominate a class mean.
    The mean itself is *not* re-normalised (its norm < 1 measures how tight the class is); callers that need
    unit rows normalise them.

    Args:
        features: ``(N, d)`` features, e.g. old-model embeddings of the new training set.
        labels: ``(N,)`` int64 labels in ``[0, num_classes)``.
        num_classes: number of rows ``C`` of the result.
        normalize: L2-normalise each feature before averaging.
        allow_missing: what to do with a class that has no sample. ``False`` (default): raise a
            ``ValueError`` naming the classes. ``True``: leave its row all zeros (never NaN); the mask of
            present classes is ``torch.bincount(labels, minlength=num_classes) > 0``, and
            :class:`~reid_lab.losses.compatible.bct.BCTPrototypeLoss` treats all-zero rows as absent.

    Returns:
        ``(num_classes, d)`` class means, in the dtype of ``features``, without gradients.

    Example:
        >>> import torch
        >>> class_means(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[0.5000, 0.5000],
                [1.0000, 0.0000]])
    """
    if features.dim() != 2 or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"class_means expects features (N, d) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    features = features.detach()
    if normalize:
        features = l2_normalize(features)
    counts = torch.bincount(labels, minlength=num_classes)
    missing = (counts == 0).nonzero().flatten()
    if missing.numel() and not allow_missing:
        shown = ", ".join(str(int(k)) for k in missing[:10])
        more = f" and {missing.numel() - 10} more" if missing.numel() > 10 else ""
        raise ValueError(
            f"class_means: {missing.numel()} class(es) have no sample: {shown}{more}; pass allow_missing=True "
            "to get zero rows for them"
        )
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels.to(features.device), features)
    return sums / counts.clamp(min=1).to(sums).unsqueeze(1)


def synthesize_old_classifier(
    old_classifier: Tensor | None,
    old_label_of_new: Tensor,
    class_means: Tensor,
    scale_to_old_norm: bool = True,
) -> Tensor:
    """Old-space classifier indexed by new labels: trained rows for old classes, class means for new ones.

    Row ``k`` of the result (BCT §3.2, Shen et al., CVPR 2020; openBCT issue #1)::

        W[k] = W_o[old_label_of_new[k]]                       if old_label_of_new[k] >= 0
        W[k] = class_means[k] · (r̄ / ‖class_means[k]‖)        otherwise, with scale_to_old_norm
        W[k] = class_means[k]                                 otherwise, without

    where ``r̄ = (1/C_old) Σ_c ‖W_o[c]‖`` is the mean row norm of the trained old classifier. The rescaling is
    our choice, not the paper's: BCT concatenates raw means, whose norm (about 1 for normalised-feature means,
    or the feature norm otherwise) can differ by orders of magnitude from the trained rows, so the dot-product
    logits of new classes would be systematically too small or too large. For cosine (normed-softmax) logits
    the rescaling has no effect. A class mean of norm 0 (a class with no sample) stays a zero row.

    Args:
        old_classifier: ``(C_old, d)`` trained old classifier weights, or ``None`` when the old model has no
            classifier (then every entry of ``old_label_of_new`` must be ``-1`` and no rescaling happens).
        old_label_of_new: ``(C_new,)`` int64; the old label of each new class, ``-1`` for classes the old
            model never saw.
        class_means: ``(C_new, d)`` old-feature class means on the new training set (:func:`class_means`);
            only the rows of new classes are used.
        scale_to_old_norm: rescale synthesised rows to the mean norm of the trained rows.

    Returns:
        ``(C_new, d)`` frozen classifier (no gradients), in the dtype/device of ``class_means``.

    Example:
        >>> import torch
        >>> w_old = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> means = torch.tensor([[9.0, 9.0], [0.0, 0.5], [0.6, 0.0]])
        >>> synthesize_old_classifier(w_old, torch.tensor([1, -1, 0]), means)
        tensor([[0., 4.],
                [0., 3.],
                [2., 0.]])
    """
    old_label_of_new = old_label_of_new.long().to(class_means.device)
    if (
        old_label_of_new.dim() != 1
        or class_means.dim() != 2
        or class_means.shape[0] != old_label_of_new.shape[0]
    ):
        raise ValueError(
            f"expected old_label_of_new (C_new,) and class_means (C_new, d), got {tuple(old_label_of_new.shape)} "
            f"and {tuple(class_means.shape)}"
        )
    if old_label_of_new.numel() and int(old_label_of_new.min()) < -1:
        raise ValueError("old_label_of_new must be -1 (new class) or a valid old label")
    seen = old_label_of_new >= 0
    result = class_means.detach().clone()
    if old_classifier is None:
        if bool(seen.any()):
            raise ValueError("old_label_of_new maps classes to old labels, but old_classifier is None")
        return result
    old_classifier = old_classifier.detach().to(result)
    if old_classifier.dim() != 2 or old_classifier.shape[1] != result.shape[1]:
        raise ValueError(
            f"old_classifier must be (C_old, {result.shape[1]}), got {tuple(old_classifier.shape)}"
        )
    if bool(seen.any()) and int(old_label_of_new.max()) >= old_classifier.shape[0]:
        raise ValueError(
            f"old_label_of_new refers to old label {int(old_label_of_new.max())}, but old_classifier has only "
            f"{old_classifier.shape[0]} rows"
        )
    result[seen] = old_classifier[old_label_of_new[seen]]
    if scale_to_old_norm and bool((~seen).any()):
        target_norm = old_classifier.norm(dim=1).mean()
        new_rows = result[~seen]
        norms = new_rows.norm(dim=1, keepdim=True)
        result[~seen] = torch.where(norms > 0, new_rows * (target_norm / norms.clamp(min=1e-12)), new_rows)
    return result
