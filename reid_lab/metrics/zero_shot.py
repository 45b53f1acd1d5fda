"""Zero-shot identity classification for CLIP-style models: images classified among identities described by text.

Each identity's class embedding is built from its prompts as open_clip's ``build_zero_shot_classifier`` builds a
class from its templates: every prompt embedding L2-normalised, averaged, the mean normalised again. For
text-to-person data the prompts of an identity are its captions (the test identities have no names to fill
into a template such as "a photo of a {}"), so the task is: classify each test image among the test
identities, class = the identity's captions. Scores are cosine similarities; top-k accuracy counts an image as
correct when its identity is among the ``k`` highest-scoring classes (ties: the lower class index first).

* :func:`identity_classifier`: ``(num_prompts, D)`` prompt embeddings + their pids -> ``(C, D)`` class weights.
* :func:`zero_shot_accuracy`: top-k accuracy of ``(num_images, D)`` image embeddings against them.
* :class:`ZeroShotIdentityMetric`: the torchmetrics wrapper that collects captions and images during a test
  loop (``tag`` ``zeroshot``: keys ``test/zeroshot/top1``, ``test/zeroshot/top5``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["ZeroShotIdentityMetric", "identity_classifier", "zero_shot_accuracy"]


def identity_classifier(prompt_features: torch.Tensor, prompt_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class embeddings from prompt embeddings (open_clip's ``build_zero_shot_classifier`` averaging).

    Args:
        prompt_features: ``(num_prompts, D)`` text embeddings (captions of the identities).
        prompt_pids: ``(num_prompts,)`` integer identity of each prompt.

    Returns:
        ``(class_pids, class_weights)``: ``(C,)`` sorted distinct pids and ``(C, D)`` unit-norm class embeddings.

    Example:
        >>> pids, weights = identity_classifier(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]),
        ...                                     torch.tensor([7, 7, 9]))
        >>> pids.tolist(), [[round(v, 4) for v in row] for row in weights.tolist()]
        ([7, 9], [[0.7071, 0.7071], [1.0, 0.0]])
    """
    if prompt_features.dim() != 2 or prompt_pids.shape != (prompt_features.shape[0],):
        raise ValueError(f"prompt_features must be (num_prompts, D) and prompt_pids (num_prompts,), got "
                         f"{tuple(prompt_features.shape)} and {tuple(prompt_pids.shape)}")
    if prompt_features.shape[0] == 0:
        raise ValueError("identity_classifier needs at least one prompt")
    class_pids, inverse = torch.unique(prompt_pids, sorted=True, return_inverse=True)
    unit = F.normalize(prompt_features.float(), dim=1)
    sums = torch.zeros(len(class_pids), unit.shape[1], dtype=unit.dtype, device=unit.device)
    sums.index_add_(0, inverse, unit)
    return class_pids, F.normalize(sums, dim=1)  # normalising the sum equals normalising the mean


