"""The momentum teacher: T <- m T + (1 - m) S (paper Eq. 22), m cosine-scheduled 0.996 -> 1."""

from __future__ import annotations

import torch
from torch import nn

from midol.utils.schedules import cosine_schedule


def momentum_at(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """Teacher momentum used for the update after optimiser step ``step`` (0-based)."""
    return cosine_schedule(step, total_steps, start, end)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place ``teacher = momentum * teacher + (1 - momentum) * student`` over all parameters,
    as one fused multi-tensor op."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
