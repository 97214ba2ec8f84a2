"""Helpers for ``test_losses_distributed.py``: shared inputs and the per-rank worker.

The worker runs in a process started by ``torch.multiprocessing.spawn``; it must live in an
importable module (not in the test file's local scope).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

WORLD_SIZE = 2
LOCAL_B = 6  # images per rank
N_EXPERTS = 5  # routing experts
MS, MT = 8, 2  # student / teacher views
D_REPR = 12  # InfoNCE representation size
D_OUT = 10  # DINO head size
DINO_MOMENTUM = 0.9
# Global expert assignment for the InfoNCE check (12 images, rank 0 holds 0-5, rank 1 6-11):
#   expert 0: images on both ranks; expert 1: only on rank 1; expert 2: one image (rank 0);
#   expert 3: no image at all; expert 4: only on rank 0.
ASSIGNMENT = [0, 2, 4, 0, 4, 0, 1, 0, 1, 1, 0, 1]


def make_inputs(seed: int = 1234) -> dict[str, object]:
    """Global (whole-batch) inputs, identical on every process."""
    g = torch.Generator().manual_seed(seed)
    B = WORLD_SIZE * LOCAL_B
    base = torch.randn(1, D_REPR, generator=g) + torch.randn(B, D_REPR, generator=g)
    return {
        # (a) Sinkhorn: moderate and very sharp (raw * 50 / 0.04) logits
        "sk_moderate": torch.randn(B, N_EXPERTS, generator=g),
        "sk_sharp": (torch.rand(B, N_EXPERTS, generator=g) * 2 - 1) * 50 / 0.04,
        # (b) DINO: two steps of teacher/student outputs
        "dino_student": [[torch.randn(B, D_OUT, generator=g) for _ in range(MS)] for _ in range(2)],
        "dino_teacher": [[torch.randn(B, D_OUT, generator=g) * 2 for _ in range(MT)] for _ in range(2)],
        # (c) InfoNCE
        "nce_student": base.unsqueeze(0) + 0.7 * torch.randn(MS, B, D_REPR, generator=g),
        "nce_teacher": base.unsqueeze(0) + 0.7 * torch.randn(MT, B, D_REPR, generator=g),
        "nce_assignment": torch.tensor(ASSIGNMENT, dtype=torch.long),
        # (d) routing
        "route_student": [torch.randn(B, N_EXPERTS, generator=g) for _ in range(MS)],
        "route_teacher": [torch.randn(B, N_EXPERTS, generator=g) * 0.1 for _ in range(MT)],
    }


def local_rows(x: torch.Tensor, rank: int, dim: int = 0) -> torch.Tensor:
    return x.narrow(dim, rank * LOCAL_B, LOCAL_B).clone()


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        from midol.losses import (
            DINOLoss,
            expert_infonce_loss,
            log_sinkhorn_knopp,
            routing_consistency_loss,
            sinkhorn_knopp,
        )

        data = make_inputs()
        res: dict[str, object] = {}

        # (a) Sinkhorn on this rank's half of the batch
        for key in ("sk_moderate", "sk_sharp"):
            local = local_rows(data[key], rank)
            res[key] = sinkhorn_knopp(local, eps=0.05, iters=3)
            res[key + "_log"] = log_sinkhorn_knopp(local, eps=0.05, iters=3)

        # (b) DINOLoss centre (two steps)
        mod = DINOLoss(out_dim=D_OUT, student_temp=0.1, center_momentum=DINO_MOMENTUM)
        dino_losses, dino_centers = [], []
        for step in range(2):
            s = [local_rows(x, rank) for x in data["dino_student"][step]]
            t = [local_rows(x, rank) for x in data["dino_teacher"][step]]
            dino_losses.append(mod(s, t, teacher_temp=0.04).detach())
            dino_centers.append(mod.center.detach().clone())
        res["dino_losses"] = dino_losses
        res["dino_centers"] = dino_centers

        # (c) expert InfoNCE with local student / teacher / assignment
        for tau in (0.04, 0.2):
            student = local_rows(data["nce_student"], rank, dim=1).requires_grad_()
            teacher = local_rows(data["nce_teacher"], rank, dim=1).requires_grad_()
            assignment = local_rows(data["nce_assignment"], rank)
            loss = expert_infonce_loss(student, teacher, assignment, N_EXPERTS, temperature=tau)
            loss.backward()
            res[f"nce_loss_{tau}"] = loss.detach()
            res[f"nce_grad_{tau}"] = student.grad.detach().clone()
            res[f"nce_teacher_grad_{tau}"] = teacher.grad
            # the same loss with other ranks' teacher vectors sent as bfloat16
            student = local_rows(data["nce_student"], rank, dim=1).requires_grad_()
            teacher = local_rows(data["nce_teacher"], rank, dim=1)
            loss = expert_infonce_loss(student, teacher, assignment, N_EXPERTS, temperature=tau,
                                       gather_dtype=torch.bfloat16)
            loss.backward()
            res[f"nce_bf16_loss_{tau}"] = loss.detach()
            res[f"nce_bf16_grad_{tau}"] = student.grad.detach().clone()
        from midol.utils.dist import gather_no_grad_as

        res["gather_bf16"] = gather_no_grad_as(local_rows(data["nce_teacher"][0], rank), torch.bfloat16)

        # (d) routing consistency with local logits
        for form in ("student_weighted", "teacher_target"):
            student = [local_rows(x, rank).requires_grad_() for x in data["route_student"]]
            teacher = [local_rows(x, rank) for x in data["route_teacher"]]
            loss = routing_consistency_loss(student, teacher, form=form)
            loss.backward()
            res[f"route_loss_{form}"] = loss.detach()
            res[f"route_grad_{form}"] = [x.grad.detach().clone() for x in student]

        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
