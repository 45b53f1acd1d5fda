"""The two image–text terms of CLIP-ReID (Li, Sun & Li, AAAI'23, Eqs. 3–5 and 7), in the official form.

* :func:`supcon_loss`: stage 1's supervised contrastive loss between image features and the identity-prompt
  text features (official ``loss/supcontrast.py``). Unlike :class:`reid_lab.losses.image_text.SupConLoss`
  (L2-normalised features, the model's learnable temperature, the two directions averaged), the official term
  takes the raw (unnormalised) features at a fixed temperature 1 and one direction per call; CLIP-ReID adds
  ``supcon_loss(image, text) + supcon_loss(text, image)``.
* :func:`prototype_cross_entropy`: stage 2's image-to-text cross-entropy ``L_i2tce``: the text features of all
  ``C`` identities act as a fixed classifier, ``logits = image @ text_featuresᵀ`` (no normalisation, no scale),
  with label smoothing (the official ``i2tscore`` goes through ``CrossEntropyLabelSmooth``, eps 0.1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from reid_lab.losses.cross_entropy import label_smoothing_cross_entropy

__all__ = ["prototype_cross_entropy", "supcon_loss"]


def supcon_loss(anchor: Tensor, contrast: Tensor, anchor_pids: Tensor, contrast_pids: Tensor,
                temperature: float = 1.0) -> Tensor:
    """Supervised contrastive loss of ``anchor`` rows against ``contrast`` rows (Khosla et al. NeurIPS'20).

    With ``S = anchor @ contrastᵀ / temperature`` ``(A, N)`` and ``P(a) = {n: contrast_pids_n = anchor_pids_a}``::

        L = -(1/A) Σ_a (1/|P(a)|) Σ_{n ∈ P(a)} log( exp(S_an) / Σ_k exp(S_ak) )

    Args:
        anchor: ``(A, D)`` features (CLIP-ReID: image features for ``L_i2t``, text features for ``L_t2i``).
        contrast: ``(N, D)`` features of the other modality.
        anchor_pids / contrast_pids: ``(A,)`` / ``(N,)`` identities; every anchor needs a positive.
        temperature: CLIP-ReID uses 1.

    Returns:
        Scalar mean over anchors.
    """
    positive = (anchor_pids.unsqueeze(1) == contrast_pids.unsqueeze(0)).to(anchor.dtype)
    num_positive = positive.sum(dim=1)
    if bool((num_positive == 0).any()):
        raise ValueError("supcon_loss: every anchor needs at least one contrast row of its identity")
    log_prob = torch.log_softmax(anchor @ contrast.T / temperature, dim=1)
    return -((positive * log_prob).sum(dim=1) / num_positive).mean()


def prototype_cross_entropy(features: Tensor, prototypes: Tensor, pids: Tensor, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy of ``features @ prototypesᵀ`` against ``pids`` with label smoothing ``epsilon``.

    Args:
        features: ``(B, D)`` image features.
        prototypes: ``(C, D)`` one text feature per identity (row ``c`` is identity ``c``).
        pids: ``(B,)`` identities in ``[0, C)``.
        epsilon: label smoothing (0: plain cross-entropy).
    """
    return label_smoothing_cross_entropy(features @ prototypes.T, pids, epsilon)
