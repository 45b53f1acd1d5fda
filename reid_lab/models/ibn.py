"""IBN-Net-a: ResNet with Instance-Batch Normalization (Pan, Luo, Shi & Tang, "Two at Once: Enhancing
Learning and Generalization Capacities via IBN-Net", ECCV 2018).

IBN-a replaces the first normalization of every bottleneck in stages 1-3 (``layer1``-``layer3``) by an
:class:`IBN` layer: InstanceNorm (affine) on the first half of the channels, BatchNorm on the rest. Stage 4
and the stem keep plain BatchNorm (the paper: IN in the deep layers hurts discrimination). Built on top of
torchvision's ``Bottleneck`` / ``ResNet``; parameter names ``bn1.IN.*`` / ``bn1.BN.*`` match the
published IBN-Net checkpoints, so those load with :func:`reid_lab.models.backbones.load_weights`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet


class IBN(nn.Module):
    """Instance-Batch Normalization: ``(B, C, H, W) -> (B, C, H, W)``.

    The first ``int(C * ratio)`` channels go through ``InstanceNorm2d(affine=True)``, the others through
    ``BatchNorm2d`` (IBN-Net, Pan et al. ECCV'18, Fig. 3a).

    Args:
        planes: number of channels ``C``.
        ratio: fraction of channels normalised by IN (0.5 in the paper).
    """

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"IBN ratio must be in (0, 1), got ratio={ratio}")
        self.half = int(planes * ratio)
        if self.half == 0 or self.half == planes:
            raise ValueError(f"IBN with planes={planes}, ratio={ratio} leaves one of IN/BN with no channels")
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: Tensor) -> Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(rest.contiguous())], dim=1)


def convert_to_ibn_a(resnet: ResNet, stages: tuple[str, ...] = ("layer1", "layer2", "layer3")) -> ResNet:
    """Turn a torchvision bottleneck ResNet into IBN-Net-a in place.

    Args:
        resnet: a torchvision ``ResNet`` built from ``Bottleneck`` blocks.
        stages: stages whose blocks get an :class:`IBN` as first normalization.

    Returns:
        The same module, modified.
    """
    for stage_name in stages:
        for block in getattr(resnet, stage_name):
            if not isinstance(block, Bottleneck):
                raise TypeError(
                    f"IBN-a expects Bottleneck blocks, found {type(block).__name__} in {stage_name}"
                )
            block.bn1 = IBN(block.bn1.num_features)
    return resnet


def resnet50_ibn_a() -> ResNet:
    """ResNet-50-IBN-a, randomly initialised (torchvision layout, classifier ``fc`` still attached)."""
    model = ResNet(Bottleneck, [3, 4, 6, 3])
    convert_to_ibn_a(model)
    for m in model.modules():
        if isinstance(m, nn.InstanceNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
