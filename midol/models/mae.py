"""MAE building blocks around any timm ViT (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners"): per-image random masking, the encoder pass over the kept patches, and the
light decoder with fixed sin-cos positions. DEX pre-trains with exactly this (docs/papers/dex.md,
'L_MAE'; decoder 512 wide, 8 blocks, 16 heads).

Written here rather than taken from lightly: lightly's ``MaskedVisionTransformerTIMM`` /
``MAEDecoderTIMM`` would add a dependency (absent on the GPU machines) for ~80 lines, and midol
needs the encoder to run the ViT's own blocks unchanged so that injected DEX layers (which route
on the class token) see exactly what they see at fine-tuning time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


class Masking(NamedTuple):
    keep: torch.Tensor  # B x K indices of the visible patches (in patch order 0..L-1)
    restore: torch.Tensor  # B x L: argsort of the shuffle, to put decoder tokens back in order
    mask: torch.Tensor  # B x L: 1 = removed (the loss is taken there), 0 = visible


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device,
                   generator: torch.Generator | None = None) -> Masking:
    """MAE's per-image random masking: shuffle patches by uniform noise, keep the first
    ``round(L * (1 - mask_ratio))`` (at least one)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    keep_n = max(1, round(num_patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep_n] = 0
    mask = mask.gather(1, restore)
    return Masking(shuffle[:, :keep_n], restore, mask)


def encode_visible(vit: VisionTransformer, images: torch.Tensor, masking: Masking | None) -> torch.Tensor:
    """The ViT's tokens (prefix tokens first) after its final norm, on the visible patches only
    (all patches when ``masking`` is None). Uses timm's own patch/position embedding and blocks."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    prefix = vit.num_prefix_tokens
    if masking is not None:
        patches = x[:, prefix:]
        index = masking.keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        x = torch.cat([x[:, :prefix], patches.gather(1, index)], dim=1)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and torch.is_grad_enabled():
        from timm.models._manipulate import checkpoint_seq

        x = checkpoint_seq(vit.blocks, x, use_reentrant=False)  # side outputs keep their graph
    else:
        x = vit.blocks(x)
    return vit.norm(x)


class MAEDecoder(nn.Module):
    """Linear embed -> mask tokens un-shuffled into place -> fixed 2-D sin-cos positions ->
    ``depth`` transformer blocks -> norm -> per-patch pixel prediction."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch_size: int, in_chans: int = 3,
                 dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_prefix_tokens: int = 1):
        super().__init__()
        if dim % 4:
            raise ValueError(f"decoder dim must be divisible by 4 (2-D sin-cos), got {dim}")
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = build_sincos2d_pos_embed(list(grid), dim=dim)  # L x dim
        # prefix tokens get a zero position, as in MAE
        pos = torch.cat([torch.zeros(num_prefix_tokens, dim), pos], dim=0).unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encoder tokens (prefix + visible) -> B x L x (p*p*C) predictions for every patch."""
        x = self.embed(tokens)
        p = self.num_prefix_tokens
        prefix, visible = x[:, :p], x[:, p:]
        num_patches = masking.restore.shape[1]
        fill = self.mask_token.expand(x.shape[0], num_patches - visible.shape[1], -1).to(x.dtype)
        shuffled = torch.cat([visible, fill], dim=1)
        index = masking.restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.cat([prefix, shuffled.gather(1, index)], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, p:])
