"""Optimiser parameter groups (decay / no decay) and per-step lr and weight-decay updates."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def decay_groups(modules: Iterable[nn.Module]) -> list[dict]:
    """Two AdamW groups: weights with decay, and biases/norm parameters (ndim <= 1) without,
    as in DINO. Frozen parameters are left out. Group key ``apply_wd`` marks the first."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
    ]


def set_lr_and_wd(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay
