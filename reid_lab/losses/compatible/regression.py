"""Point-to-point regression of new features onto the frozen old features of the same image.

The simplest backward-compatibility baseline: pull ``φ_n(x)`` towards ``φ_o(x)``. The BCT paper (Shen et al.,
CVPR 2020, arXiv 2003.11942, §4 baselines) reports that L2 regression fails; openBCT issue #1 (user and author)
found that it gives usable, if weaker, compatibility. openBCT ``--l2`` and OpenCompatible ``l2`` implement it.
"""

from __future__ import annotations

import torch

from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)


class L2Regression(CompatibleLoss):
    """Squared Euclidean distance between new and old features of the same image.

    ``L = (1/B) Σ_i ‖n_i − o_i‖²`` with ``n_i, o_i`` L2-normalised when ``normalize`` (the reference
    document's notation; BCT's "L2 regression" baseline).

    Deviation from OpenCompatible's ``l2`` (``nn.MSELoss``): the squared distance is summed over the ``d_old``
    coordinates and averaged over the batch only, so the value does not shrink with the embedding dimension.
    On normalised features ``‖n − o‖² = 2 − 2 cos(n, o)``, i.e. twice :class:`CosineRegression`.

    Args:
        weight: multiplier applied by the host.
        normalize: L2-normalise both features first (default). ``False`` regresses the raw embeddings.

    Example:
        >>> import torch
        >>> from reid_lab.losses.compatible.base import CompatibleInputs
        >>> n = torch.tensor([[1.0, 0.0]], requires_grad=True)
        >>> o = torch.tensor([[0.0, 1.0]])
        >>> L2Regression()(CompatibleInputs(n, o, torch.tensor([0]))).loss.item()
        2.0
    """

    name = "l2"

    def __init__(self, weight: float = 1.0, normalize: bool = True) -> None:
        super().__init__(weight)
        self.normalize = normalize

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        new = inputs.new_features
        old = inputs.old_features.detach()
        if self.normalize:
            new, old = l2_normalize(new), l2_normalize(old)
        loss = (new - old).pow(2).sum(dim=1).mean()
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(new, old, dim=1).mean()
        return CompatibleLossOutput(loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/cos_sim": cos})


class CosineRegression(CompatibleLoss):
    """One minus the cosine similarity between new and old features of the same image.

    ``L = (1/B) Σ_i (1 − ⟨n_i, o_i⟩ / (‖n_i‖ ‖o_i‖))`` — the cosine form of the BCT paper's L2-regression
    baseline (Shen et al., CVPR 2020); scale-free, so it only constrains directions, which is what cosine
    retrieval compares.

    Args:
        weight: multiplier applied by the host.
    """

    name = "cosine"

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        cos = torch.nn.functional.cosine_similarity(inputs.new_features, inputs.old_features.detach(), dim=1)
        loss = (1.0 - cos).mean()
        return CompatibleLossOutput(
            loss, {f"{self.name}/loss": loss.detach(), f"{self.name}/cos_sim": cos.detach().mean()}
        )
