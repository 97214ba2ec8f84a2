"""Segmentation decoder over a backbone's multi-scale feature maps (for Swin: its four stages).

A light FPN-style fusion (as in SegFormer's all-MLP decoder): each map is projected to
``dim`` channels, upsampled to the finest map's resolution, concatenated, fused by a 3x3
conv + BN + ReLU, classified per pixel, and upsampled to the input size. It is lighter than the
UPerNet head the paper used through mmsegmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def stage_indices(backbone: nn.Module, num_levels: int = 4) -> list[int]:
    """Which ``backbone.feature_info`` entries feed the decoder: the last ``num_levels`` of a
    hierarchical model (Swin: its four stages; ResNet: layer1-4), or ``num_levels`` evenly
    spaced blocks ending with the last of a single-scale one (ViT-B: blocks 2, 5, 8, 11)."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__} has no feature_info: cannot take stage maps")
    n = len(info)
    if n <= num_levels:
        return list(range(n))
    if len({entry["reduction"] for entry in info}) > 1:
        return list(range(n - num_levels, n))
    step = n // num_levels
    return [n - 1 - step * (num_levels - 1 - i) for i in range(num_levels)]


def stage_channels(backbone: nn.Module, indices: Sequence[int]) -> list[int]:
    info: Any = backbone.feature_info  # timm's list of stage descriptions
    return [int(info[i]["num_chs"]) for i in indices]


def stage_maps(backbone: nn.Module, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """Feature maps B x C_i x H_i x W_i of the backbone stages ``indices`` (timm
    ``forward_intermediates``)."""
    forward: Any = backbone.forward_intermediates
    return forward(
        images, indices=list(indices), intermediates_only=True, output_fmt="NCHW"
    )


class MultiScaleDecoder(nn.Module):
    """Fuse stage maps into per-pixel class logits at the input resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(dim * len(in_channels), dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        if len(features) != len(self.lateral):
            raise ValueError(f"expected {len(self.lateral)} feature maps, got {len(features)}")
        size = features[0].shape[-2:]
        fused = [
            F.interpolate(proj(f), size=size, mode="bilinear", align_corners=False)
            for proj, f in zip(self.lateral, features, strict=True)
        ]
        logits = self.classifier(self.dropout(self.fuse(torch.cat(fused, dim=1))))
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
