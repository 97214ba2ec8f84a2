"""Intra-modality contrastive loss L_cst: InfoNCE inside each expert's subspace
(M-IDoL Eq. 19-20, docs/papers/m-idol.md)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from midol.losses.views import cross_view_mask
from midol.utils.dist import all_reduce_sum, gather_no_grad, gather_no_grad_as, world_size


def _check_inputs(
    student: torch.Tensor, teacher: torch.Tensor, assignment: torch.Tensor, num_experts: int
) -> None:
    if student.ndim != 3 or teacher.ndim != 3:
        raise ValueError(
            "expert_infonce_loss expects student Ms x B x D and teacher Mt x B x D, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[1:] != teacher.shape[1:]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} disagree on B x D"
        )
    if assignment.shape != (student.shape[1],):
        raise ValueError(
            f"assignment must have shape ({student.shape[1]},), got {tuple(assignment.shape)}"
        )
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if assignment.numel() and (assignment.min() < 0 or assignment.max() >= num_experts):
        raise ValueError(f"assignment values must lie in [0, {num_experts}), got {assignment}")


def expert_infonce_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    assignment: torch.Tensor,
    num_experts: int,
    temperature: float = 0.04,
    check_inputs: bool = True,
    expert_mean: Literal["nonempty", "all"] = "nonempty",
    gather_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """L_cst (M-IDoL Eq. 19-20) with ``s(u, v) = exp(cos(u, v) / temperature)``.

    For view j of image b routed to expert i, the positives are the teacher views k != j of the
    same image; the denominator runs over every image beta of B_i (views k != j). Each expert's
    term is divided by |B_i| x Ms. ``expert_mean="nonempty"`` (default) averages over the
    experts that received at least one image; ``"all"`` divides the sum by N as Eq. 20 prints
    it (an empty expert then adds 0). An empty expert never produces NaN.

    Args:
        student: Ms x B x D student representations (gradient flows here).
        teacher: Mt x B x D teacher representations (treated as constants).
        assignment: length-B expert index of every image (the teacher's balanced routing).
        num_experts: N.
        temperature: tau of Eq. 19.
        check_inputs: validate shapes and index range (the range check syncs with the device,
            so the training step turns it off).
        expert_mean: how Eq. 20 averages the per-expert terms (see above).
        gather_dtype: the dtype other ranks' teacher vectors travel in under DDP
            (``torch.bfloat16`` halves the all-gather: Mt x Bg x D floats per step, ~2 GiB at
            64 GPUs in fp32); this rank's own vectors stay float32, and the logits are computed
            in float32 either way. No effect on one process.

    Under ``torch.distributed`` the teacher representations and assignments are gathered from
    every rank and |B_i| is counted over the global batch; the local value is scaled so that
    its mean over ranks (what DDP averages) equals the loss of one process on the global batch.
    """
    if gather_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"gather_dtype must be float32, bfloat16 or float16, got {gather_dtype}")
    if expert_mean not in ("nonempty", "all"):
        raise ValueError(f"expert_mean must be 'nonempty' or 'all', got {expert_mean!r}")
    if check_inputs:
        _check_inputs(student, teacher, assignment, num_experts)
    num_student = student.shape[0]
    if teacher.shape[0] < 2:  # student view 0 would pair only with its own crop
        raise ValueError(
            f"expert_infonce_loss: with {num_student} student and {teacher.shape[0]} teacher "
            "view(s) some student view has no other teacher view to pair with"
        )
    # Autocast would run the einsums below in bf16 despite the .float() casts (its op lists
    # re-cast their inputs); the logits are sharpened by 1/temperature, so stay in float32.
    with torch.autocast(device_type=student.device.type, enabled=False):
        views = cross_view_mask(num_student, teacher.shape[0], student.device)
        x = F.normalize(student.float(), dim=-1)
        y = F.normalize(teacher.detach().float(), dim=-1)
        y_all = gather_no_grad_as(y.transpose(0, 1).contiguous(), gather_dtype).transpose(0, 1)  # Mt x Bg x D
        assignment_all = gather_no_grad(assignment)
        not_same_view = ~views[:, None, :, None]  # Ms x 1 x Mt x 1

        # Denominator of Eq. 19: every image of the same expert, teacher views k != j.
        logits = torch.einsum("jbd,kcd->jbkc", x, y_all) / temperature  # Ms x B x Mt x Bg
        other_expert = (assignment[:, None] != assignment_all[None, :])[None, :, None, :]
        denominator = logits.masked_fill(not_same_view | other_expert, float("-inf"))
        denominator = denominator.flatten(2).logsumexp(dim=2)  # Ms x B
        # Numerator: the same image's teacher views k != j.
        positives = torch.einsum("jbd,kbd->jbk", x, y) / temperature
        numerator = positives.masked_fill(~views[:, None, :], float("-inf")).logsumexp(dim=2)

        per_image = (numerator - denominator).sum(dim=0)  # sum over student views j
        local_sums = per_image.new_zeros(num_experts).index_add_(0, assignment, per_image)
        # index_add_, not bincount, and no boolean indexing: both read values back to the host
        local_counts = per_image.new_zeros(num_experts).index_add_(0, assignment, torch.ones_like(per_image))
        counts = all_reduce_sum(local_counts.detach())
        nonempty = counts > 0
        # an expert with no image has local_sums = 0, so it adds 0 to the sum
        per_expert = -local_sums / (counts.clamp(min=1) * num_student)
        experts = nonempty.sum().clamp(min=1) if expert_mean == "nonempty" else num_experts
        return per_expert.sum() / experts * world_size()
