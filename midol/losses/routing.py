"""Routing-consistency loss L_route (M-IDoL Eq. 15, docs/papers/m-idol.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from midol.losses.sinkhorn import SinkhornImpl, log_balanced_routing
from midol.losses.views import check_views, count_cross_view_pairs, sum_over_cross_view_pairs

RouteForm = Literal["student_weighted", "teacher_target"]


def teacher_routing_log_probs(
    teacher_logits: Sequence[torch.Tensor],
    teacher_temp: float = 0.04,
    eps: float = 0.05,
    iters: int = 3,
    impl: SinkhornImpl = "swav",
) -> torch.Tensor:
    """log a_T for every teacher view: Sinkhorn-Knopp on ``logits / teacher_temp``, applied to
    each view separately (``impl``: SwAV's exact balancing or the authors' code's variant).
    Returns Mt x B x N (float32, no gradient)."""
    check_views("teacher_logits", teacher_logits)
    return torch.stack([log_balanced_routing(t / teacher_temp, eps, iters, impl)
                        for t in teacher_logits])


def routing_cross_entropy(
    student_logits: Sequence[torch.Tensor],
    teacher_log_probs: torch.Tensor,
    student_temp: float = 0.1,
    form: RouteForm = "student_weighted",
) -> torch.Tensor:
    """Eq. 15 given the teacher's balanced routing (log a_T, Mt x B x N).

    ``student_weighted`` (default, the authors' code): ``-sum_i a_S log a_T``; the paper prints
    Eq. 15 without the minus sign. ``teacher_target`` (SwAV style): ``-sum_i a_T log a_S``.
    The mean runs over images and over view pairs (j, g), j != g.
    """
    check_views("student_logits", student_logits)
    if form not in ("student_weighted", "teacher_target"):
        raise ValueError(f"unknown routing loss form {form!r}")
    pairs = count_cross_view_pairs(len(student_logits), teacher_log_probs.shape[0], "routing loss")
    # Autocast off: it would run the einsums in bf16 despite the .float() casts.
    with torch.autocast(device_type=teacher_log_probs.device.type, enabled=False):
        log_a_t = teacher_log_probs.float()
        log_a_s = torch.stack(
            [(s.float() / student_temp).log_softmax(dim=-1) for s in student_logits]
        )
        batch = log_a_s.shape[1]
        if form == "student_weighted":
            cross = -torch.einsum("jbn,gbn->jg", log_a_s.exp(), log_a_t)
        else:
            cross = -torch.einsum("gbn,jbn->jg", log_a_t.exp(), log_a_s)
        return sum_over_cross_view_pairs(cross) / (pairs * batch)


def routing_consistency_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    eps: float = 0.05,
    iters: int = 3,
    form: RouteForm = "student_weighted",
) -> torch.Tensor:
    """L_route (M-IDoL Eq. 15) from per-view router logits.

    a_S = softmax(student / student_temp); a_T = Sinkhorn-Knopp(teacher / teacher_temp) per
    teacher view, without gradient. Student view k and teacher view k are the same crop.
    """
    log_a_t = teacher_routing_log_probs(teacher_logits, teacher_temp, eps, iters)
    return routing_cross_entropy(student_logits, log_a_t, student_temp, form)
