"""Stationary d-Simplex classifier: compatibility by construction, without the old model.

Biondi, Pernici, Bruni, Del Bimbo, "CoReS: Compatible Representations via Stationarity", TPAMI 2023
(arXiv 2111.07632), official code NiccoBiondi/cores-compatibility (``src/cores/model.py`` ``dsimplex``); the
stationary-representation line continues in Biondi et al., CVPR 2024 (arXiv 2405.02581).

Every model version is trained with cross-entropy against the same **fixed** classifier whose ``K`` rows are
the vertices of a regular simplex (unit norm, pairwise cosine ``-1/(K-1)``), ``K`` pre-allocated for classes
to come. Each identity keeps its vertex in every version, so the features of all versions gather around the
same points and are compatible without a pairwise loss::

    L = CE(s · φ_n(x) W^T, v(y)),   W ∈ R^{K×(K-1)} the d-Simplex, v(y) the vertex of y's identity

Construction (official ``simplex_coordinates``): ``[I_{K-1}; a·1]`` with ``a = (1 - sqrt(K)) / (K - 1)``,
centred (column means subtracted) and rows normalised.

Where this deviates from the official code:

- Vertices are keyed by **identity**: ``extras["class_identity"]`` (the host gives each new class's raw pid
  over the dataset's whole training split), not by the training subset's relabelled class index, which
  differs between versions trained on different subsets. Identities must lie in ``[0, K)``.
- The official feature dimension is ``d = K - 1``; here ``d >= K - 1`` is allowed and the vertices are lifted
  by zero padding (an isometry; the extra coordinates get no gradient from this term). ``K`` defaults to
  ``d + 1`` (the official relation).
- The vertices are built in float64 and normalised exactly (the official adds 1e-8 to the norm).
- Optional cosine logits (``normalize=True``, scale ``s``); the default is the official plain dot product.

The plugin reads only φ_n's own embedding (``new_all_features``, before the host's dimension adapter) and
never the old model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reid_lab.embedding.simplex import dsimplex_vertices
from reid_lab.losses.compatible.base import (
    CompatibleInputs,
    CompatibleLoss,
    CompatibleLossOutput,
    l2_normalize,
)

__all__ = ["SimplexLoss", "dsimplex_vertices"]


class SimplexLoss(CompatibleLoss):
    """Cross-entropy of φ_n's own embedding against the fixed d-Simplex, vertex per identity.

    ``logits = s · f W^T`` (plain, official) or ``s · f̂ W^T`` (``normalize=True``); ``f`` the new embedding
    ``(B, d)``, ``W`` :func:`dsimplex_vertices` ``(K, d)``, target vertex ``class_identity[y]``.

    Args:
        weight: host-side multiplier.
        num_classes: ``K``, the classes pre-allocated for every present and future version (at least the
            number of identities of the whole training split); default ``d + 1``.
        normalize: cosine logits instead of the official dot product.
        scale: logit scale ``s`` (1, official).
        label_smoothing: of the cross-entropy (0, official).
    """

    name = "simplex"
    needs = frozenset({"class_identity"})

    def __init__(
        self,
        weight: float = 1.0,
        num_classes: int | None = None,
        normalize: bool = False,
        scale: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight)
        if num_classes is not None and int(num_classes) < 2:
            raise ValueError(f"simplex num_classes (K) must be >= 2, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.normalize = bool(normalize)
        self.scale = float(scale)
        self.label_smoothing = float(label_smoothing)
        self._vertices: Tensor | None = None

    def vertices(self, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The fixed ``(K, dim)`` classifier (built once, a pure function of ``K`` and ``dim``)."""
        k = self.num_classes if self.num_classes is not None else dim + 1
        if self._vertices is None or self._vertices.shape != (k, dim):
            self._vertices = dsimplex_vertices(k, dim)
        return self._vertices.to(device=device, dtype=dtype)

    def compute(self, inputs: CompatibleInputs) -> CompatibleLossOutput:
        """Mean CE; parts ``simplex/ce`` and ``simplex/accuracy``.

        Args:
            inputs: ``new_all_features`` ``(B, d_new)`` (else ``new_features``), ``labels`` ``(B,)`` and
                ``extras["class_identity"]`` ``(C_new,)``.
        """
        feats = inputs.new_all_features if inputs.new_all_features is not None else inputs.new_features
        weights = self.vertices(feats.shape[1], feats.device, feats.dtype)
        identity = inputs.extras["class_identity"].to(feats.device).long()
        targets = identity[inputs.labels.long()]
        if int(targets.min()) < 0 or int(targets.max()) >= weights.shape[0]:
            raise ValueError(
                f"simplex: identities {sorted(set(targets.tolist()))[:10]} must lie in [0, K={weights.shape[0]}); "
                "pre-allocate more classes with the plugin's num_classes option (K - 1 <= embedding dim)"
            )
        feats = l2_normalize(feats) if self.normalize else feats
        logits = self.scale * feats @ weights.t()
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(1) == targets).float().mean()
        return CompatibleLossOutput(ce, {f"{self.name}/ce": ce.detach(), f"{self.name}/accuracy": accuracy})
