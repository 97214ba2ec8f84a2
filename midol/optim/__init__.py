"""Optimisation helpers shared by every method and task: parameter groups, layer-wise lr decay,
gradient clipping and step-indexed schedules (plain PyTorch, no Lightning)."""

from midol.optim.clipping import clip_grad_norm_per_param
from midol.optim.layer_decay import layer_decay_param_groups, layer_ids
from midol.optim.param_groups import decay_groups, set_lr_and_wd
from midol.optim.schedules import (
    cosine_schedule,
    linear_warmup,
    momentum_at,
    poly_schedule,
    warmup_cosine_schedule,
)

__all__ = [
    "clip_grad_norm_per_param",
    "cosine_schedule",
    "decay_groups",
    "layer_decay_param_groups",
    "layer_ids",
    "linear_warmup",
    "momentum_at",
    "poly_schedule",
    "set_lr_and_wd",
    "warmup_cosine_schedule",
]
