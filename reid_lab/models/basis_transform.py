"""BT²'s basis transformation: a new embedding that grows the dimension and keeps old-compatible coordinates.

Zhou et al., "BT²: Backward-compatible Training with Basis Transformation", 2023 (arXiv 2211.03989);
official code YifeiZhou02/BT-2, ``models/resnet.py`` ``ResNet_ortho``. The new model has two branches on one
backbone: ``f`` (the new model's own feature, trained to match an independently trained new model φ_n*) and a
small extra branch ``b``. Orthonormal maps mix them so that the first ``d_old`` coordinates ``e`` of the final
embedding are trained against the old model (BCT influence and cosine to φ_old), while the rest keeps what
``f`` holds. Orthogonal maps preserve information, which is the paper's point: extra dimensions help the
compatibility / accuracy trade-off only through such a basis change.

With ``k = add_dim``, ``C = scale`` and ``P``, ``Q`` orthogonal (``torch.nn.utils.parametrizations.orthogonal``)::

    u = [ normalize(b)  ;  P · (C · normalize(f)) ]        # (B, k + d_f)
    e = Q · u[:, :d_old]                                   # (B, d_old): the old-compatible coordinates
    embedding = [ e ; u[:, d_old:] ]                       # (B, d_f + k), norm sqrt(1 + C²) for every image

The cross-test compares the first ``d_old`` coordinates with old features (the official evaluation truncates
both sides to the smaller dimension), which is the upgrade host's ``truncate`` adapter.

Deviations from the official model, on purpose:

- ``b`` is ``Linear(in_features, k)`` on ``relu(pooled)``: the official ``fc3`` maps the ReLU of its
  ``(d_f + d_old)``-wide embedding layer to ``d_old`` outputs and keeps only the first ``k``; here the branch
  has exactly the ``k`` outputs that are used, fed from the pooled backbone feature the BNNeck also sees.
- ``f`` is the BNNeck's test embedding (``neck_feat``; with the default ``after``, the BN output its classifier
  reads), and the model keeps its own losses (BoT: label-smoothed cross-entropy on that feature, triplet on the
  feature before the BN). The official model trains a plain cross-entropy of a bias-free classifier on
  ``normalize(f)`` and nothing else (its configs' ``label_smoothing`` is never read).
- ``orthogonal_map`` chooses torch's parametrisation; the official code uses the default (``matrix_exp`` for
  square maps). Both trivialise around the initial orthogonal matrix, but their optimisation paths differ and the
  Cayley map cannot reach rotations with an eigenvalue of -1 relative to it; ``cayley`` costs one linear solve
  instead of a matrix exponential (for 1280 x 1280 on 2 CPU cores, forward + backward: 0.18 s against 3.9 s), so
  CPU studies use it.
- The maps' parameters take the module's weight decay like every other weight (5e-4 in the BoT configs; the
  official transfer configs use 3e-5 on CIFAR-100 and 0 on ImageNet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")


class BasisTransform(nn.Module):
    """Mix the new branch ``f`` and a ``k``-wide extra branch into BT²'s ``(d_f + k)``-d embedding.

    Args:
        in_features: dimension of the pooled backbone feature (input of the extra branch).
        branch_dim: ``d_f``, the dimension of the new branch ``f``.
        old_dim: ``d_old``, the old model's embedding dimension (the first ``d_old`` outputs are ``e``).
        add_dim: ``k``, the dimensions added (official ``to_add_dim``, 32).
        scale: ``C``, the weight of the new branch against the unit-norm extra branch (official configs: 2).
        orthogonal_map: torch's orthogonal parametrisation (``matrix_exp`` as the official code, ``cayley``,
            ``householder``).

    Shapes:
        ``forward(branch (B, d_f), pooled (B, in_features)) -> (B, d_f + k)``.
    """

    def __init__(self, in_features: int, branch_dim: int, old_dim: int, add_dim: int = 32, scale: float = 2.0,
                 orthogonal_map: str = "matrix_exp") -> None:
        super().__init__()
        if min(in_features, branch_dim, old_dim, add_dim) <= 0:
            raise ValueError(f"basis_transform: dimensions must be positive, got in_features={in_features}, "
                             f"branch_dim={branch_dim}, old_dim={old_dim}, add_dim={add_dim}")
        if branch_dim + add_dim < old_dim:
            raise ValueError(f"basis_transform: the embedding has branch_dim + add_dim = {branch_dim + add_dim} "
                             f"dimensions, fewer than old_dim = {old_dim}; raise add_dim to at least "
                             f"{old_dim - branch_dim}")
        if not scale > 0:
            raise ValueError(f"basis_transform: scale (C) must be > 0, got {scale}")
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"basis_transform: orthogonal_map must be one of {ORTHOGONAL_MAPS}, got {orthogonal_map!r}")
        self.in_features, self.branch_dim, self.old_dim = int(in_features), int(branch_dim), int(old_dim)
        self.add_dim, self.scale = int(add_dim), float(scale)
        self.extra = nn.Linear(in_features, add_dim)
        self.rotate_new = orthogonal(nn.Linear(branch_dim, branch_dim, bias=False), orthogonal_map=orthogonal_map)
        self.rotate_old = orthogonal(nn.Linear(old_dim, old_dim, bias=False), orthogonal_map=orthogonal_map)

    @property
    def out_dim(self) -> int:
        """``d_f + k``, the dimension of the final embedding."""
        return self.branch_dim + self.add_dim

    def forward(self, branch: Tensor, pooled: Tensor) -> Tensor:
        """``(B, d_f), (B, in_features) -> (B, d_f + k)``; the first ``old_dim`` columns are ``e``."""
        if branch.dim() != 2 or branch.shape[1] != self.branch_dim:
            raise ValueError(f"BasisTransform expects the branch as (B, {self.branch_dim}), got {tuple(branch.shape)}")
        if pooled.shape != (branch.shape[0], self.in_features):
            raise ValueError(f"BasisTransform expects pooled features ({branch.shape[0]}, {self.in_features}), "
                             f"got {tuple(pooled.shape)}")
        extra = F.normalize(self.extra(F.relu(pooled)), dim=1)
        mixed = torch.cat([extra, self.rotate_new(self.scale * F.normalize(branch, dim=1))], dim=1)
        compatible = self.rotate_old(mixed[:, : self.old_dim])
        return torch.cat([compatible, mixed[:, self.old_dim:]], dim=1)

    def extra_repr(self) -> str:
        return (f"branch_dim={self.branch_dim}, old_dim={self.old_dim}, add_dim={self.add_dim}, "
                f"scale={self.scale}")
