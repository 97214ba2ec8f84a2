"""The pre-training step three ways, on the same backbone and the same synthetic batch.

* ``midol*``: ``PretrainModule`` under a Lightning ``Trainer`` (what ``midol fit`` runs):
  views grouped by resolution, bf16 autocast on CUDA, fused AdamW, foreach EMA, optional
  ``torch.compile`` and activation checkpointing. ``midol`` = MoE + InfoNCE (paper default),
  ``midol-dinoce`` = MoE + DINO cross-entropy (authors' code), ``midol-dino`` = no MoE + DINO
  cross-entropy (the DINO baseline, comparable with ``lightly``).
* ``authors``: a plain PyTorch restatement of the authors' loop as the issue describes it:
  fp16 autocast with a GradScaler, every view at the global size, no compile, one backbone call
  per view; MoE head + routing loss + DINO cross-entropy (the same math as ``midol-dinoce``).
  What the authors' repository does beyond that is not available here; the rest follows DINO's
  ``main_dino.py``, from which their code derives: AdamW without fusion, a per-parameter EMA
  loop, ``loss.item()`` every step (finite check and logging), ``torch.cuda.synchronize()``.
* ``lightly``: lightly's DINO components (``DINOProjectionHead``, ``DINOLoss``,
  ``update_momentum``) on the same backbone, as lightly's DINO example runs them: one backbone
  call per view; bf16 autocast on CUDA (as ``midol``), AdamW, clipping 3.0.

On a CPU every implementation runs in float32 (no autocast).
Every ``run_*`` function builds its model, runs ``steps`` optimiser steps on ``batches``
(cycled) and calls ``on_step_end(i)`` after step ``i`` (0-based).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from midol.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from midol.losses import dino_cross_entropy, routing_consistency_loss
from midol.methods import PretrainModule
from midol.models import MoEProjector, build_backbone
from midol.optim.param_groups import decay_groups

IMPLS = ("midol", "midol-dinoce", "midol-dino", "authors", "lightly")
VIEW_SETTINGS = ("dino", "authors")
NUM_GLOBAL, NUM_LOCAL = 2, 6
LR, BETAS, WEIGHT_DECAY, CLIP, MOMENTUM = 1e-4, (0.9, 0.95), 0.04, 3.0, 0.996


@dataclass(frozen=True)
class Preset:
    """Backbone, view sizes and head shapes of one benchmark scale."""

    backbone: str
    backbone_kwargs: dict[str, Any] | None
    global_size: int
    local_size: int
    num_experts: int = 5
    expert_hidden_dim: int = 2048
    bottleneck_dim: int = 1024
    out_dim: int = 65536
    lightly_bottleneck: int = 256  # DINOProjectionHead default
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The paper's model and head (docs/papers/m-idol.md, 'Defaults'): Swin-B, 5 experts
    # 1024-2048-1024, 65536-d l.
    "swin_base": Preset("swin_base_patch4_window7_224", {}, 224, 96),
    # The demo's tiny Swin (configs/pretrain/demo.yaml), views 64 / 32 px.
    "tiny": Preset(
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4),
        64, 32, num_experts=4, expert_hidden_dim=256, bottleneck_dim=128, out_dim=1024,
        lightly_bottleneck=64,
    ),
    # The smallest Swin the tests use (tests/helpers/tiny.py), views 32 / 16 px: seconds on a CPU.
    "micro": Preset(
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=2),
        32, 16, num_experts=3, expert_hidden_dim=32, bottleneck_dim=16, out_dim=64,
        lightly_bottleneck=16,
    ),
}


@dataclass(frozen=True)
class Case:
    impl: str
    views: str
    batch: int
    compile: bool = False
    ckpt: bool = False

    @property
    def label(self) -> str:
        extras = [x for x, on in (("compile", self.compile), ("ckpt", self.ckpt)) if on]
        return f"{self.impl} [{'+'.join(extras) or 'eager'}]"


def view_sizes(preset: Preset, views: str) -> list[int]:
    """Side of every view: 2 global then 6 local; ``authors`` = every view at the global size."""
    local = preset.local_size if views == "dino" else preset.global_size
    return [preset.global_size] * NUM_GLOBAL + [local] * NUM_LOCAL


def make_batches(
    preset: Preset, views: str, batch: int, device: torch.device, count: int = 2, seed: int = 0
) -> list[dict[str, Any]]:
    """``count`` different batches of random uint8 views on the device (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tensors = [
            torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
            for s in view_sizes(preset, views)
        ]
        out.append({"views": [t.to(device) for t in tensors], "skipped": []})
    return out


StepHook = Callable[[int], None]


# ---------------------------------------------------------------------------------- midol
class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[dict[str, Any]], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


class _StepHookCallback(L.Callback):
    def __init__(self, hook: StepHook) -> None:
        self.hook = hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Called at the start of step i+1, after the module's EMA of step i, so "end of step i"
        # includes every hook of that step. The last step ends in on_train_end.
        if batch_idx > 0:
            self.hook(batch_idx - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.hook(trainer.global_step - 1)


def midol_module(case: Case, preset: Preset) -> PretrainModule:
    use_moe = case.impl != "midol-dino"
    return PretrainModule(
        backbone=preset.backbone,
        backbone_kwargs=preset.backbone_kwargs,
        grad_checkpointing=case.ckpt,
        compile=case.compile,
        use_moe=use_moe,
        num_experts=preset.num_experts,
        expert_hidden_dim=preset.expert_hidden_dim,
        bottleneck_dim=preset.bottleneck_dim,
        out_dim=preset.out_dim,
        cst_loss="infonce" if case.impl == "midol" else "dino_ce",
        route_weight=1.0 if use_moe else 0.0,
        num_global_views=NUM_GLOBAL,
        base_lr=LR,
        betas=BETAS,
        weight_decay=WEIGHT_DECAY,
        freeze_last_layer_epochs=0,  # the steady state after the first epoch
        warmup_epochs=0,
    )


def run_midol(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device, callbacks: list[L.Callback] | None = None,
) -> None:
    module = midol_module(case, preset)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=steps,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,  # a progress bar reads the loss back every refresh
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        callbacks=[_StepHookCallback(on_step_end), *(callbacks or [])],
    )
    loader = torch.utils.data.DataLoader(_Batches(batches, steps), batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*logger.*")
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train_dataloaders=loader)


# -------------------------------------------------------------------------------- authors
class _Normalize(nn.Module):
    """The authors' loader hands float, normalised views; this does it once per batch."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def run_authors(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device,
) -> None:
    backbone = build_backbone(preset.backbone, preset.backbone_kwargs)
    head = MoEProjector(
        backbone.num_features, preset.num_experts, 1, preset.expert_hidden_dim,
        preset.bottleneck_dim, preset.out_dim,
    )
    student = nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(decay_groups([student]), lr=LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    center = torch.zeros(1, preset.out_dim, device=device)
    normalize = _Normalize(device)
    # Every training loop holds its float inputs; build them outside the timed region.
    inputs = [[normalize(v) for v in b["views"]] for b in batches]
    student.train()
    for i in range(steps):
        views = inputs[i % len(inputs)]
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            t_out = [teacher["head"](teacher["backbone"](v)) for v in views[:NUM_GLOBAL]]
            s_out = [student["head"](student["backbone"](v)) for v in views]
            l_route = routing_consistency_loss(
                [s.router_logits for s in s_out], [t.router_logits for t in t_out]
            )
            t_rep = [t.representation for t in t_out]
            l_cst = dino_cross_entropy([s.representation for s in s_out], t_rep, center)
            loss = l_route + l_cst
        with torch.no_grad():
            batch_center = torch.cat([t.float() for t in t_rep]).mean(dim=0, keepdim=True)
            center.mul_(0.9).add_(batch_center, alpha=0.1)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(MOMENTUM).add_((1 - MOMENTUM) * ps.detach().data)
        if cuda:
            torch.cuda.synchronize()
        on_step_end(i)


# -------------------------------------------------------------------------------- lightly
def run_lightly(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device,
) -> None:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = build_backbone(preset.backbone, preset.backbone_kwargs)
    def make_head() -> nn.Module:
        return DINOProjectionHead(
            backbone.num_features, preset.expert_hidden_dim, preset.lightly_bottleneck,
            preset.out_dim, freeze_last_layer=1,
        )

    # As lightly's example: a weight-normed head cannot be deep-copied, so the teacher head
    # is built anew (and given the student's weights here).
    head = make_head()
    student = nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": make_head()}).to(device)
    teacher["head"].load_state_dict(head.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=preset.out_dim, warmup_teacher_temp_epochs=0).to(device)
    optimizer = torch.optim.AdamW(decay_groups([student]), lr=LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY)
    normalize = _Normalize(device)
    inputs = [[normalize(v) for v in b["views"]] for b in batches]
    cuda = device.type == "cuda"
    student.train()
    for i in range(steps):
        views = inputs[i % len(inputs)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            teacher_out = [teacher["head"](teacher["backbone"](v)) for v in views[:NUM_GLOBAL]]
            student_out = [student["head"](student["backbone"](v)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=1)
        loss.backward()
        head.cancel_last_layer_gradients(current_epoch=1)
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_momentum(student["backbone"], teacher["backbone"], m=MOMENTUM)
        update_momentum(student["head"], teacher["head"], m=MOMENTUM)
        on_step_end(i)


def run_case(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device,
) -> None:
    if case.impl.startswith("midol"):
        run_midol(case, preset, batches, steps, on_step_end, device)
    elif case.impl == "authors":
        run_authors(case, preset, batches, steps, on_step_end, device)
    elif case.impl == "lightly":
        run_lightly(case, preset, batches, steps, on_step_end, device)
    else:
        raise ValueError(f"unknown implementation {case.impl!r}; choose from {IMPLS}")
