"""Image transforms for ReID with ``torchvision.transforms.v2``.

Training follows the BoT recipe (Luo et al. CVPRW'19, "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification"): resize to ``(H, W)``, random horizontal flip, pad 10 + random crop back to ``(H, W)``,
normalise, random erasing (Zhong et al. AAAI'20) with p = 0.5. Colour jitter and AutoAugment are optional
(fast-reid's SBS recipe uses AutoAugment with a small probability).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_train_transform(
    image_size: tuple[int, int] = (256, 128),
    flip_prob: float = 0.5,
    padding: int = 10,
    random_erasing_prob: float = 0.5,
    color_jitter: float = 0.0,
    autoaugment_prob: float = 0.0,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """BoT training transform: PIL image -> float tensor ``(3, H, W)``.

    Args:
        image_size: ``(height, width)`` of the network input.
        flip_prob: probability of a horizontal flip.
        padding: pixels of zero padding before the random crop (0 disables pad + crop).
        random_erasing_prob: probability of random erasing (0 disables it).
        color_jitter: strength for brightness / contrast / saturation jitter (0 disables it).
        autoaugment_prob: probability of applying ImageNet AutoAugment (0 disables it).
        mean: normalisation mean.
        std: normalisation std.
    """
    height, width = _check_size(image_size)
    steps: list = [v2.ToImage(), v2.Resize((height, width), antialias=True)]
    if autoaugment_prob > 0:
        steps.append(v2.RandomApply([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)], p=autoaugment_prob))
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    if padding > 0:
        steps += [v2.Pad(padding), v2.RandomCrop((height, width))]
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing_prob > 0:
        steps.append(v2.RandomErasing(p=random_erasing_prob, value=0))
    return v2.Compose(steps)


def build_test_transform(
    image_size: tuple[int, int] = (256, 128),
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """Evaluation transform: resize, to tensor, normalise. PIL image -> ``(3, H, W)``."""
    height, width = _check_size(image_size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((height, width), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def _check_size(image_size) -> tuple[int, int]:
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be (height, width) with positive values, got {image_size!r}")
    return size  # type: ignore[return-value]
