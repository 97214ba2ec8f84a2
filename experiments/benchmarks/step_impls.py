"""The pre-training step of midol and of the code people would otherwise run, on the same
backbone and the same synthetic batch (issue 30, item 1: faithful baselines).

* ``midol*``: ``PretrainModule`` under a Lightning ``Trainer`` (what ``midol fit`` runs):
  views grouped by resolution, bf16 autocast on CUDA, fused AdamW, foreach EMA, optional
  ``torch.compile`` and activation checkpointing.

  - ``midol``: MoE + InfoNCE (the paper's default, top-1 of the preset's experts).
  - ``midol-dinoce``: midol set to the authors' math (``configs/pretrain/midol_authors_code.yaml``):
    DINO cross-entropy, a dense mixture of their 4 experts with Tutel's gate noise 1.0 and a
    bias-free router, their Sinkhorn variant, teacher in train mode, drop-path 0.1 (their
    Swin's default) in student and teacher, per-parameter clipping, AdamW betas (0.9, 0.999).
    The same math as ``authors``.
  - ``midol-dino``: no MoE, DINO cross-entropy, with lightly's head shape (3 layers,
    bottleneck ``lightly_bottleneck``): midol's DINO baseline with the same math as ``lightly``.
* ``authors``: the M-IDoL authors' released loop as it runs (github LYH-hh/M-IDoL, commit
  cacb728: ``main_MoE_Uni.py`` ``train_one_epoch`` and ``DINOLoss``, ``utils.py``
  ``MultiCropWrapper`` and ``clip_gradients``; restated, not copied): one backbone call per run
  of equal-size views (their ``MultiCropWrapper``), the head on the concatenated features,
  their loss with its four finite checks and two ``float(... .cpu())`` reads, their Sinkhorn
  (``midol.losses.sinkhorn.log_sinkhorn_knopp_authors``), ``loss.item()`` before backward,
  fp16 autocast + ``GradScaler`` on CUDA, per-parameter clipping with a ``.item()`` and an
  ``if`` on a device value per parameter, the per-parameter EMA loop,
  ``torch.cuda.synchronize()`` and ``loss.item()`` for logging. Not restated: DDP (one
  device here) and Tutel's dispatch kernels (midol's ``MoEProjector`` computes the same dense
  4-expert mixture).
* ``lightly``: lightly's ImageNet DINO benchmark (``benchmarks/imagenet/resnet50/dino.py``,
  lightly 1.6) as a LightningModule with the same backbone: momentum update of backbone and
  head at the start of the step (``update_momentum``, cosine schedule), the teacher on the two
  global views concatenated, the student on the global then the local views (two calls),
  ``DINOProjectionHead`` and ``DINOLoss`` (teacher temperature 0.04), ``log_dict`` with
  ``prog_bar=True, sync_dist=True``, ``clip_gradients(3.0, "norm")`` then
  ``cancel_last_layer_gradients`` in ``configure_gradient_clipping``, precision ``16-mixed`` on
  CUDA (its ``main.py`` default), a per-step cosine LR scheduler. AdamW as in its ViT DINO
  benchmark (``vitb16/dino.py``; the ResNet-50 file's SGD is for convnets). The progress bar's
  read-back of the logged loss every step (its ``main.py`` leaves TQDM on) is restated by a
  callback that reads ``trainer.progress_bar_metrics``, without drawing. Left out: the online
  linear classifier (needs labels; not part of DINO) and the logger, as for midol.
* ``authors-per-view`` and ``lightly-toy``: the earlier restatements, kept as labelled extra
  rows: one backbone call per view, global-norm clipping, no host reads per parameter
  (``authors-per-view``: top-1 MoE of the preset's experts, SwAV Sinkhorn; ``lightly-toy``:
  lightly's toy DINO example).

On a CPU every implementation runs in float32 (no autocast).
Every ``run_*`` function builds its model, runs ``steps`` optimiser steps on ``batches``
(cycled) and calls ``on_step_end(i)`` after step ``i`` (0-based). Options used by the tests:
``on_loss(i, loss)`` after each forward, ``init_state`` (student weights to start from,
in the implementation's own layout) and ``overrides`` (for midol: constructor arguments; for
``authors``: ``gate_noise``, ``drop_path_rate``, ``grouped``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from midol.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from midol.losses import dino_cross_entropy, routing_consistency_loss
from midol.losses.sinkhorn import log_sinkhorn_knopp_authors
from midol.methods import PretrainModule
from midol.models import MoEProjector, build_backbone
from midol.optim.param_groups import decay_groups

IMPLS = ("midol", "midol-dinoce", "midol-dino", "authors", "lightly", "authors-per-view",
         "lightly-toy")
# Pairs with the same math: (midol variant, reference).
SAME_MATH = (("midol-dinoce", "authors"), ("midol-dino", "lightly"))
# Implementations defined only with every view at the global size (the authors' setting).
AUTHORS_VIEWS_ONLY = ("authors", "authors-per-view")
VIEW_SETTINGS = ("dino", "authors")
NUM_GLOBAL, NUM_LOCAL = 2, 6
LR, BETAS, WEIGHT_DECAY, CLIP, MOMENTUM = 1e-4, (0.9, 0.95), 0.04, 3.0, 0.996
# The authors' released settings (main_MoE_Uni.py defaults, MIDoL_model.py MoEHead/Swin):
# 2 local Tutel experts x 2 GPUs, all chosen per image; gate noise 1.0; AdamW's default betas;
# the Swin's default stochastic depth 0.1 (teacher in train mode, so active there too).
AUTHORS_EXPERTS, AUTHORS_GATE_NOISE, AUTHORS_BETAS, AUTHORS_DROP_PATH = 4, 1.0, (0.9, 0.999), 0.1
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


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
LossHook = Callable[[int, torch.Tensor], None]


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


def midol_options(impl: str, preset: Preset) -> dict[str, Any]:
    """Constructor arguments of ``PretrainModule`` that define each midol variant."""
    if impl == "midol":
        return dict(use_moe=True, cst_loss="infonce", route_weight=1.0, betas=BETAS)
    if impl == "midol-dinoce":  # the authors' math (configs/pretrain/midol_authors_code.yaml)
        return dict(
            use_moe=True, cst_loss="dino_ce", route_weight=1.0, num_experts=AUTHORS_EXPERTS,
            top_k=AUTHORS_EXPERTS, gate_noise=AUTHORS_GATE_NOISE, router_bias=False,
            sinkhorn_impl="authors", teacher_mode="train", clip_mode="per_param",
            betas=AUTHORS_BETAS,
            backbone_kwargs={**(preset.backbone_kwargs or {}), "drop_path_rate": AUTHORS_DROP_PATH},
        )
    if impl == "midol-dino":  # the DINO baseline with lightly's head shape
        return dict(use_moe=False, cst_loss="dino_ce", route_weight=0.0, expert_layers=3,
                    bottleneck_dim=preset.lightly_bottleneck, betas=BETAS)
    raise ValueError(f"{impl!r} is not a midol variant")


def midol_module(case: Case, preset: Preset, overrides: dict[str, Any] | None = None) -> PretrainModule:
    options: dict[str, Any] = dict(
        backbone=preset.backbone,
        backbone_kwargs=preset.backbone_kwargs,
        grad_checkpointing=case.ckpt,
        compile=case.compile,
        num_experts=preset.num_experts,
        expert_hidden_dim=preset.expert_hidden_dim,
        bottleneck_dim=preset.bottleneck_dim,
        out_dim=preset.out_dim,
        num_global_views=NUM_GLOBAL,
        base_lr=LR,
        weight_decay=WEIGHT_DECAY,
        freeze_last_layer_epochs=0,  # the steady state after the first epoch
        warmup_epochs=0,
    )
    options.update(midol_options(case.impl, preset))
    options.update(overrides or {})
    return PretrainModule(**options)


class _LossHook(L.Callback):
    """Hands the loss each ``training_step`` returned to ``on_loss(step, loss)``."""

    def __init__(self, on_loss: Callable[[int, torch.Tensor], None]) -> None:
        self.on_loss = on_loss

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.on_loss(batch_idx, loss.detach())


def _trainer(device: torch.device, steps: int, precision: str, clip: float | None,
             callbacks: list[L.Callback]) -> L.Trainer:
    """The same Trainer for midol and lightly: no logger, no checkpoints, no progress bar."""
    return L.Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=precision if device.type == "cuda" else "32-true",
        max_steps=steps,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,  # a bar draws; lightly's read-back is restated (below)
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        callbacks=callbacks,
    )


def _fit(trainer: L.Trainer, module: L.LightningModule, batches: list[dict[str, Any]],
         steps: int) -> None:
    loader = torch.utils.data.DataLoader(_Batches(batches, steps), batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*logger.*")
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(module, train_dataloaders=loader)


def run_midol(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device, callbacks: list[L.Callback] | None = None,
    overrides: dict[str, Any] | None = None,
    on_loss: Callable[[int, torch.Tensor], None] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> None:
    module = midol_module(case, preset, overrides)
    if init_state is not None:
        module.student.load_state_dict(init_state)
        module.teacher.load_state_dict(init_state)
    hooks: list[L.Callback] = [_StepHookCallback(on_step_end), *(callbacks or [])]
    if on_loss is not None:
        hooks.append(_LossHook(on_loss))
    _fit(_trainer(device, steps, "bf16-mixed", CLIP, hooks), module, batches, steps)


# -------------------------------------------------------------------------------- authors
class _Normalize(nn.Module):
    """The loaders of the authors and of lightly hand float, normalised views; this does it
    once per batch, outside the timed steps."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def _float_views(batches: list[dict[str, Any]], device: torch.device) -> list[list[torch.Tensor]]:
    normalize = _Normalize(device)
    return [[normalize(v) for v in b["views"]] for b in batches]


