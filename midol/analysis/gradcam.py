"""Grad-CAM maps of a backbone stage (paper Fig. 8): which regions drive a chosen score."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from midol.analysis.plotting import new_figure

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _vit_grid(backbone: nn.Module) -> tuple[int, int] | None:
    """The patch grid of a timm ViT (``blocks`` of tokens), else None."""
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if getattr(backbone, "blocks", None) is None or grid is None:
        return None
    return int(grid[0]), int(grid[1])


def stage_module(backbone: nn.Module, stage: int = -1) -> nn.Module:
    """Stage ``stage`` of a timm hierarchical backbone (Swin ``layers``, ConvNeXt ``stages``);
    for a plain ViT the first norm of block ``stage``: its tokens still feed the block's
    attention, so a class-token or pooled score has a gradient on every patch token there
    (after the last block only the pooled tokens have one; pytorch-grad-cam's ViT recipe)."""
    stages = getattr(backbone, "layers", None)
    if stages is None:
        stages = getattr(backbone, "stages", None)
    vit = stages is None and _vit_grid(backbone) is not None
    if vit:
        stages = backbone.blocks
    if not isinstance(stages, (nn.Sequential, nn.ModuleList)):
        raise ValueError(
            f"{type(backbone).__name__} has no 'layers'/'stages'/'blocks' sequence: Grad-CAM "
            "needs a spatial feature map (Swin, ConvNeXt, ViT, ...)"
        )
    if not -len(stages) <= stage < len(stages):
        raise ValueError(f"stage {stage} out of range for {len(stages)} stages")
    block: nn.Module = stages[stage]
    if not vit:
        return block
    norm = getattr(block, "norm1", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"ViT block {stage} has no norm1 (not a timm ViT block)")
    return norm


def _tokens_to_map(tokens: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """ViT tokens ``B x (prefix + gh*gw) x C`` -> ``B x C x gh x gw`` (class/register tokens dropped)."""
    grid = _vit_grid(backbone)
    if grid is None or tokens.ndim != 3:
        return tokens
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    if tokens.shape[1] != prefix + grid[0] * grid[1]:
        raise ValueError(f"ViT stage has {tokens.shape[1]} tokens, expected {prefix} + {grid[0]}x{grid[1]}")
    return tokens[:, prefix:].reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)


def grad_cam(backbone: nn.Module, images: torch.Tensor, score_fn: ScoreFn, stage: int = -1) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of the scalar ``score_fn(pooled features)`` per image:
    ``ReLU(sum_c alpha_c A_c)`` with ``alpha_c`` the spatial mean of ``d score / d A_c`` over the
    stage's feature map ``A`` (Swin: NHWC, read by the backbone's ``output_fmt``; ViT: the
    patch tokens of block ``stage``'s first norm, on the patch grid), upsampled
    bilinearly to the input size and scaled to [0, 1] per image (all-zero when the score has
    no positive evidence). ``images`` are normalised ``B x 3 x H x W``; weights are not changed
    and need no gradient.

    Kept over the ``grad-cam`` package (measured, ``experiments/results/
    library_choices_2026-12-08.md``): the same maps up to the per-image scaling (Pearson 1.0000
    on real images, Swin and ViT), 2-4x faster on CPU at 224 px because the gradient stops at
    the hooked stage (the package back-propagates into every weight and zeroes the model's
    gradients)."""
    target = stage_module(backbone, stage)
    captured: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda m, i, o: captured.append(o))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # gradients flow through frozen weights
            scores = score_fn(backbone(x))
            if scores.shape != (images.shape[0],):
                raise ValueError(f"score_fn must return one score per image, got {tuple(scores.shape)}")
            activation = captured[-1]
            (grads,) = torch.autograd.grad(scores.sum(), activation)
    finally:
        handle.remove()
        backbone.train(was_training)
    if activation.ndim == 3:  # ViT tokens
        activation, grads = _tokens_to_map(activation, backbone), _tokens_to_map(grads, backbone)
    elif getattr(backbone, "output_fmt", "NCHW") == "NHWC":
        activation, grads = activation.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
    if activation.ndim != 4:
        raise ValueError(f"stage output must be a 4-D feature map, got {tuple(activation.shape)}")
    grid = tuple(activation.shape[-2:])
    if min(grid) < 7:
        warnings.warn(
            f"Grad-CAM grid is {grid[0]}x{grid[1]} (stage {stage} of a {tuple(images.shape[-2:])} "
            "input): too coarse to localise anything; use an earlier stage (--gradcam-stage -2) "
            "or larger images", stacklevel=2)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).clamp(0, 1).cpu().numpy()


def feature_norm_score(pooled: torch.Tensor) -> torch.Tensor:
    """L2 norm of the pooled feature: a label-free target for a pre-trained-only backbone."""
    return pooled.norm(dim=-1)


def top_logit_score(head: nn.Module) -> ScoreFn:
    """The largest logit of ``head`` (a router's top expert, a classifier's predicted class)."""
    return lambda pooled: head(pooled).max(dim=-1).values


def gradcam_figure(images: np.ndarray, cams: np.ndarray, titles: list[str], heading: str) -> Figure:
    """Two rows (image; image with the map over it) and one column per image; 1.9 x 4.2 inches
    per column. ``images`` are uint8 ``B x 3 x H x W``. Maps in the perceptually uniform
    ``inferno`` colour map (jet's bands read as edges that are not there), with a colour bar."""
    b = len(images)
    if b == 0 or len(cams) != b or len(titles) != b:
        raise ValueError("need as many maps and titles as images (at least one)")
    fig = new_figure(max(1.9 * b, 4.0), 4.2)
    fig.suptitle(heading, fontsize=10)
    for i in range(b):
        rgb = np.transpose(images[i], (1, 2, 0))
        top = fig.add_subplot(2, b, i + 1)
        top.imshow(rgb)
        top.set_title(titles[i], fontsize=7)
        bottom = fig.add_subplot(2, b, b + i + 1)
        bottom.imshow(rgb)
        overlay = bottom.imshow(cams[i], cmap="inferno", alpha=0.5, vmin=0, vmax=1)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(overlay, ax=fig.axes[-1], shrink=0.8, label="Grad-CAM (per image, 0-1)")
    return fig
