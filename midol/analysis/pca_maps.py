"""PCA feature maps (as in DINOv2's demo): the first 3 principal components of a backbone's
last-stage patch features, shown as RGB over the image, with the background thresholded away.

Steps (:func:`pca_rgb`): the patch features of all images are pooled; a first PCA over all
patches, its component ``threshold_component`` (default the first) thresholded (``> threshold``,
or above its ``percentile``-th percentile), separates foreground from background; a second PCA
over the foreground patches only, its first 3 components min-max scaled to [0, 1] over the
foreground, gives the RGB colour of each foreground patch; background patches are black.
Principal directions have no sign of their own: each is made to have its largest-magnitude
loading positive, so the maps are deterministic (which side of the threshold is "foreground" is
still a property of the features: pass ``invert=True`` when it picks the background).

``midol analyze CKPT --data CFG --out DIR --pca-maps 8`` writes ``pca_maps.png`` (and the
other ``--format`` files). From Python::

    from midol.analysis.pca_maps import patch_features, pca_rgb, pca_figure
    from midol.analysis.plotting import save_figure

    backbone = next(iter(module.export_modules().values())).module  # M-IDoL: teacher backbone
    feats = patch_features(backbone, module.normalize(images))      # images: uint8 B x 3 x H x W
    rgb, foreground = pca_rgb(feats, threshold=0.0)                  # B x h x w x 3, B x h x w
    save_figure(pca_figure(images.numpy(), rgb, foreground), "pca_maps.png")

:func:`patch_features` reads timm's ``forward_features``: a Swin's NHWC map (or a CNN's NCHW
one) as it is, a ViT's tokens without its prefix (class, register) tokens, reshaped to the
patch grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from midol.analysis.plotting import new_figure


def _patch_grid(backbone: nn.Module, n: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``h x w`` grid of ``n`` ViT patch tokens: from the patch embedding's patch size and
    the input size, else its fixed ``grid_size``, else a square."""
    embed = getattr(backbone, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (image_hw[0] // ph, image_hw[1] // pw)
        if grid[0] * grid[1] == n:
            return grid
    fixed = getattr(embed, "grid_size", None)
    if fixed is not None and int(fixed[0]) * int(fixed[1]) == n:
        return int(fixed[0]), int(fixed[1])
    side = math.isqrt(n)
    if side * side == n:
        return side, side
    raise ValueError(f"cannot arrange {n} patch tokens of a {image_hw} input on a grid")


@torch.no_grad()
def patch_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-stage patch features ``B x h x w x C`` (float, on the backbone's device) of
    normalised ``B x 3 x H x W`` images, through the backbone's ``forward_features`` in eval
    mode (restored afterwards). Swin (``output_fmt`` NHWC): the map as it is; NCHW maps (CNNs)
    permuted; ViT tokens ``B x (P + N) x C``: the ``num_prefix_tokens`` P (class/register
    tokens; without the attribute, 1 when the model has a ``cls_token``) dropped and the N
    patch tokens reshaped to the patch grid (the input size over the patch size)."""
    forward = getattr(backbone, "forward_features", None)
    if forward is None:
        raise ValueError(f"{type(backbone).__name__} has no forward_features: PCA maps need a timm backbone")
    was_training = backbone.training
    backbone.eval()
    try:
        out = forward(images)
    finally:
        backbone.train(was_training)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if out.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC":
            return out.float()
        return out.permute(0, 2, 3, 1).float()
    if out.ndim != 3:
        raise ValueError(f"forward_features gave {tuple(out.shape)}: expected a 4-D map or B x tokens x C")
    prefix = getattr(backbone, "num_prefix_tokens", None)
    if prefix is None:
        prefix = 1 if getattr(backbone, "cls_token", None) is not None else 0
    tokens = out[:, int(prefix):]
    h, w = _patch_grid(backbone, tokens.shape[1], (int(images.shape[-2]), int(images.shape[-1])))
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2]).float()


def principal_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` principal directions ``C x k`` of the rows of ``x`` (centred here; an
    SVD in float64), each signed so that its largest-magnitude loading is positive."""
    centred = x.double() - x.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    v = vh[:k].T
    peak = v.abs().argmax(dim=0)
    sign = torch.sign(v[peak, torch.arange(v.shape[1])])
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def pca_rgb(features: torch.Tensor | np.ndarray, threshold_component: int = 0, threshold: float = 0.0,
            percentile: float | None = None, background: bool = True,
            invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """DINOv2-style PCA colours of patch features ``B x h x w x C`` (all images together).

    With ``background``: the patches whose score on principal component
    ``threshold_component`` of all patches exceeds ``threshold`` (or, when ``percentile`` is
    given, that percentile of the scores) are foreground (``invert``: those at or below it);
    without, every patch is. The first 3 principal components of the foreground patches,
    each min-max scaled to [0, 1] over the foreground, are the RGB channels; background is 0.
    Returns ``rgb`` float32 ``B x h x w x 3`` and the foreground mask bool ``B x h x w``."""
    feats = torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features)
    feats = feats.detach().cpu().double()
    if feats.ndim != 4:
        raise ValueError(f"features must be B x h x w x C, got {tuple(feats.shape)}")
    b, h, w, c = feats.shape
    flat = feats.reshape(-1, c)
    n = flat.shape[0]
    if background:
        if not 0 <= threshold_component < min(n, c):
            raise ValueError(f"threshold_component {threshold_component} out of range for "
                             f"{n} patches of {c} features")
        v = principal_directions(flat, threshold_component + 1)[:, threshold_component]
        score = (flat - flat.mean(dim=0, keepdim=True)) @ v
        cut = float(np.percentile(score.numpy(), percentile)) if percentile is not None else threshold
        mask = score <= cut if invert else score > cut
    else:
        mask = torch.ones(n, dtype=torch.bool)
    rgb = torch.zeros(n, 3, dtype=torch.float64)
    fg = flat[mask]
    k = min(3, c, max(int(fg.shape[0]) - 1, 0))
    if k > 0:
        proj = (fg - fg.mean(dim=0, keepdim=True)) @ principal_directions(fg, k)
        low, high = proj.min(dim=0).values, proj.max(dim=0).values
        span = torch.where(high - low > 0, high - low, torch.ones_like(high))
        rgb[mask, :k] = (proj - low) / span
    return (rgb.reshape(b, h, w, 3).numpy().astype(np.float32),
            mask.reshape(b, h, w).numpy())


def pca_figure(images: np.ndarray, rgb: np.ndarray, foreground: np.ndarray | None = None,
               titles: list[str] | None = None,
               heading: str = "PCA of the last-stage patch features") -> Figure:
    """Three rows (image; PCA map; map over the image, background transparent) and one column
    per image; 1.9 x 6.0 inches per column. ``images`` are uint8 ``B x 3 x H x W``, ``rgb`` the
    ``B x h x w x 3`` map of :func:`pca_rgb` (patch grid stretched over the image, nearest)."""
    b = len(images)
    if b == 0 or len(rgb) != b or (titles is not None and len(titles) != b):
        raise ValueError("need as many maps (and titles) as images (at least one)")
    if foreground is None:
        foreground = np.ones(rgb.shape[:3], dtype=bool)
    fig = new_figure(max(1.9 * b, 4.0), 6.0)
    fig.suptitle(heading, fontsize=10)
    for i in range(b):
        image = np.transpose(images[i], (1, 2, 0))
        height, width = image.shape[:2]
        extent = (0, width, height, 0)
        top = fig.add_subplot(3, b, i + 1)
        top.imshow(image, extent=extent)
        if titles is not None:
            top.set_title(titles[i], fontsize=7)
        middle = fig.add_subplot(3, b, b + i + 1)
        middle.imshow(rgb[i], extent=extent, interpolation="nearest")
        bottom = fig.add_subplot(3, b, 2 * b + i + 1)
        bottom.imshow(image, extent=extent)
        rgba = np.concatenate([rgb[i], 0.6 * foreground[i][..., None].astype(np.float32)], axis=-1)
        bottom.imshow(rgba, extent=extent, interpolation="nearest")
        for ax in (top, middle, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
    return fig
