"""View-pair bookkeeping shared by the cross-view losses (L_route, DINO-CE, InfoNCE).

Student view k and teacher view k are the same crop, so a loss sums over the pairs (j, g) with
j != g. Counts are taken on the host: the losses then need no boolean indexing (a device-to-host
sync on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cross_view_mask(num_student: int, num_teacher: int, device: torch.device | None = None) -> torch.Tensor:
    """Ms x Mt boolean mask of the view pairs (j, g) with j != g."""
    return ~torch.eye(num_student, num_teacher, dtype=torch.bool, device=device)


def count_cross_view_pairs(num_student: int, num_teacher: int, name: str) -> int:
    """Number of view pairs (j, g) with j != g; ``ValueError`` naming ``name`` when there is none."""
    count = num_student * num_teacher - min(num_student, num_teacher)
    if count == 0:
        raise ValueError(
            f"{name} needs a pair of different views; got {num_student} student and "
            f"{num_teacher} teacher view(s)"
        )
    return count


def sum_over_cross_view_pairs(cross: torch.Tensor) -> torch.Tensor:
    """Sum of an Ms x Mt matrix over the entries j != g (the diagonal pairs a crop with itself)."""
    same_crop = ~cross_view_mask(cross.shape[0], cross.shape[1], cross.device)
    return cross.masked_fill(same_crop, 0.0).sum()


def check_views(name: str, views: Sequence[torch.Tensor]) -> None:
    """``ValueError`` unless ``views`` is a non-empty list of equal-shape B x N tensors."""
    if len(views) == 0:
        raise ValueError(f"{name}: got no views")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1 or views[0].ndim != 2:
        raise ValueError(f"{name}: every view must be a B x N tensor of one shape, got {shapes}")
