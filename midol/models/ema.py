"""Exponential moving averages of weights: the momentum teacher's update T <- m T + (1 - m) S
(M-IDoL Eq. 22, docs/papers/m-idol.md; the schedule of m is
:func:`midol.optim.schedules.momentum_at`) and DEX's group EMA of the experts into the director
(docs/papers/dex.md)."""

from __future__ import annotations

from collections.abc import Sequence

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


@torch.no_grad()
def group_ema_(
    director: nn.Module, experts: Sequence[nn.Module], omega: torch.Tensor, momentum: float,
    sync_free: bool | None = None,
) -> None:
    """DEX group EMA, in place: ``theta_D <- m * theta_D + (1 - m) * sum_r Omega_r * theta_E_r``
    parameter by parameter, with ``Omega`` (sums to 1) the experts' share of the batch's gate
    mass; an expert no image chose (``Omega_r = 0``) contributes nothing.

    ``sync_free`` (default: when ``omega`` is on a GPU): the shares stay on the device and every
    expert is added with its share as a tensor factor, so the step never waits for the GPU
    (issue 30); otherwise the E shares are read back once and experts with share 0 are skipped
    (fewer adds on a CPU). Both give the same result to float rounding (tested).
    """
    if omega.shape != (len(experts),):
        raise ValueError(f"omega must have shape ({len(experts)},), got {tuple(omega.shape)}")
    d_params = list(director.parameters())
    e_params = [list(e.parameters()) for e in experts]
    if any(len(p) != len(d_params) for p in e_params):
        raise ValueError("director and experts must have the same parameters")
    if sync_free is None:
        sync_free = omega.is_cuda
    for p in d_params:
        p.mul_(momentum)
    if sync_free:
        weights = omega.detach() * (1.0 - momentum)
        for r, params in enumerate(e_params):
            for p_d, p_e in zip(d_params, params):
                p_d.addcmul_(p_e.to(p_d.dtype), weights[r].to(p_d.dtype))  # fused: no temporary
        return
    # One read-back of E numbers, so experts with zero share are skipped and the update needs
    # no E-fold stacked copy of every weight.
    shares = omega.detach().double().tolist()
    for share, params in zip(shares, e_params):
        if share == 0.0:
            continue
        for p_d, p_e in zip(d_params, params):
            p_d.add_(p_e.to(p_d.dtype), alpha=(1.0 - momentum) * share)
