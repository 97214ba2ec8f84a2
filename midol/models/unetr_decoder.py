"""A UNETR-style decoder for plain ViTs (Hatamizadeh et al. 2022, "UNETR: Transformers for 3D
Medical Image Segmentation", here in 2-D): DEX's supplement fine-tunes segmentation with UNETR
over intermediate ViT blocks (ViT-B: blocks 3, 6, 9, 12).

A ViT's blocks all live at 1/p of the input. The deepest map is upsampled by 2 per stage; at
stage s the s-th deepest remaining block map, brought to that resolution by s transposed
convolutions, is concatenated and fused by two 3x3 conv-BN-ReLU layers. The last stage (full
resolution) takes a conv skip from the image itself, as UNETR does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def up(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)


class UNETRDecoder(nn.Module):
    """ViT block maps (shallow to deep, each ``B x C x H/p x W/p``) + the image -> per-pixel
    logits at the input size. ``patch_size`` must be a power of 2 with ``log2(p) >= len(maps)``
    stages (ViT-B/16: 4 stages for 4 maps; the shallowest maps feed the highest resolutions)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, patch_size: int,
                 dim: int = 64, dropout: float = 0.1, image_channels: int = 3):
        super().__init__()
        stages = round(math.log2(patch_size))
        if 2**stages != patch_size:
            raise ValueError(f"UNETR needs a power-of-2 patch size, got {patch_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
        if not 1 <= len(in_channels) <= stages:
            raise ValueError(f"UNETR with patch {patch_size} takes 1..{stages} block maps, got {len(in_channels)}")
        self.num_maps = len(in_channels)
        # widths: coarse stages wide, the full-resolution stage ``dim``
        widths = [dim * 2 ** (stages - 1 - s) for s in range(stages)]  # output of stage s (0 = coarsest up)
        deepest = in_channels[-1]
        self.ups = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.fuse = nn.ModuleList()
        cin = deepest
        skip_maps = list(in_channels[:-1])[::-1]  # deep to shallow, for stages 0, 1, ...
        for s in range(stages):
            self.ups.append(up(cin, widths[s]))
            if s == stages - 1:
                skip: nn.Module = conv_block(image_channels, widths[s])
            elif s < len(skip_maps):
                # s + 1 transposed convolutions bring the block map to this stage's resolution
                layers: list[nn.Module] = []
                c = skip_maps[s]
                for _ in range(s + 1):
                    layers += [up(c, widths[s]), nn.BatchNorm2d(widths[s]), nn.ReLU(inplace=True)]
                    c = widths[s]
                skip = nn.Sequential(*layers)
            else:
                skip = nn.Identity()
            self.skips.append(skip)
            has_skip = s == stages - 1 or s < len(skip_maps)
            self.fuse.append(conv_block(widths[s] * (2 if has_skip else 1), widths[s]))
            cin = widths[s]
        self.has_skip = [s == stages - 1 or s < len(skip_maps) for s in range(stages)]
        self.skip_source = [None if s == stages - 1 or s >= len(skip_maps) else len(in_channels) - 2 - s
                            for s in range(stages)]
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(widths[-1], num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        if len(features) != self.num_maps:
            raise ValueError(f"expected {self.num_maps} block maps, got {len(features)}")
        x = features[-1]
        last = len(self.ups) - 1
        for s, (upsample, skip, fuse) in enumerate(zip(self.ups, self.skips, self.fuse, strict=True)):
            x = upsample(x)
            if s == last:
                x = fuse(torch.cat([x, skip(image)], dim=1))
            elif (source := self.skip_source[s]) is not None:
                x = fuse(torch.cat([x, skip(features[source])], dim=1))
            else:
                x = fuse(x)
        if x.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"decoder output {tuple(x.shape[-2:])} != image {tuple(image.shape[-2:])}: "
                             "the image side must be a multiple of the patch size")
        return self.classifier(self.dropout(x))
