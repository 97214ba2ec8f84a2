"""MedMIX's training-only loss terms over the fusion network's outputs (docs/papers/medmix.md):
the auxiliary per-input heads and the distillation of each input's fused embedding into its
training-only teacher's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from midol.fusion.patient_features import PatientFeatures
from midol.losses.distill import cosine_distill_loss
from midol.models.medmix_net import NetOutput


def aux_task_loss(out: NetOutput, present: torch.Tensor, target: torch.Tensor, input_names: Sequence[str],
                  task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean over inputs of the task loss of each input's auxiliary head on the samples that
    have the input (inputs no sample has are left out)."""
    losses = []
    for m, name in enumerate(input_names):
        rows = present[:, m]
        if bool(rows.any()):
            losses.append(task_loss(out.aux_logits[name][rows], target[rows]))
    return torch.stack(losses).mean()


def teacher_distill_loss(out: NetOutput, present: torch.Tensor, index: torch.Tensor,
                         input_names: Sequence[str], projections: nn.ModuleDict,
                         features: PatientFeatures) -> torch.Tensor:
    """``mean (1 - cos(P_m z_m, t_m))`` over the present inputs that have a teacher embedding
    (midol's design; MedMIX: a large teacher used only in training)."""
    students, teachers, masks = [], [], []
    for m, name in enumerate(input_names):
        if name not in projections:
            continue
        students.append(projections[name](out.z[:, m]))
        teacher, ok = features.teacher_rows(name, index, out.z.device)
        teachers.append(teacher)
        masks.append(present[:, m] & ok.to(present.device))
    width = {s.shape[-1] for s in students}
    if len(width) == 1:
        return cosine_distill_loss(torch.stack(students, 1), torch.stack(teachers, 1),
                                   torch.stack(masks, 1))
    # teachers of different widths: the same per-entry mean, one input at a time
    total = sum(cosine_distill_loss(s, t, k) * k.sum() for s, t, k in zip(students, teachers, masks, strict=True))
    return total / torch.stack(masks).sum().clamp_min(1)
