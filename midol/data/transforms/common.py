"""What every transform shares: the normalisation constants and the HWC array -> CHW tensor step.

Transforms return uint8 ``C x H x W`` tensors: normalisation happens on the device
(:class:`~midol.data.normalize.PixelNormalizer`), which keeps host-to-device copies 4x smaller.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x 3`` -> uint8 ``3 x H x W`` tensor (a copy only when not contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def check_size(name: str, size: int) -> int:
    if size < 8:
        raise ValueError(f"{name} must be >= 8 pixels, got {size}")
    return size


def check_scale(name: str, scale: tuple[float, float] | list[float]) -> tuple[float, float]:
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    return lo, hi
