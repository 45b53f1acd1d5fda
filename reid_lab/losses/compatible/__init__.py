"""Compatible-loss plugins: one interface (:class:`CompatibleLoss`), one short name per method.

``COMPATIBLE_LOSSES`` maps the names used in upgrade configs to the plugin classes::

    compatible_losses:
      - {name: bct, weight: 1.0}
      - {name: ract, temperature: 0.01, topk: 10}
"""

from __future__ import annotations

from reid_lab.losses.compatible.advbct import AdvBCTLoss
from reid_lab.losses.compatible.base import CompatibleInputs, CompatibleLoss, CompatibleLossOutput
from reid_lab.losses.compatible.bct import BCTInfluenceLoss, BCTPrototypeLoss
from reid_lab.losses.compatible.bt2 import BT2Loss
from reid_lab.losses.compatible.contrastive import ContrastiveN2O
from reid_lab.losses.compatible.distillation import FocalDistillationLoss, LwFLoss
from reid_lab.losses.compatible.lce import LCELoss
from reid_lab.losses.compatible.ract import BCTRACTLoss, RACTLoss, TripletRACTLoss
from reid_lab.losses.compatible.regression import CosineRegression, L2Regression
from reid_lab.losses.compatible.simplex import SimplexLoss
from reid_lab.losses.compatible.unibct import UniBCTLoss

COMPATIBLE_LOSSES: dict[str, type[CompatibleLoss]] = {
    "l2": L2Regression,
    "cosine": CosineRegression,
    "bct": BCTInfluenceLoss,
    "bct_proto": BCTPrototypeLoss,
    "bct_ract": BCTRACTLoss,
    "contrastive": ContrastiveN2O,
    "ract": RACTLoss,
    "triplet_ract": TripletRACTLoss,
    "lce": LCELoss,
    "unibct": UniBCTLoss,
    "pct": FocalDistillationLoss,
    "lwf": LwFLoss,
    "advbct": AdvBCTLoss,
    "simplex": SimplexLoss,
    "bt2": BT2Loss,
}


def list_compatible_losses() -> list[str]:
    """Names accepted by :func:`build_compatible_loss`."""
    return sorted(COMPATIBLE_LOSSES)


def build_compatible_loss(name: str, **options) -> CompatibleLoss:
    """Instantiate the plugin called ``name`` with ``options`` (clear errors for unknown names / options)."""
    cls = COMPATIBLE_LOSSES.get(name)
    if cls is None:
        raise ValueError(f"unknown compatible loss {name!r}; available: {', '.join(list_compatible_losses())}")
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"compatible loss {name!r} ({cls.__name__}): {err}") from err


__all__ = [
    "COMPATIBLE_LOSSES",
    "CompatibleInputs",
    "CompatibleLoss",
    "CompatibleLossOutput",
    "build_compatible_loss",
    "list_compatible_losses",
]