def _multi_crop(model: nn.ModuleDict, views: list[torch.Tensor]) -> Any:
    """Their ``utils.MultiCropWrapper.forward``: one backbone call per run of consecutive views
    of equal size (``torch.unique_consecutive`` on a CPU tensor of sizes: no device read), the
    outputs concatenated onto an empty tensor, then the head once on all rows."""
    idx_crops = torch.cumsum(torch.unique_consecutive(
        torch.tensor([v.shape[-1] for v in views]), return_counts=True)[1], 0)
    start, output = 0, torch.empty(0).to(views[0].device)
    for end in idx_crops:
        output = torch.cat((output, model["backbone"](torch.cat(views[start:end]))))
        start = int(end)
    return model["projector"](output)


def _per_view(model: nn.ModuleDict, views: list[torch.Tensor]) -> Any:
    """One backbone call per view, the head on the concatenation (only to test that grouping
    leaves the loss unchanged)."""
    return model["projector"](torch.cat([model["backbone"](v) for v in views]))


class AuthorsLoss(nn.Module):
    """Their ``DINOLoss`` (main_MoE_Uni.py, commit cacb728) restated: L_route + L_cst.

    L_cst: DINO cross-entropy ``-sum softmax((t - c) / T_t) log_softmax(s / T_s)`` summed over
    the pairs (teacher view iq, student view v), v != iq, divided by their number (one
    ``.mean()`` per pair). L_route: ``-sum a_S log a_T`` with ``a_S = softmax(s / T_s)`` and
    a_T their Sinkhorn on ``t / T_t`` per teacher view, over the same pairs. The centre moves
    with momentum 0.9 after L_cst. Every call checks its four inputs for non-finite values
    (one host read each) and reads both terms back as floats, as their logging does.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = STUDENT_TEMP,
                 center_momentum: float = 0.9, sinkhorn_eps: float = 0.05,
                 sinkhorn_iters: int = 3) -> None:
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_eps, sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    @staticmethod
    def _check_finite(name: str, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():  # their check: a host read per tensor
            raise FloatingPointError(f"{name} holds non-finite values")

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                temp: float) -> tuple[torch.Tensor, float, float]:
        for name, x in (("teacher_output", teacher_output), ("student_output", student_output),
                        ("teacher_moe_logits", teacher_logits),
                        ("student_moe_logits", student_logits)):
            self._check_finite(name, x)
        views = self.ncrops
        batch = student_output.shape[0] // views
        t_views = teacher_output.shape[0] // batch
        student_out = (student_output / self.student_temp).chunk(views)
        teacher_prob = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(t_views)
        cst: Any = 0.0
        n_terms = 0
        for iq, q in enumerate(teacher_prob):
            for v in range(views):
                if v < t_views and v == iq:
                    continue
                cst = cst + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
        cst = cst / max(n_terms, 1)
        self.update_center(teacher_output)
        route = self._routing_loss(student_logits, teacher_logits, views, t_views, temp)
        total = route + cst
        return total, float(route.detach().cpu()), float(cst.detach().cpu())

    def _routing_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      views: int, t_views: int, temp: float) -> torch.Tensor:
        a_s = F.softmax(student_logits / self.student_temp, dim=-1).chunk(views)
        with torch.no_grad():
            log_a_t = [log_sinkhorn_knopp_authors(x, self.sinkhorn_eps, self.sinkhorn_iters)
                       for x in (teacher_logits / temp).chunk(t_views)]
        loss: Any = 0.0
        n_terms = 0
        for j in range(views):
            for g in range(t_views):
                if j < t_views and j == g:
                    continue
                loss = loss + (-torch.sum(a_s[j] * log_a_t[g], dim=-1)).mean()
                n_terms += 1
        return loss / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def authors_clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """DINO's ``utils.clip_gradients``: every gradient tensor with norm > ``clip`` scaled by
    ``clip / (norm + 1e-6)``; its ``.item()`` and its ``if`` on a device value read every
    parameter's norm back to the host (two reads per tensor)."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def _authors_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Their ``utils.get_params_groups``: no weight decay on biases and 1-D parameters."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


