"""The one interface of the model's own ReID losses (the compatible-upgrade losses live in
:mod:`reid_lab.losses.compatible`).

Every loss is an ``nn.Module`` called as ``loss(outputs, pids)`` where ``outputs`` is the dict a
:class:`reid_lab.models.ReIDModel` returns. It returns an *unweighted* scalar; the host multiplies it by
``loss.weight``. Losses that own parameters (ArcFace / CosFace class weights, center-loss centers) create
them in :meth:`ReIDLoss.bind`, which the host calls once after building the model and before creating the
optimizer, so configs need not repeat ``num_classes`` and the feature dimension.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn


class ReIDLoss(nn.Module):
    """Base class of the model's own losses.

    Args:
        weight: multiplier applied by the host when adding this loss to the total.

    Attributes:
        name: short name (the key of :data:`reid_lab.losses.LOSSES`), used for logging.
    """

    name: str = "reid"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def bind(self, num_classes: int, feature_dim: int) -> None:
        """Create parameters that depend on the model (no-op by default).

        Args:
            num_classes: number of training identities.
            feature_dim: dimension ``D`` of the model's features.
        """

    def forward(self, outputs: dict[str, Tensor], pids: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the unweighted scalar loss for one batch.

        Args:
            outputs: the model's output dict (``"features"``, ``"bn_features"``, ``"logits"``, ...).
            pids: ``(B,)`` int64 identity labels in ``[0, num_classes)``.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def get_output(outputs: dict[str, Tensor], key: str, loss: ReIDLoss, hint: str = "") -> Tensor:
    """``outputs[key]`` or a clear error naming the loss, the key and the keys that are there."""
    if key not in outputs:
        raise KeyError(
            f"{type(loss).__name__} needs outputs[{key!r}], but the model returned only {sorted(outputs)}"
            + (f"; {hint}" if hint else "")
        )
    return outputs[key]


def check_pids(pids: Tensor, batch_size: int, loss: ReIDLoss, num_classes: int | None = None) -> None:
    """Raise a clear error unless ``pids`` is a ``(batch_size,)`` integer tensor (within ``num_classes``)."""
    if pids.dim() != 1 or pids.shape[0] != batch_size:
        raise ValueError(
            f"{type(loss).__name__}: pids must have shape ({batch_size},), got {tuple(pids.shape)}"
        )
    if pids.is_floating_point() or pids.is_complex():
        raise TypeError(f"{type(loss).__name__}: pids must be an integer tensor, got dtype {pids.dtype}")
    if num_classes is not None and pids.numel() > 0:
        low, high = int(pids.min()), int(pids.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{type(loss).__name__}: pids must lie in [0, {num_classes}), got values in [{low}, {high}]"
            )


def unbound_error(loss: ReIDLoss) -> RuntimeError:
    """The error for a parametric loss used before :meth:`ReIDLoss.bind`."""
    return RuntimeError(
        f"{type(loss).__name__} owns parameters that are created by bind(num_classes, feature_dim); "
        "the host must call it after building the model (and before building the optimizer)"
    )


def full_precision(x: Tensor) -> AbstractContextManager:
    """Disable autocast for a block (distances and scaled similarities are too coarse in float16)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half-precision tensor, unchanged otherwise."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
