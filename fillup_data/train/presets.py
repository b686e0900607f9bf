"""Training presets: the paper's image transforms (appendix B.4) for the loader's ``transform`` argument."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image

from fillup_data.errors import FillupError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    size: int = 224, *, crop: str = "random_resized", scale: tuple[float, float] = (0.08, 1.0),
    padding: int = 4, color_jitter: float = 0.4, randaugment: bool = False, randaugment_ops: int = 2,
    randaugment_magnitude: int = 9, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Paper B.4 (standard ResNet-50 protocol): random crop 224, horizontal flip, colour jitter,
    optional RandAugment.  ``crop="pad"`` is the CIFAR-style 4-pixel-padding crop for 32x32 images."""
    import torchvision.transforms as T

    ops: list[Any] = []
    if crop == "random_resized":
        ops.append(T.RandomResizedCrop(size, scale=tuple(scale), antialias=True))
    elif crop == "pad":
        ops += [T.Resize(size, antialias=True), T.RandomCrop(size, padding=padding, padding_mode="reflect")]
    else:
        raise FillupError(f"crop {crop!r}: allowed random_resized, pad")
    ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if randaugment:
        ops.append(T.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(
    size: int = 224, resize: int = 256, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``resize`` then center-crop ``size`` (256 -> 224 in the paper's protocol)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
