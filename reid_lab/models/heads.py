"""The BNNeck head of the ReID strong baseline (Luo et al., "Bag of Tricks and A Strong Baseline for Deep
Person Re-identification", CVPRW 2019, §3.5).

Metric losses (triplet, center) see the pooled feature *before* the BatchNorm; the ID classifier sees it
*after*, where features spread on a hypersphere-like layout suited to softmax. The BN has a frozen zero bias
and the classifier has no bias, as in BoT.

``classifier="simplex"`` replaces the learned classifier by the fixed d-Simplex of CoReS (Biondi et al.,
TPAMI 2023; :func:`reid_lab.embedding.simplex.dsimplex_vertices`): ``K`` pre-allocated unit vertices that every
model version shares, so versions trained against it are compatible without an old model in the loop.
"""

from __future__ import annotations

from torch import Tensor, nn

from reid_lab.embedding.simplex import dsimplex_vertices

NECK_FEATS = ("before", "after")
CLASSIFIERS = ("linear", "simplex")


class BNNeckHead(nn.Module):
    """Optional embedding reduction, BNNeck and an optional bias-free classifier.

    Args:
        in_features: dimension of the pooled backbone feature.
        num_classes: number of identities; 0 means no classifier (no ``"logits"`` in the output).
        embedding_dim: if set, a bias-free ``Linear(in_features, embedding_dim)`` reduces the feature first
            (fast-reid's embedding layer; lets an upgraded model match or change the embedding dimension).
        neck_feat: which feature is the test ``"embedding"``: ``"before"`` or ``"after"`` the BN (BoT: after).
        bias_free_bn: freeze the BN bias at zero (BoT); False keeps a trainable bias.
        classifier: ``"linear"`` (learned, BoT) or ``"simplex"``: the fixed ``(num_classes, D)`` d-Simplex
            (``num_classes`` is then ``K``, the classes pre-allocated for every version, ``K - 1 <= D``; its rows
            are indexed by identity, see :class:`reid_lab.modules.reid.ReIDModule`). Not a parameter and not in
            the state dict: it is a function of ``K`` and ``D``.

    Shapes:
        input ``(B, in_features)``; every output feature ``(B, D)`` with ``D = embedding_dim or in_features``;
        ``logits`` ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 0,
        embedding_dim: int | None = None,
        neck_feat: str = "after",
        bias_free_bn: bool = True,
        classifier: str = "linear",
    ) -> None:
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"in_features must be > 0, got {in_features}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")
        if embedding_dim is not None and embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be > 0 or None, got {embedding_dim}")
        if neck_feat not in NECK_FEATS:
            raise ValueError(f"neck_feat must be one of {NECK_FEATS}, got {neck_feat!r}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if classifier == "simplex" and num_classes < 2:
            raise ValueError(f"a simplex classifier needs num_classes (K) >= 2, got {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim or in_features
        self.neck_feat = neck_feat

        self.embedding: nn.Module = (
            nn.Linear(in_features, embedding_dim, bias=False) if embedding_dim is not None else nn.Identity()
        )
        self.bottleneck = nn.BatchNorm1d(self.embedding_dim)
        if bias_free_bn:
            self.bottleneck.bias.requires_grad_(False)
        self.classifier = (nn.Linear(self.embedding_dim, num_classes, bias=False)
                           if num_classes > 0 and classifier == "linear" else None)
        self.simplex: Tensor | None
        if classifier == "simplex":
            self.register_buffer("simplex", dsimplex_vertices(num_classes, self.embedding_dim), persistent=False)
        else:
            self.simplex = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BoT's init: kaiming (fan-out) for the reduction, BN weight 1 / bias 0, classifier N(0, 0.001)."""
        if isinstance(self.embedding, nn.Linear):
            nn.init.kaiming_normal_(self.embedding.weight, a=0, mode="fan_out")
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, pooled: Tensor) -> dict[str, Tensor]:
        """Map pooled backbone features to the ReID outputs.

        Args:
            pooled: ``(B, in_features)``.

        Returns:
            ``"features"`` ``(B, D)`` before the BN, ``"bn_features"`` ``(B, D)`` after it, ``"embedding"``
            (the ``neck_feat`` choice, not L2-normalised) and ``"logits"`` ``(B, num_classes)`` if there is a
            classifier (learned or simplex).
        """
        if pooled.dim() != 2 or pooled.shape[1] != self.in_features:
            raise ValueError(
                f"BNNeckHead expects input of shape (B, {self.in_features}), got {tuple(pooled.shape)}"
            )
        features = self.embedding(pooled)
        bn_features = self.bottleneck(features)
        out = {
            "features": features,
            "bn_features": bn_features,
            "embedding": bn_features if self.neck_feat == "after" else features,
        }
        if self.classifier is not None:
            out["logits"] = self.classifier(bn_features)
        elif self.simplex is not None:
            out["logits"] = bn_features @ self.simplex.to(bn_features.dtype).t()  # CoReS: plain dot product
        return out
