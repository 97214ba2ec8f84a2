"""DEX losses and the director's group EMA (He, You, Li 2026, "Learning Emergent Modular
Representations in Multi-modality Medical Vision Foundation Models"), plus the MAE
reconstruction loss DEX pre-trains with; formulas in docs/papers/dex.md. Plain PyTorch, no
Lightning.

The total pre-training loss is ``L_MAE + lambda_co * L_co + lambda_bal * L_bal``; the per-block
terms are combined over blocks with :func:`weighted_layer_mean`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

CoherenceForm = Literal["ce", "cosine"]


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """DEX load-balance term of one block: ``E * sum_e Pbar_e * stopgrad(Pbar_e)``.

    ``Pbar`` is the batch mean of the (noisy) routing probabilities before top-k. Equals 1 for
    uniform routing and E when every row picks the same expert. The stop-gradient on one factor
    halves the gradient of ``E * ||Pbar||^2``: d/dp_{b,e} = E * Pbar_e / B (authors' code).

    Args:
        probs: T x E routing probabilities (rows: images, or tokens with token routing).
    """
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected a non-empty T x E tensor, got {tuple(probs.shape)}")
    pbar = probs.float().mean(dim=0)
    return probs.shape[1] * (pbar * pbar.detach()).sum()


def coherence_loss(
    f_e: torch.Tensor,
    f_d: torch.Tensor,
    form: CoherenceForm = "ce",
    director_temperature: float = 0.5,
    expert_temperature: float = 1.0,
) -> torch.Tensor:
    """DEX expert-director coherence term of one block, L_co; the director side is detached.

    ``form="ce"`` (authors' code, the default): cross-entropy over the feature axis of every
    token, ``-sum_d softmax(f_D / 0.5)_d * log_softmax(f_E / 1.0)_d``, mean over batch and
    tokens. ``form="cosine"`` (DEX Eq. 7): ``1 - cos(f_E, f_D)`` over features, mean.
    Computed in float32 so bf16 activations do not round the softmax.

    Args:
        f_e: ... x D gated expert output of the block (the tensor the block adds to x).
        f_d: ... x D director output on the same input.
    """
    if f_e.shape != f_d.shape:
        raise ValueError(f"f_e and f_d differ in shape: {tuple(f_e.shape)} vs {tuple(f_d.shape)}")
    f_e, f_d = f_e.float(), f_d.detach().float()
    if form == "ce":
        target = F.softmax(f_d / director_temperature, dim=-1)
        return -(target * F.log_softmax(f_e / expert_temperature, dim=-1)).sum(dim=-1).mean()
    if form == "cosine":
        return (1.0 - F.cosine_similarity(f_e, f_d, dim=-1)).mean()
    raise ValueError(f"unknown coherence form {form!r}; expected 'ce' or 'cosine'")


def layer_weights(num_layers: int) -> torch.Tensor:
    """DEX block weights ``alpha_l = 1 / (L - l + 1)``, l = 1..L: the last block gets 1, the
    first 1/L, so deeper blocks count more in L_co."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return 1.0 / torch.arange(num_layers, 0, -1, dtype=torch.float32)


def weighted_layer_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l alpha_l * v_l / L`` over the blocks' scalar losses (DEX: weighted, then averaged
    over the L blocks), ``values`` ordered from the first block to the last."""
    if len(values) == 0:
        raise ValueError("weighted_layer_mean needs at least one block's value")
    stacked = torch.stack([v.float() for v in values])
    weights = layer_weights(len(values)).to(stacked.device)
    return (weights * stacked).sum() / len(values)


@torch.no_grad()
def group_ema_(
    director: nn.Module, experts: Sequence[nn.Module], omega: torch.Tensor, momentum: float
) -> None:
    """DEX group EMA, in place: ``theta_D <- m * theta_D + (1 - m) * sum_r Omega_r * theta_E_r``
    parameter by parameter, with ``Omega`` (sums to 1) the experts' share of the batch's gate
    mass; an expert no image chose (``Omega_r = 0``) contributes nothing.
    """
    if omega.shape != (len(experts),):
        raise ValueError(f"omega must have shape ({len(experts)},), got {tuple(omega.shape)}")
    # One read-back of E numbers, so experts with zero share are skipped and the update needs
    # no E-fold stacked copy of every weight.
    shares = omega.detach().double().tolist()
    d_params = list(director.parameters())
    e_params = [list(e.parameters()) for e in experts]
    if any(len(p) != len(d_params) for p in e_params):
        raise ValueError("director and experts must have the same parameters")
    for p in d_params:
        p.mul_(momentum)
    for share, params in zip(shares, e_params):
        if share == 0.0:
            continue
        for p_d, p_e in zip(d_params, params):
            p_d.add_(p_e.to(p_d.dtype), alpha=(1.0 - momentum) * share)


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
