"""M-IDoL pre-training as a LightningModule (spec §1-3); the plain DINO baseline is one switch away."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from torch import nn

from midol.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from midol.losses import (
    DINOLoss,
    expert_infonce_loss,
    routing_cross_entropy,
    switch_load_balance_loss,
    teacher_routing_log_probs,
)
from midol.losses.routing import RouteForm
from midol.methods.optim import decay_groups, set_lr_and_wd
from midol.models import DEFAULT_BACKBONE, MoEProjector, build_backbone, ema_update, momentum_at
from midol.models.moe import Projection
from midol.utils.dist import all_reduce_max, rank, world_size
from midol.utils.schedules import cosine_schedule, linear_warmup, warmup_cosine_schedule



def encode_views(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Pooled features of every view, M x B x d, with one backbone call per run of
    consecutive views that share a resolution (2 calls for 2 global + 6 local crops)."""
    batch = views[0].shape[0]
    feats, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        feats.append(backbone(torch.cat(views[start:end])).view(end - start, batch, -1))
        start = end
    return torch.cat(feats)


class PretrainModule(L.LightningModule):
    """Student/EMA-teacher pre-training with an MoE projector, L_route and L_cst.

    Args (the config schema of ``midol fit``; the defaults are the paper's settings):
        backbone: timm model name (Swin-B in the paper).
        backbone_kwargs: keyword overrides for ``timm.create_model`` (e.g. a tiny Swin).
        init_checkpoint: local weights to start the student (and teacher) from; the authors
            used ImageNet-22k Swin-B weights.
        grad_checkpointing: activation checkpointing in the backbone (memory for ~1/3 compute).
        compile: ``torch.compile`` the student and teacher backbones (static shapes: one graph
            per view resolution) when the Trainer sets the model up; checkpoint keys unchanged.
        use_moe: False gives the plain DINO baseline (paper Table 2 row 1): one FFN of the
            same shape instead of N routed experts, no router, no L_route.
        num_experts: N, one per latent modality (paper: 5).
        top_k: experts per image (paper: 1).
        expert_hidden_dim / bottleneck_dim / expert_layers: expert FFN shape (authors' code:
            1024 -> 2048 -> 1024, 2 layers).
        out_dim: width of the shared projection l (authors' code: 65536).
        l2_norm / projection / norm_last_layer: the authors' head (L2-normalise, weight-normed
            linear with frozen norm) or a plain linear l.
        gate_weighted_output: multiply the top-1 expert output by its routing probability.
        router_noise: std of Gaussian noise on the student's router logits (0 = off).
        cst_loss: ``infonce`` (paper Eq. 19-20, default) or ``dino_ce`` (authors' code).
        route_weight / cst_weight: L = route_weight L_route + cst_weight L_cst (Eq. 21).
            L_route is computed and logged even with weight 0 (so routing stays visible).
        load_balance_weight: weight of a Switch-style load-balance term on the student router
            (0 = off, the paper has none).
        route_form: ``student_weighted`` (-sum a_S log a_T, authors' code, default) or
            ``teacher_target`` (-sum a_T log a_S, SwAV style).
        student_temp: tau_s for routing and for the DINO cross-entropy (0.1).
        teacher_temp: tau_t for Sinkhorn routing and the DINO target (0.04).
        warmup_teacher_temp / warmup_teacher_temp_epochs: optional linear warm-up of tau_t.
        sinkhorn_eps / sinkhorn_iters: Sinkhorn-Knopp epsilon (0.05) and iterations (3).
        infonce_temp: tau of Eq. 19 (0.04).
        infonce_expert_mean: average L_cst^i over the experts that received images
            (``nonempty``, default) or divide by N as Eq. 20 prints it (``all``).
        center_momentum: centre momentum of the DINO cross-entropy (0.9).
        teacher_views: the teacher sees the ``global`` views (authors' code) or ``all`` views
            (the paper's equations).
        num_global_views: how many leading views of a batch are global crops; None (default)
            takes ``num_global`` from the datamodule.
        base_lr: lr per 256 images; the peak lr is base_lr x total batch / 256.
        min_lr: final lr of the cosine schedule.
        warmup_epochs: linear lr warm-up (paper: 10).
        weight_decay / weight_decay_end: cosine weight-decay schedule (0.04 -> 0.4), not
            applied to biases and norm parameters.
        betas: AdamW betas (0.9, 0.95).
        momentum_start / momentum_end: teacher EMA momentum, cosine over training.
        freeze_last_layer_epochs: epochs during which the shared projection l gets no update.
        nonfinite: what a NaN/inf loss does: ``raise`` (default) stops with a
            ``FloatingPointError`` naming the loss term(s) and the global step; ``skip`` warns
            and skips that optimiser step (no student, teacher, optimiser-moment or DINO-centre
            update; the step still counts for the schedules). The check reads one bool per step back to
            the host (one sync).
        max_nonfinite_skips: with ``skip``, stop anyway after this many consecutive skipped steps.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        backbone_kwargs: dict[str, Any] | None = None,
        init_checkpoint: str | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        use_moe: bool = True,
        num_experts: int = 5,
        top_k: int = 1,
        expert_hidden_dim: int = 2048,
        bottleneck_dim: int = 1024,
        expert_layers: int = 2,
        out_dim: int = 65536,
        l2_norm: bool = True,
        projection: Projection = "weightnorm",
        norm_last_layer: bool = True,
        gate_weighted_output: bool = False,
        router_noise: float = 0.0,
        cst_loss: Literal["infonce", "dino_ce"] = "infonce",
        route_weight: float = 1.0,
        cst_weight: float = 1.0,
        load_balance_weight: float = 0.0,
        route_form: RouteForm = "student_weighted",
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        sinkhorn_eps: float = 0.05,
        sinkhorn_iters: int = 3,
        infonce_temp: float = 0.04,
        infonce_expert_mean: Literal["nonempty", "all"] = "nonempty",
        center_momentum: float = 0.9,
        teacher_views: Literal["global", "all"] = "global",
        num_global_views: int | None = None,
        base_lr: float = 1e-4,
        min_lr: float = 1e-8,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        betas: tuple[float, float] = (0.9, 0.95),
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        freeze_last_layer_epochs: int = 1,
        nonfinite: Literal["raise", "skip"] = "raise",
        max_nonfinite_skips: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._validate()
        self.num_experts = num_experts if use_moe else 1
        student_backbone = build_backbone(
            backbone, backbone_kwargs, init_checkpoint, grad_checkpointing
        )
        projector = MoEProjector(
            in_dim=student_backbone.num_features,
            num_experts=self.num_experts,
            top_k=top_k if use_moe else 1,
            hidden_dim=expert_hidden_dim,
            bottleneck_dim=bottleneck_dim,
            out_dim=out_dim,
            num_layers=expert_layers,
            l2_norm=l2_norm,
            projection=projection,
            norm_last_layer=norm_last_layer,
            gate_weighted_output=gate_weighted_output,
            router_noise=router_noise,
        )
        self.student = nn.ModuleDict({"backbone": student_backbone, "projector": projector})
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()  # no drop-path in the teacher, also when used outside a Trainer
        self.dino_loss = (
            DINOLoss(out_dim, student_temp, center_momentum) if cst_loss == "dino_ce" else None
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))
        self.num_global_views = num_global_views
        self._last_ema_step = -1
        self._nonfinite_streak = 0
        self._trained_in_step = False  # a batch of the current optimiser step had a finite loss
        # Base of the per-batch seed of the global RNG (seed_everything sets it).
        self._rng_base = torch.initial_seed()
        self._skipped_this_epoch: list[str] = []
        self._steps_per_epoch = 1
        self._total_steps = 1

    def _validate(self) -> None:
        h = self.hparams
        if h.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {h.num_experts}")
        if h.use_moe and not 1 <= h.top_k <= h.num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={h.num_experts}], got {h.top_k}")
        if not h.use_moe and h.route_weight != 0:
            raise ValueError(
                "use_moe=False (the DINO baseline) has no router: set route_weight: 0"
            )
        if h.load_balance_weight < 0:
            raise ValueError(f"load_balance_weight must be >= 0, got {h.load_balance_weight}")
        if h.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {h.nonfinite!r}")
        if h.max_nonfinite_skips < 0:
            raise ValueError(f"max_nonfinite_skips must be >= 0, got {h.max_nonfinite_skips}")
        if h.cst_loss not in ("infonce", "dino_ce"):
            raise ValueError(f"cst_loss must be 'infonce' or 'dino_ce', got {h.cst_loss!r}")
        if h.infonce_expert_mean not in ("nonempty", "all"):
            raise ValueError(f"infonce_expert_mean must be 'nonempty' or 'all', got {h.infonce_expert_mean!r}")
        if h.teacher_views not in ("global", "all"):
            raise ValueError(f"teacher_views must be 'global' or 'all', got {h.teacher_views!r}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "infonce_temp",
                     "sinkhorn_eps", "base_lr"):
            if h[name] <= 0:
                raise ValueError(f"{name} must be > 0, got {h[name]}")
        if h.num_global_views is not None and h.num_global_views < 1:
            raise ValueError(f"num_global_views must be >= 1, got {h.num_global_views}")

    def setup(self, stage: str) -> None:
        if self.num_global_views is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self.num_global_views = getattr(datamodule, "num_global", None)
            if self.num_global_views is None:
                raise ValueError(
                    "PretrainModule needs num_global_views: set it, or use a datamodule with a "
                    "num_global attribute"
                )

    # ------------------------------------------------------------------ schedules
    def on_train_start(self) -> None:
        trainer = self.trainer
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self._steps_per_epoch = max(1, per_epoch)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_epochs or trainer.max_steps: schedules need a length")
        self._total_steps = max(1, int(total))

    def lr_at(self, step: int, batch_size: int) -> float:
        h = self.hparams
        total_batch = batch_size * world_size() * self.trainer.accumulate_grad_batches
        peak = h.base_lr * total_batch / 256
        warmup = int(h.warmup_epochs * self._steps_per_epoch)
        return warmup_cosine_schedule(step, self._total_steps, min(warmup, self._total_steps), peak, h.min_lr)

    def weight_decay_at(self, step: int) -> float:
        h = self.hparams
        return cosine_schedule(step, self._total_steps, h.weight_decay, h.weight_decay_end)

    def momentum_at(self, step: int) -> float:
        h = self.hparams
        return momentum_at(step, self._total_steps, h.momentum_start, h.momentum_end)

    def teacher_temp_at(self, step: int) -> float:
        h = self.hparams
        warmup = int(h.warmup_teacher_temp_epochs * self._steps_per_epoch)
        return linear_warmup(step, warmup, h.warmup_teacher_temp, h.teacher_temp)

    # ------------------------------------------------------------------ model
    def train(self, mode: bool = True) -> "PretrainModule":
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0-255 float) B x 3 x H x W -> normalised float, on the device."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    @property
    def last_layer(self) -> nn.Module:
        return self.student["projector"].projection

    def configure_model(self) -> None:
        # Here, not in __init__: runs in every process after launch (a compiled module does not
        # pickle for spawn) and leaves state_dict keys as they are (nn.Module.compile).
        if self.hparams.compile:
            for part in (self.student, self.teacher):
                if getattr(part["backbone"], "_compiled_call_impl", None) is None:
                    part["backbone"].compile(dynamic=False)

    def _device_scalars(self, values: dict[str, float]) -> dict[str, torch.Tensor]:
        """Python floats as device tensors for ``self.log``, copied without blocking: given a
        float, ``self.log`` makes a blocking host-to-device copy (a host sync per step on CUDA)."""
        host = torch.tensor(list(values.values()), dtype=torch.float32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return dict(zip(values, host.to(self.device, non_blocking=True).unbind()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        fused = next(self.parameters()).is_cuda
        return torch.optim.AdamW(
            decay_groups([self.student]), lr=h.base_lr, betas=tuple(h.betas),
            weight_decay=h.weight_decay, fused=fused,
        )

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        step = self.global_step
        if 0 < step and self._last_ema_step < step:
            # Resumed from a checkpoint written by a callback's on_train_batch_end, i.e. before
            # this module's EMA update of that step: apply it now, as the uninterrupted run did.
            ema_update(self.teacher, self.student, self.momentum_at(step - 1))
            self._last_ema_step = step
        # Stochastic depth and router noise draw from the global RNG; seeding it per batch from
        # (seed, epoch, batch, rank) gives a resumed run the same draws as an uninterrupted one.
        torch.manual_seed(self._batch_seed(self.current_epoch, batch_idx))
        lr = self.lr_at(step, batch["views"][0].shape[0])
        wd = self.weight_decay_at(step)
        for optimizer in self.trainer.optimizers:
            set_lr_and_wd(optimizer, lr, wd)
        self.log_dict(
            self._device_scalars({"train/lr": lr, "train/weight_decay": wd}),
            on_step=True, on_epoch=False,
        )

    def _batch_seed(self, epoch: int, batch_idx: int) -> int:
        words = np.random.SeedSequence([self._rng_base, epoch, batch_idx, rank()]).generate_state(2)
        return int(words[0]) << 32 | int(words[1])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["midol_last_ema_step"] = self._last_ema_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # -1 for checkpoints written before this key existed: one EMA catch-up step.
        self._last_ema_step = int(checkpoint.get("midol_last_ema_step", -1))

    def on_after_backward(self) -> None:
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for param in self.last_layer.parameters():
                param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._skipped_this_epoch.extend(batch.get("skipped", ()))
        # Guarded by "did global_step advance?" so gradient accumulation updates once per step.
        step = self.global_step
        if step > self._last_ema_step and step > 0:
            self._last_ema_step = step
            if not self._trained_in_step:
                return  # every batch of this step was skipped (nonfinite: skip): student unchanged
            self._trained_in_step = False
            momentum = self.momentum_at(step - 1)
            ema_update(self.teacher, self.student, momentum)
            self.log_dict(
                self._device_scalars({"train/momentum": momentum}), on_step=True, on_epoch=False
            )

    def on_train_epoch_end(self) -> None:
        # The data workers warn per file as they meet it; this is the per-epoch count.
        if self._skipped_this_epoch:
            rank_zero_warn(
                f"epoch {self.current_epoch}: {len(self._skipped_this_epoch)} unreadable image(s) "
                "were skipped and replaced by the next readable one, e.g. "
                + "; ".join(self._skipped_this_epoch[:5])
            )
        self.log("train/skipped_images", float(len(self._skipped_this_epoch)), on_epoch=True)
        self._skipped_this_epoch = []

    # ------------------------------------------------------------------ step
    def _check_finite(self, terms: dict[str, torch.Tensor], batch_idx: int) -> bool:
        """False when the step must be skipped; raises in ``nonfinite="raise"`` mode.

        One host sync per step (the bool). Ranks agree (max over ranks), so under DDP all of
        them skip or stop together instead of hanging in the gradient all-reduce."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        bad = all_reduce_max((~torch.isfinite(values)).float())
        if not bool(bad.any()):
            self._nonfinite_streak = 0
            return True
        names = [name for name, b in zip(terms, bad.tolist()) if b]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(terms, values.tolist()))
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        message = f"non-finite loss {', '.join(names)} at {where}: {shown}"
        if world_size() > 1:
            message += f" (values on rank {rank()}; non-finite on at least one rank)"
        hint = (
            ". Usual causes: too high a learning rate, fp16 overflow (use precision: bf16-mixed), "
            "or temperatures too low. See the Troubleshooting section of the README."
        )
        if self.hparams.nonfinite == "raise":
            raise FloatingPointError(
                message + hint + " To skip such steps instead, set model.init_args.nonfinite: skip"
            )
        self._nonfinite_streak += 1
        if self._nonfinite_streak > self.hparams.max_nonfinite_skips:
            raise FloatingPointError(
                f"{message}: {self._nonfinite_streak} consecutive non-finite steps, more than "
                f"max_nonfinite_skips={self.hparams.max_nonfinite_skips}" + hint
            )
        rank_zero_warn(f"{message}; skipping this optimiser step (nonfinite: skip)")
        return False

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        h = self.hparams
        views = [self.normalize(v) for v in batch["views"]]
        num_views, batch_size = len(views), views[0].shape[0]
        num_teacher = self.num_global_views if h.teacher_views == "global" else num_views
        if num_teacher > num_views:
            raise ValueError(f"{num_teacher} teacher views requested but the batch has {num_views}")
        teacher_temp = self.teacher_temp_at(self.global_step)

        with torch.no_grad():
            t_out = self.teacher["projector"](encode_views(self.teacher["backbone"], views[:num_teacher]).flatten(0, 1))
        s_out = self.student["projector"](encode_views(self.student["backbone"], views).flatten(0, 1))
        s_rep = s_out.representation.view(num_views, batch_size, -1)
        t_rep = t_out.representation.view(num_teacher, batch_size, -1)

        logs: dict[str, Any] = self._device_scalars({"train/teacher_temp": teacher_temp})
        l_route = l_balance = s_rep.new_zeros(())
        if s_out.router_logits is not None:
            n = self.num_experts
            log_a_t = teacher_routing_log_probs(
                t_out.router_logits.view(num_teacher, batch_size, n), teacher_temp,
                h.sinkhorn_eps, h.sinkhorn_iters,
            )
            # One expert per image for L_cst: the teacher's balanced routing, averaged over views.
            assignment = log_a_t.exp().mean(dim=0).argmax(dim=-1)
            l_route = routing_cross_entropy(
                s_out.router_logits.view(num_views, batch_size, n), log_a_t, h.student_temp, h.route_form
            )
            student_top1 = s_out.expert_index[:, 0].view(num_views, batch_size)[:num_teacher]
            logs["route/student_teacher_agreement"] = (student_top1 == assignment).float().mean()
            logs["train/l_route"] = l_route
            if h.load_balance_weight > 0:
                l_balance = switch_load_balance_loss(s_out.router_logits, s_out.expert_index[:, 0])
                logs["train/l_balance"] = l_balance
        else:
            assignment = torch.zeros(batch_size, dtype=torch.long, device=self.device)

        # The DINO centre update inside the loss must be undone if this step is skipped.
        undo_center = self.dino_loss is not None and h.nonfinite == "skip"
        center = self.dino_loss.center.clone() if undo_center else None
        if self.dino_loss is not None:
            l_cst = self.dino_loss(s_rep, t_rep, teacher_temp)
        else:
            l_cst = expert_infonce_loss(
                s_rep, t_rep, assignment, self.num_experts, h.infonce_temp,
                check_inputs=False, expert_mean=h.infonce_expert_mean,
            )
        loss = h.route_weight * l_route + h.cst_weight * l_cst + h.load_balance_weight * l_balance
        terms = {"l_route": l_route, "l_cst": l_cst, "l_balance": l_balance, "total": loss}
        if not self._check_finite(terms, batch_idx):
            if self.dino_loss is not None and center is not None:
                self.dino_loss.center.copy_(center)
            return None  # Lightning skips backward and the optimiser step
        # index_add_, not bincount: CUDA bincount reads the maximum back to the host.
        usage = assignment.new_zeros(self.num_experts, dtype=torch.float32).index_add_(
            0, assignment, assignment.new_ones(batch_size, dtype=torch.float32)
        ) / batch_size
        logs.update({f"route/expert_{i}": usage[i] for i in range(self.num_experts)})
        logs.update({"train/loss": loss, "train/l_cst": l_cst})
        self.log_dict(logs, on_step=True, on_epoch=False)
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(1, every) == 0:
            # Progress-bar values are read back to the host at the end of every step that
            # logs one (a sync): show the loss at the logger's pace instead.
            self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.images_seen += batch_size * world_size()
        self._trained_in_step = True
        return {"loss": loss, "assignment": assignment.detach()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled teacher-backbone features of uint8 images (what downstream tasks use)."""
        return self.teacher["backbone"](self.normalize(images))

    @torch.no_grad()
    def route_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher router's top-1 expert and its probability for uint8 images (B x 3 x H x W).

        Per-image, without Sinkhorn balancing (which depends on the batch it sits in)."""
        router = self.teacher["projector"].router
        if router is None:
            zeros = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            return zeros, torch.ones(images.shape[0], device=images.device)
        probs = router(self.teacher_features(images)).float().softmax(dim=-1)
        confidence, expert = probs.max(dim=-1)
        return expert, confidence
