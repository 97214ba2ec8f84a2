"""MAE's pixel targets and reconstruction loss (He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners"), DEX's L_MAE (docs/papers/dex.md). Plain PyTorch, no Lightning."""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B x C x H x W images -> B x L x (p * p * C) patches, row-major over the patch grid and
    (row, column, channel) inside a patch: MAE's ordering, which its pixel targets use."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: B x L x (p * p * C) -> B x C x H x W."""
    b, n, pc = patches.shape
    p = patch_size
    h, w = height // p, width // p
    if h * w != n or pc % (p * p):
        raise ValueError(f"{n} patches of {pc} values do not tile {height}x{width} with p={p}")
    c = pc // (p * p)
    x = patches.reshape(b, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)


def masked_mae_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MAE reconstruction loss (He et al. 2022), DEX's L_MAE: mean squared error per patch,
    averaged over the masked patches only.

    Args:
        pred: B x L x P decoder predictions.
        target_patches: B x L x P pixels, from :func:`patchify`.
        mask: B x L, 1 where the patch was removed (the loss counts these), 0 where visible.
        norm_pix: normalise each target patch by its own mean and (unbiased) variance,
            ``(t - mean) / sqrt(var + 1e-6)``, as MAE's best setting.
    """
    if pred.shape != target_patches.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"expected B x L x P pred and target and a B x L mask, got {tuple(pred.shape)}, "
            f"{tuple(target_patches.shape)} and {tuple(mask.shape)}"
        )
    target = target_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    # clamp: a batch with nothing masked gives 0, not NaN
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
