"""The authors' L_cst variant: DINO's cross-entropy between the centred, sharpened teacher
output and the student output over the head's out_dim (docs/papers/m-idol.md, "Authors' code
variant of L_cst")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from midol.losses.views import count_cross_view_pairs, sum_over_cross_view_pairs
from midol.utils.dist import all_reduce_sum, world_size


def dino_cross_entropy(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Mean over view pairs (j, g), j != g, and images of
    ``-sum_d softmax((t_g - center) / teacher_temp)_d * log_softmax(s_j / student_temp)_d``."""
    if len(student_out) == 0 or len(teacher_out) == 0:
        raise ValueError("dino_cross_entropy needs at least one student and one teacher view")
    pairs = count_cross_view_pairs(len(student_out), len(teacher_out), "dino_cross_entropy")
    # At least float32: softmax over 65536 logits sharpened by 1/0.04 is not safe in bf16;
    # float64 inputs (gradient checks) stay float64, and the centre follows the inputs.
    dtype = torch.promote_types(torch.promote_types(teacher_out[0].dtype, student_out[0].dtype),
                                torch.float32)
    # ... and autocast off: it would run the einsum in bf16 whatever the dtype of its inputs.
    with torch.autocast(device_type=student_out[0].device.type, enabled=False):
        center = center.to(dtype)
        targets = torch.stack(
            [((t.detach().to(dtype) - center) / teacher_temp).softmax(dim=-1) for t in teacher_out]
        )
        log_probs = torch.stack(
            [(s.to(dtype) / student_temp).log_softmax(dim=-1) for s in student_out]
        )
        cross = -torch.einsum("gbd,jbd->jg", targets, log_probs)
        return sum_over_cross_view_pairs(cross) / (pairs * log_probs.shape[1])


class DINOLoss(nn.Module):
    """DINO cross-entropy with a centre kept as a buffer (so it is checkpointed and resumed).

    The centre is the momentum average of the teacher outputs, all-reduced over ranks; it is
    updated after the loss is computed with the previous centre, as in DINO.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1], got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.defer = False  # set by a method that commits after its finite check
        self._pending_center: torch.Tensor | None = None

    def forward(
        self,
        student_out: Sequence[torch.Tensor],
        teacher_out: Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        loss = dino_cross_entropy(
            student_out, teacher_out, self.center, self.student_temp, teacher_temp
        )
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """The EMA of the teacher outputs' batch mean (all ranks); with ``defer`` the new batch
        mean waits for :meth:`commit` (:mod:`midol.utils.deferred`)."""
        stacked = torch.cat([t.detach().to(self.center.dtype) for t in teacher_out])
        batch_center = all_reduce_sum(stacked.sum(dim=0, keepdim=True)) / (
            stacked.shape[0] * world_size()
        )
        if self.defer:
            self._pending_center = batch_center
        else:
            self._move_center(batch_center)

    def _move_center(self, batch_center: torch.Tensor) -> None:
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def commit(self) -> bool:
        pending, self._pending_center = self._pending_center, None
        if pending is None:
            return False
        self._move_center(pending)
        return True

    def discard(self) -> None:
        self._pending_center = None
