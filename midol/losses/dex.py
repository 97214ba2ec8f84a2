"""DEX losses (He, You, Li 2026, "Learning Emergent Modular Representations in Multi-modality
Medical Vision Foundation Models"): balance, coherence and the block weights; formulas in
docs/papers/dex.md. Plain PyTorch, no Lightning. The MAE reconstruction loss DEX pre-trains with
is in :mod:`midol.losses.mae`, the director's group EMA in :mod:`midol.models.ema`.

The total pre-training loss is ``L_MAE + lambda_co * L_co + lambda_bal * L_bal``; the per-block
terms are combined over blocks with :func:`weighted_layer_mean`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from midol.legacy import module_getattr

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


def layer_weights(num_layers: int, blocks: Sequence[int] | None = None) -> torch.Tensor:
    """DEX block weights ``alpha_l = 1 / (L - l + 1)``, l = 1..L (docs/papers/dex.md): the last
    block gets 1, the first 1/L, so deeper blocks count more in L_co. ``blocks`` (0-based
    indices into the L blocks, e.g. the ViT blocks that hold DEX layers) picks their weights;
    the only home of this formula (``DEX.block_weights`` calls it)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    weights = 1.0 / torch.arange(num_layers, 0, -1, dtype=torch.float32)
    if blocks is None:
        return weights
    if any(not 0 <= b < num_layers for b in blocks):
        raise ValueError(f"blocks must lie in [0, {num_layers}), got {list(blocks)}")
    return weights[list(blocks)]


def weighted_layer_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l alpha_l * v_l / L`` over the blocks' scalar losses (DEX: weighted, then averaged
    over the L blocks), ``values`` ordered from the first block to the last."""
    if len(values) == 0:
        raise ValueError("weighted_layer_mean needs at least one block's value")
    stacked = torch.stack([v.float() for v in values])
    weights = layer_weights(len(values)).to(stacked.device)
    return (weights * stacked).sum() / len(values)


__getattr__ = module_getattr("midol.losses.dex")  # group_ema_, patchify, ... (moved in 0.2)