def zero_shot_accuracy(image_features: torch.Tensor, image_pids: torch.Tensor, class_weights: torch.Tensor,
                       class_pids: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (percent) of classifying images among the classes by cosine similarity.

    Args:
        image_features: ``(num_images, D)``.
        image_pids: ``(num_images,)``; every image's pid must be one of ``class_pids``.
        class_weights: ``(C, D)`` class embeddings (:func:`identity_classifier`).
        class_pids: ``(C,)``.
        topk: the ``k`` values; ``k`` larger than ``C`` counts as ``C`` (every image correct).

    Returns:
        ``{"top1": ..., "top5": ...}`` in percent.
    """
    missing = ~torch.isin(image_pids, class_pids)
    if bool(missing.any()):
        raise ValueError(f"{int(missing.sum())} image(s) have an identity without prompts, e.g. pid "
                         f"{int(image_pids[missing][0])}: zero-shot classification needs a class for every image")
    scores = F.normalize(image_features.float(), dim=1) @ class_weights.float().T  # (num_images, C)
    target = torch.searchsorted(class_pids, image_pids)  # class_pids is sorted (identity_classifier)
    own = scores.gather(1, target[:, None])
    # rank of the true class: classes scoring higher, plus equal-scoring classes with a lower index
    index = torch.arange(scores.shape[1], device=scores.device)
    rank = (scores > own).sum(1) + ((scores == own) & (index[None, :] < target[:, None])).sum(1)
    return {f"top{k}": float((rank < k).float().mean() * 100) for k in topk}


class ZeroShotIdentityMetric(Metric):
    """Zero-shot identity classification over a test loop: caption batches give the classes, image batches are
    classified (see the module docstring).

    ``update(features, pids, is_caption)``: ``features`` ``(B, D)``, ``pids`` ``(B,)``, ``is_caption`` a bool
    tensor ``(B,)`` or a Python bool. ``compute()`` returns ``{"top1", "top5"}`` in percent; :meth:`describe`
    names the task and the chance level.

    Example:
        >>> m = ZeroShotIdentityMetric()
        >>> m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 2]), True)
        >>> m.update(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([1, 2]), False)
        >>> {k: float(v) for k, v in m.compute().items()}
        {'top1': 50.0, 'top5': 100.0}
        >>> m.describe()
        'test images classified among 2 identities (class: mean of its caption embeddings); 2 images; chance top1 50.00, top5 100.00'
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    tag = "zeroshot"

    features: list[torch.Tensor]
    pids: list[torch.Tensor]
    is_caption: list[torch.Tensor]

    def __init__(self, topk: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not topk or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in topk):
            raise ValueError(f"topk must be positive integers, got {list(topk)}")
        self.topk = tuple(topk)
        self.last_sizes: tuple[int, int] | None = None  # (num_classes, num_images) of the last compute
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("pids", default=[], dist_reduce_fx="cat")
        self.add_state("is_caption", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, pids: torch.Tensor, is_caption: torch.Tensor | bool) -> None:
        if features.dim() != 2 or pids.shape != (features.shape[0],):
            raise ValueError(f"features must be (B, D) and pids (B,), got {tuple(features.shape)} and "
                             f"{tuple(pids.shape)}")
        if isinstance(is_caption, bool):
            is_caption = torch.full((features.shape[0],), is_caption, dtype=torch.bool, device=features.device)
        self.features.append(features.detach())
        self.pids.append(pids.long())
        self.is_caption.append(is_caption.bool())

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.features, list) and not self.features:
            raise ValueError(f"{type(self).__name__}.compute() called before any update()")
        features = dim_zero_cat(self.features)
        pids = dim_zero_cat(self.pids).long()
        is_caption = dim_zero_cat(self.is_caption).bool()
        if not bool(is_caption.any()) or bool(is_caption.all()):
            raise ValueError(f"{type(self).__name__} needs captions and images, got {int(is_caption.sum())} "
                             f"captions and {int((~is_caption).sum())} images")
        class_pids, weights = identity_classifier(features[is_caption], pids[is_caption])
        result = zero_shot_accuracy(features[~is_caption], pids[~is_caption], weights, class_pids, self.topk)
        self.last_sizes = (len(class_pids), int((~is_caption).sum()))
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in result.items()}

    def chance(self) -> dict[str, float]:
        """Top-k accuracy (percent) of a random guess among the last ``compute``'s classes: ``min(k, C) / C``."""
        if self.last_sizes is None:
            raise ValueError("chance() needs a compute() first")
        classes = self.last_sizes[0]
        return {f"top{k}": 100.0 * min(k, classes) / classes for k in self.topk}

    def describe(self) -> str:
        """What the last ``compute`` classified, with the chance level, for a printed result line."""
        what = "test images classified among {} identities (class: mean of its caption embeddings)"
        if self.last_sizes is None:
            return what.format("the")
        chance = ", ".join(f"{k} {v:.2f}" for k, v in self.chance().items())
        return f"{what.format(self.last_sizes[0])}; {self.last_sizes[1]} images; chance {chance}"
