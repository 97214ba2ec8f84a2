"""Training-only distillation terms of MedMIX.

midol's design (MedMIX paper: a large teacher used only in training; Cho, Qiu, Li 2026,
arXiv 2605.16639, a reconstruction from the abstract; docs/papers/medmix.md, 'Training
loss'): ``L = L_task + lambda_f * cosine_distill_loss(P(z), t, present) [+ lambda_kd *
logit_kl_loss(...)]``. The teacher is always detached, so the deployed student carries no
teacher cost. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the present (b, m) of ``1 - cos(student_bm, stopgrad(teacher_bm))``.

    midol's design (MedMIX paper: a large teacher used only in training).

    Args:
        student: B x M x D projected student embeddings ``P_m z_m`` (or B x D).
        teacher: same shape, teacher embeddings ``t_m``; never receives a gradient.
        mask: B x M (or B) bool, True where input m of sample b is present and has a teacher
            embedding. Absent entries may hold NaN or garbage in either tensor: they are
            replaced before any arithmetic and add nothing to the loss or its gradient.

    A batch with no present entry gives a zero that keeps the graph (a legal batch: e.g. only
    inputs without a teacher), not an error. Computed in float32 at least.
    """
    if student.shape != teacher.shape or student.ndim < 2:
        raise ValueError(
            f"student and teacher must share a ... x D shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if mask is None:
        mask = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)
    if mask.dtype != torch.bool or mask.shape != student.shape[:-1]:
        raise ValueError(f"mask must be bool of shape {tuple(student.shape[:-1])}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=student.device)
    keep = mask.unsqueeze(-1)
    s = torch.where(keep, student.to(dtype), zero)
    t = torch.where(keep, teacher.detach().to(dtype), zero)
    cos = F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    per_entry = torch.where(mask, 1.0 - cos, zero)
    return per_entry.sum() / mask.sum().clamp_min(1).to(dtype)


def logit_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    multilabel: bool,
) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` on temperature-scaled logits, teacher detached.

    midol's design (MedMIX paper: a large teacher used only in training); the ``T^2`` keeps
    gradient scale independent of ``T`` (Hinton et al. 2015).

    * ``multilabel=True``: a binary KL per label between ``sigmoid(t / T)`` and
      ``sigmoid(s / T)``, averaged over samples and labels;
    * ``multilabel=False``: the KL between ``softmax(t / T)`` and ``softmax(s / T)`` over
      classes, averaged over samples.

    Args:
        student_logits: B x L (labels or classes).
        teacher_logits: B x L.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"logits must share a B x L shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.detach().to(dtype) / temperature
    if multilabel:
        # log sigmoid of +-x gives log p and log(1 - p) without overflow at large logits.
        p_t = torch.sigmoid(t)
        kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (
            F.logsigmoid(-t) - F.logsigmoid(-s)
        )
        loss = kl.mean()
    else:
        log_p_t = F.log_softmax(t, dim=-1)
        log_p_s = F.log_softmax(s, dim=-1)
        loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    return loss * temperature**2