AUTHORS_OPTIONS = {"gate_noise": AUTHORS_GATE_NOISE, "drop_path_rate": AUTHORS_DROP_PATH,
                   "grouped": True}


def authors_student(preset: Preset, gate_noise: float = AUTHORS_GATE_NOISE,
                    drop_path_rate: float = AUTHORS_DROP_PATH) -> nn.ModuleDict:
    """Their student: Swin (stochastic depth 0.1) + MoEHead (dense 4-expert mixture, gate noise,
    bias-free router, L2 norm, weight-normed last layer), in midol's module layout."""
    backbone = build_backbone(
        preset.backbone, {**(preset.backbone_kwargs or {}), "drop_path_rate": drop_path_rate})
    head = MoEProjector(
        backbone.num_features, AUTHORS_EXPERTS, AUTHORS_EXPERTS, preset.expert_hidden_dim,
        preset.bottleneck_dim, preset.out_dim, gate_noise=gate_noise, router_bias=False,
    )
    return nn.ModuleDict({"backbone": backbone, "projector": head})


def run_authors(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device, overrides: dict[str, Any] | None = None,
    on_loss: LossHook | None = None, init_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Their ``train_one_epoch`` (main_MoE_Uni.py) at the steady state (after the epoch that
    freezes the last layer), one device."""
    unknown = set(overrides or {}) - set(AUTHORS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown authors options {sorted(unknown)}; choose from {sorted(AUTHORS_OPTIONS)}")
    opts = {**AUTHORS_OPTIONS, **(overrides or {})}
    student = authors_student(preset, float(opts["gate_noise"]), float(opts["drop_path_rate"]))
    student = student.to(device)
    if init_state is not None:
        student.load_state_dict(init_state)
    teacher = copy.deepcopy(student)  # theirs: built alike, then given the student's weights
    for p in teacher.parameters():
        p.requires_grad = False
    # They never call .eval(): the teacher runs in train mode (drop-path, gate noise).
    student.train()
    teacher.train()
    forward = _multi_crop if opts["grouped"] else _per_view
    loss_fn = AuthorsLoss(preset.out_dim, len(batches[0]["views"])).to(device)
    optimizer = torch.optim.AdamW(_authors_param_groups(student))  # lr / wd set every step
    # Their schedules are numpy arrays indexed by the global step; the bench is at a plateau.
    lr_schedule, wd_schedule, momentum_schedule = [LR] * steps, [WEIGHT_DECAY] * steps, [MOMENTUM] * steps
    cuda = device.type == "cuda"
    fp16_scaler = torch.amp.GradScaler("cuda") if cuda else None  # use_fp16 (their default)
    inputs = _float_views(batches, device)
    epoch, freeze_last_layer = 1, 1
    for it in range(steps):
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        images = inputs[it % len(inputs)]
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            t_out = forward(teacher, images[:NUM_GLOBAL])
            s_out = forward(student, images)
            loss, _, _ = loss_fn(s_out.representation, t_out.representation,
                                 t_out.router_logits, s_out.router_logits, TEACHER_TEMP)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}")
        if on_loss is not None:
            on_loss(it, loss.detach())
        optimizer.zero_grad()
        if fp16_scaler is None:
            loss.backward()
            authors_clip_gradients(student, CLIP)
            _cancel_gradients_last_layer(epoch, student, freeze_last_layer)
            optimizer.step()
        else:
            fp16_scaler.scale(loss).backward()
            fp16_scaler.unscale_(optimizer)
            authors_clip_gradients(student, CLIP)
            _cancel_gradients_last_layer(epoch, student, freeze_last_layer)
            fp16_scaler.step(optimizer)
            fp16_scaler.update()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if cuda:
            torch.cuda.synchronize()
        _ = loss.item()  # metric_logger.update(loss=loss.item())
        on_step_end(it)


def _cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "projection" in n:
            p.grad = None


def run_authors_per_view(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device,
) -> None:
    """The earlier restatement (an extra row): one backbone call per view, top-1 MoE of the
    preset's experts, SwAV's Sinkhorn, global-norm clipping, fp16 + GradScaler on CUDA."""
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
    inputs = _float_views(batches, device)
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
def lightly_head(preset: Preset, input_dim: int, freeze_last_layer: int = -1) -> nn.Module:
    from lightly.models.modules import DINOProjectionHead

    return DINOProjectionHead(input_dim, preset.expert_hidden_dim, preset.lightly_bottleneck,
                              preset.out_dim, freeze_last_layer=freeze_last_layer)


class _ProgressBarReads(L.Callback):
    """What lightly's ``main.py`` progress bar (TQDM, refresh every step) reads after every
    step: the ``prog_bar`` metrics as Python floats (``trainer.progress_bar_metrics``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _ = trainer.progress_bar_metrics


def lightly_module(preset: Preset, init_state: dict[str, torch.Tensor] | None = None) -> L.LightningModule:
    """lightly's ``benchmarks/imagenet/resnet50/dino.py`` ``DINO`` with the preset's backbone
    (restated; the online classifier left out). ``init_state``: student weights in the
    ``{"backbone.*", "head.*"}`` layout; the teacher starts from the same weights."""
    from lightly.loss import DINOLoss
    from lightly.models.utils import (
        activate_requires_grad,
        deactivate_requires_grad,
        get_weight_decay_parameters,
        update_momentum,
    )
    from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule

    class LightlyDINO(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build_backbone(preset.backbone, preset.backbone_kwargs)
            dim = self.backbone.num_features
            self.projection_head = lightly_head(preset, dim)
            self.student_backbone = copy.deepcopy(self.backbone)
            # freeze_last_layer=1 in the benchmark; 0 here: the steady state after epoch 0
            self.student_projection_head = lightly_head(preset, dim, freeze_last_layer=0)
            if init_state is not None:
                nn.ModuleDict({"backbone": self.student_backbone,
                               "head": self.student_projection_head}).load_state_dict(init_state)
                self.backbone.load_state_dict(self.student_backbone.state_dict())
            # The benchmark builds the teacher head apart; DINO starts it from the student's.
            self.projection_head.load_state_dict(self.student_projection_head.state_dict())
            self.criterion = DINOLoss(output_dim=preset.out_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

        def forward_student(self, x: torch.Tensor) -> torch.Tensor:
            features = self.student_backbone(x).flatten(start_dim=1)
            return self.student_projection_head(features)

        def on_train_start(self) -> None:
            deactivate_requires_grad(self.backbone)
            deactivate_requires_grad(self.projection_head)

        def on_train_end(self) -> None:
            activate_requires_grad(self.backbone)
            activate_requires_grad(self.projection_head)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            momentum = cosine_schedule(
                step=self.trainer.global_step,
                max_steps=int(self.trainer.estimated_stepping_batches),
                start_value=MOMENTUM, end_value=1.0,
            )
            update_momentum(self.student_backbone, self.backbone, m=momentum)
            update_momentum(self.student_projection_head, self.projection_head, m=momentum)
            views = batch["views"]
            global_views = torch.cat(views[:2])
            local_views = torch.cat(views[2:])
            teacher_features = self.forward(global_views).flatten(start_dim=1)
            teacher_projections = self.projection_head(teacher_features)
            student_projections = torch.cat(
                [self.forward_student(global_views), self.forward_student(local_views)])
            loss = self.criterion(
                teacher_out=list(teacher_projections.chunk(2)),
                student_out=list(student_projections.chunk(len(views))),
                teacher_temp=TEACHER_TEMP,
            )
            self.log_dict({"train_loss": loss, "ema_momentum": momentum}, prog_bar=True,
                          sync_dist=True, batch_size=len(views[0]))
            return loss

        def configure_optimizers(self) -> Any:
            params, params_no_weight_decay = get_weight_decay_parameters(
                [self.student_backbone, self.student_projection_head])
            optimizer = torch.optim.AdamW(
                [{"name": "dino", "params": params},
                 {"name": "dino_no_weight_decay", "params": params_no_weight_decay,
                  "weight_decay": 0.0}],
                lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
            )
            steps = int(self.trainer.estimated_stepping_batches)
            # warm-up 0: the bench measures the plateau, as midol's rows (warmup_epochs=0)
            scheduler = {"scheduler": CosineWarmupScheduler(optimizer, warmup_epochs=0,
                                                            max_epochs=steps),
                         "interval": "step"}
            return [optimizer], [scheduler]

        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                        gradient_clip_algorithm: Any = None) -> None:
            self.clip_gradients(optimizer=optimizer, gradient_clip_val=CLIP,
                                gradient_clip_algorithm="norm")
            self.student_projection_head.cancel_last_layer_gradients(self.current_epoch)

    return LightlyDINO()


def run_lightly(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device, callbacks: list[L.Callback] | None = None,
    on_loss: LossHook | None = None, init_state: dict[str, torch.Tensor] | None = None,
) -> None:
    module = lightly_module(preset, init_state)
    inputs = [{"views": views} for views in _float_views(batches, device)]
    hooks: list[L.Callback] = [_StepHookCallback(on_step_end), _ProgressBarReads(),
                               *(callbacks or [])]
    if on_loss is not None:
        hooks.append(_LossHook(on_loss))
    # 16-mixed: the default precision of lightly's benchmarks/imagenet/*/main.py
    _fit(_trainer(device, steps, "16-mixed", None, hooks), module, inputs, steps)


def run_lightly_toy(
    case: Case, preset: Preset, batches: list[dict[str, Any]], steps: int,
    on_step_end: StepHook, device: torch.device,
    on_loss: LossHook | None = None, init_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The earlier restatement (an extra row): lightly's toy DINO example, one backbone call per
    view, bf16 autocast on CUDA, clipping 3.0."""
    from lightly.loss import DINOLoss
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = build_backbone(preset.backbone, preset.backbone_kwargs)
    # As lightly's example: a weight-normed head cannot be deep-copied, so the teacher head
    # is built anew (and given the student's weights here).
    head = lightly_head(preset, backbone.num_features, freeze_last_layer=1)
    student = nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    if init_state is not None:
        student.load_state_dict(init_state)
    teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone),
                             "head": lightly_head(preset, backbone.num_features)}).to(device)
    teacher["head"].load_state_dict(head.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=preset.out_dim, warmup_teacher_temp_epochs=0).to(device)
    optimizer = torch.optim.AdamW(decay_groups([student]), lr=LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY)
    inputs = _float_views(batches, device)
    cuda = device.type == "cuda"
    student.train()
    for i in range(steps):
        views = inputs[i % len(inputs)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            teacher_out = [teacher["head"](teacher["backbone"](v)) for v in views[:NUM_GLOBAL]]
            student_out = [student["head"](student["backbone"](v)) for v in views]
            loss = criterion(teacher_out, student_out, epoch=1)
        if on_loss is not None:
            on_loss(i, loss.detach())
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
    on_step_end: StepHook, device: torch.device, **options: Any,
) -> None:
    """Run ``case``; ``options`` go to the implementation's runner (see the module docstring)."""
    runners: dict[str, Callable[..., None]] = {
        "authors": run_authors, "authors-per-view": run_authors_per_view,
        "lightly": run_lightly, "lightly-toy": run_lightly_toy,
    }
    if case.impl.startswith("midol"):
        run_midol(case, preset, batches, steps, on_step_end, device, **options)
    elif case.impl in runners:
        runners[case.impl](case, preset, batches, steps, on_step_end, device, **options)
    else:
        raise ValueError(f"unknown implementation {case.impl!r}; choose from {IMPLS}")


# ------------------------------------------------------------------- same math, step 0
def midol_state_as_lightly(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """midol's no-MoE student (``backbone.*``, ``projector.*`` with one expert) in lightly's
    ``{"backbone.*", "head.*"}`` layout: ``ExpertBank`` weights (1 x in x out, ``x @ W``) become
    ``nn.Linear`` weights (out x in); ``NormedLinear.weight_v`` becomes ``weight_v`` of the
    weight-normed layer with ``weight_g`` = 1 (the frozen norm)."""
    out = {k: v for k, v in state.items() if k.startswith("backbone.")}
    layers = sorted(int(k.split(".")[-1]) for k in state if k.startswith("projector.experts.weights."))
    if not layers or "projector.router.weight" in state:
        raise ValueError("expected midol's no-MoE projector (one expert, no router)")
    for i in layers:
        out[f"head.layers.{2 * i}.weight"] = state[f"projector.experts.weights.{i}"][0].T.contiguous()
        out[f"head.layers.{2 * i}.bias"] = state[f"projector.experts.biases.{i}"][0]
    v = state["projector.projection.weight_v"]
    out["head.last_layer.weight_v"] = v
    out["head.last_layer.weight_g"] = torch.ones(v.shape[0], 1, dtype=v.dtype)
    return out


class _StudentState(L.Callback):
    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}


def same_math_losses(preset_name: str = "micro", batch: int = 2, views: str = "authors",
                     device: torch.device | None = None) -> dict[str, float]:
    """Step-0 loss of every implementation from the same student weights and the same batch,
    with the random parts (gate noise, stochastic depth) off: midol-dinoce / authors (grouped and per
    view) from midol-dinoce's initial student, midol-dino / lightly / lightly-toy from
    midol-dino's."""
    device = device or torch.device("cpu")
    # timm's Swin has stochastic depth 0.1 by default (the authors' Swin too): off here
    base = PRESETS[preset_name]
    preset = replace(base, backbone_kwargs={**(base.backbone_kwargs or {}), "drop_path_rate": 0.0})
    batches = make_batches(preset, views, batch, device, count=1)
    losses: dict[str, float] = {}

    def record(name: str) -> LossHook:
        def hook(i: int, loss: torch.Tensor) -> None:
            if i == 0:
                losses[name] = float(loss)
        return hook

    def nothing(i: int) -> None:
        return None

    for midol_impl, refs in (("midol-dinoce", ("authors", "authors-grouped=False")),
                             ("midol-dino", ("lightly", "lightly-toy"))):
        grab = _StudentState()
        overrides = ({"gate_noise": 0.0, "backbone_kwargs": preset.backbone_kwargs}
                     if midol_impl == "midol-dinoce" else None)
        run_midol(Case(midol_impl, views, batch), preset, batches, 1, nothing, device,
                  callbacks=[grab], overrides=overrides, on_loss=record(midol_impl))
        for ref in refs:
            impl, _, grouped = ref.partition("-grouped=")
            options: dict[str, Any] = {"on_loss": record(ref)}
            if impl == "authors":
                options["init_state"] = grab.state
                options["overrides"] = {"gate_noise": 0.0, "drop_path_rate": 0.0,
                                        "grouped": grouped != "False"}
            else:
                options["init_state"] = midol_state_as_lightly(grab.state)
            run_case(Case(impl, views, batch), preset, batches, 1, nothing, device, **options)
    return losses
