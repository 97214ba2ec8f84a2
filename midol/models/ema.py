"""The momentum teacher's update: T <- m T + (1 - m) S (M-IDoL Eq. 22, docs/papers/m-idol.md);
the schedule of m is :func:`midol.optim.schedules.momentum_at`."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place ``teacher = momentum * teacher + (1 - momentum) * student`` over all parameters,
    as one fused multi-tensor op."""
    t_params: list[torch.Tensor] = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
