"""On-device normalisation of uint8 batches (the loaders ship uint8 to keep copies 4x smaller)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from midol.data.transforms.common import IMAGENET_MEAN, IMAGENET_STD


class PixelNormalizer(nn.Module):
    """uint8 (or 0-255 float) ``B x 3 x H x W`` -> ``(x / 255 - mean) / std`` in float32."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std
