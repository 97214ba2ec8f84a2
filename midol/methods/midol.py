"""M-IDoL (arXiv 2604.08936): a DINO-style student/EMA teacher whose outputs pass through a
Mixture-of-Experts projector, trained with L_route (M-IDoL Eq. 15) and L_cst (M-IDoL Eq. 19-20),
docs/papers/m-idol.md. The plain DINO baseline (M-IDoL Table 2 row 1) is one switch away
(``use_moe: false``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from midol.losses import (
    DINOLoss,
    expert_infonce_loss,
    routing_cross_entropy,
    switch_load_balance_loss,
    teacher_routing_log_probs,
)
from midol.losses.routing import RouteForm
from midol.methods.init_weights import DEFAULT_MIN_LOADED, load_init_weights, save_init_report
from midol.methods.interfaces import BackboneExport, ExpertChoice, Routing, StepOutput
from midol.methods.momentum import MomentumMethod, MomentumMethodOptions, frozen_copy
from midol.methods.speed import resolve_checkpointing
from midol.methods.validation import MIN_TEMPERATURE, TEMPERATURE_RANGE, finite, raise_on_failed
from midol.models import DEFAULT_BACKBONE, MoEProjector, build_backbone
from midol.models.moe import Projection
from midol.models.speed_switches import set_fused_attention
from midol.models.weight_maps import Layout
from midol.optim.schedules import linear_warmup
from midol.utils.cluster_metrics import distribution_stats, mean_pairwise_cosine
from midol.utils.deferred import DeferredUpdate


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


class MIDoLOptions(MomentumMethodOptions, Protocol):
    """``self.hparams`` of :class:`MIDoL`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    backbone: str
    backbone_kwargs: dict[str, Any] | None
    init_checkpoint: str | None
    init_layout: Layout
    min_loaded: float
    grad_checkpointing: bool | Literal['auto']
    fused_attn: bool | None
    use_moe: bool
    num_experts: int
    top_k: int
    expert_hidden_dim: int
    bottleneck_dim: int
    expert_layers: int
    out_dim: int
    l2_norm: bool
    projection: Projection
    norm_last_layer: bool
    gate_weighted_output: bool
    router_noise: float
    gate_noise: float
    router_bias: bool
    cst_loss: Literal['infonce', 'dino_ce']
    route_weight: float
    route_backbone_grad: bool
    cst_weight: float
    load_balance_weight: float
    route_form: RouteForm
    student_temp: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: int
    sinkhorn_eps: float
    sinkhorn_iters: int
    sinkhorn_impl: Literal['swav', 'authors']
    infonce_temp: float
    infonce_expert_mean: Literal['nonempty', 'all']
    infonce_gather: Literal['float32', 'bfloat16']
    center_momentum: float
    teacher_views: Literal['global', 'all']
    num_global_views: int | None
    freeze_last_layer_epochs: int


class MIDoL(MomentumMethod):
    """M-IDoL pre-training; the defaults are the paper's settings.

    Values that would train silently wrong raise a ValueError naming the option and its range:
    dims and counts below 1, temperatures and ``sinkhorn_eps`` below 1e-3 or not finite, negative
    or non-finite weights, noise and epochs, momenta outside [0, 1], all loss weights 0.

    Args:
        backbone: timm model name (Swin-B in the paper).
        backbone_kwargs: Keyword overrides for ``timm.create_model`` (e.g. a tiny Swin).
        init_checkpoint: Local weights to start the student (and teacher) from; the authors
            used ImageNet-22k Swin-B weights. What loaded is printed and saved as
            ``init_report.json`` in the run folder (:mod:`midol.methods.init_weights`).
        init_layout: Key layout of ``init_checkpoint``: ``auto`` (read from its keys),
            ``timm``, ``swin_ms`` (Microsoft's Swin release), ``dinov2``, ``dinov3``, ``mae``
            (:mod:`midol.models.weight_maps`).
        min_loaded: Refuse to start when less than this share of the backbone's tensors
            comes from ``init_checkpoint`` (1.0: every tensor must).
        grad_checkpointing: Activation checkpointing in the backbone (memory for ~1/3 compute).
            ``auto``: decided at the first training batch from its size and the device's
            memory (:mod:`midol.models.speed_switches`; off on CPU, on for a backbone without
            a memory coefficient, with a warning).
        fused_attn: Run the backbone's timm attention through ``scaled_dot_product_attention``
            (for Swin what ``TIMM_FUSED_ATTN=2`` does); None leaves timm's choice.
        use_moe: False gives the plain DINO baseline (paper Table 2 row 1): one FFN of the
            same shape instead of N routed experts, no router, no L_route.
        num_experts: N, one per latent modality (paper: 5).
        top_k: Experts per image (paper: 1).
        expert_hidden_dim: Hidden width of each expert FFN (authors' code: 2048).
        bottleneck_dim: Output width of each expert FFN (authors' code: 1024).
        expert_layers: Linear layers per expert FFN (authors' code: 2).
        out_dim: Width of the shared projection l (authors' code: 65536).
        l2_norm: L2-normalise the expert output before the projection (the authors' head).
        projection: ``weightnorm`` (weight-normalised linear, the authors' head) or ``linear``
            (a plain linear l, Eq. 11).
        norm_last_layer: Freeze the norm of the weight-normalised projection (DINO).
        gate_weighted_output: Multiply the top-1 expert output by its routing probability.
        router_noise: Std of Gaussian noise on the student's router logits, also seen by L_route
            (0 = off; midol's option, not the authors').
        gate_noise: The released code's Tutel gate noise: std ``gate_noise / N`` on the logits
            that choose and weight experts in training mode (student, and the teacher with
            ``teacher_mode: train``); L_route gets the noise-free logits (authors: 1.0).
        router_bias: A bias in the router's linear layer (the authors' Tutel router has none).
        cst_loss: ``infonce`` (paper Eq. 19-20, default) or ``dino_ce`` (authors' code).
        route_weight: Weight of L_route in L = route_weight L_route + cst_weight L_cst (Eq. 21);
            L_route is computed and logged even with weight 0 (so routing stays visible).
        route_backbone_grad: Whether L_route's gradient reaches the student backbone (True, the
            paper: Eq. 21 sums L_route (Eq. 15) and L_cst and back-propagates both through S).
            False stops it at the backbone: the student's router logits that L_route (Eq. 15)
            reads are computed from the detached backbone features (the same values, and the
            same router noise when ``router_noise`` is on), so the router still learns from
            L_route while the backbone learns only from L_cst (and the load-balance term, if
            any). The gating and L_cst's path are unchanged; the cost is one more router call
            (a d -> N linear layer). Needs ``use_moe: true`` (without a router there is no
            L_route to stop).
        cst_weight: Weight of L_cst.
        load_balance_weight: Weight of a Switch-style load-balance term on the student router
            (0 = off; the paper has none).
        route_form: ``student_weighted`` (-sum a_S log a_T, authors' code, default) or
            ``teacher_target`` (-sum a_T log a_S, SwAV style).
        student_temp: tau_s for routing and for the DINO cross-entropy (0.1).
        teacher_temp: tau_t for Sinkhorn routing and the DINO target (0.04).
        warmup_teacher_temp: Starting tau_t of an optional linear warm-up.
        warmup_teacher_temp_epochs: Length of that warm-up (0 = none).
        sinkhorn_eps: Sinkhorn-Knopp epsilon (0.05).
        sinkhorn_iters: Sinkhorn-Knopp iterations (3).
        sinkhorn_impl: ``swav``: exact SwAV balancing in log space (default); ``authors``: the
            released code's variant (per-image max shift before ``exp``, Q floored at 1e-12,
            so ``-log a_T`` stays below ~27.6; see ``losses/sinkhorn.py``).
        infonce_temp: tau of Eq. 19 (0.04).
        infonce_expert_mean: Average L_cst^i over the experts that received images
            (``nonempty``, default) or divide by N as Eq. 20 prints it (``all``).
        infonce_gather: Under DDP, the dtype other ranks' teacher vectors are all-gathered in
            for L_cst's denominator: ``float32`` (default, exact) or ``bfloat16`` (half the
            traffic: ~1 GiB less per step at 64 GPUs; loss within ~2e-3 relative, tested on 2
            processes). The logits are float32 either way.
        center_momentum: Centre momentum of the DINO cross-entropy (0.9).
        teacher_views: The teacher sees the ``global`` views (authors' code) or ``all`` views
            (the paper's equations).
        num_global_views: How many leading views of a batch are global crops; None (default)
            takes the batch's ``num_global`` (set by the datamodule's transform).
        freeze_last_layer_epochs: Epochs during which the shared projection l gets no update.
        **kwargs: Optimisation, EMA and safety options of
            :class:`~midol.methods.momentum.MomentumMethod` and
            :class:`~midol.methods.base.BaseMethod` (``base_lr``, ``betas``, ``momentum_start``,
            ``nonfinite``, ...).
    """

    if TYPE_CHECKING:

        @property
        def hparams(self) -> MIDoLOptions: ...  # type: ignore[override]

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        backbone_kwargs: dict[str, Any] | None = None,
        init_checkpoint: str | None = None,
        init_layout: Layout = "auto",
        min_loaded: float = DEFAULT_MIN_LOADED,
        grad_checkpointing: bool | Literal["auto"] = False,
        fused_attn: bool | None = None,
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
        gate_noise: float = 0.0,
        router_bias: bool = True,
        cst_loss: Literal["infonce", "dino_ce"] = "infonce",
        route_weight: float = 1.0,
        route_backbone_grad: bool = True,
        cst_weight: float = 1.0,
        load_balance_weight: float = 0.0,
        route_form: RouteForm = "student_weighted",
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        sinkhorn_eps: float = 0.05,
        sinkhorn_iters: int = 3,
        sinkhorn_impl: Literal["swav", "authors"] = "swav",
        infonce_temp: float = 0.04,
        infonce_expert_mean: Literal["nonempty", "all"] = "nonempty",
        infonce_gather: Literal["float32", "bfloat16"] = "float32",
        center_momentum: float = 0.9,
        teacher_views: Literal["global", "all"] = "global",
        num_global_views: int | None = None,
        freeze_last_layer_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._validate()
        self.num_experts = num_experts if use_moe else 1
        student_backbone = build_backbone(backbone, backbone_kwargs, None, grad_checkpointing is True)
        self.init_report = load_init_weights(student_backbone, init_checkpoint, init_layout, min_loaded)
        if fused_attn is not None:
            set_fused_attention(student_backbone, fused_attn)
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
            gate_noise=gate_noise,
            router_bias=router_bias,
        )
        self.student = nn.ModuleDict({"backbone": student_backbone, "projector": projector})
        self._checkpointing_resolved = False
        self.teacher = frozen_copy(self.student)
        self.train(self.training)  # the teacher's mode follows teacher_mode from construction
        self.dino_loss = (
            DINOLoss(out_dim, student_temp, center_momentum) if cst_loss == "dino_ce" else None
        )
        if self.dino_loss is not None:
            self.dino_loss.defer = True  # committed after backward (BaseMethod.deferred_updates)

    def _validate(self) -> None:
        h = self.hparams
        if h.grad_checkpointing not in (True, False, "auto"):
            raise ValueError(f"grad_checkpointing must be true, false or 'auto', got "
                             f"{h.grad_checkpointing!r}")
        if h.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {h.num_experts}")
        if h.use_moe and not 1 <= h.top_k <= h.num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={h.num_experts}], got {h.top_k}")
        if not h.use_moe and h.route_weight != 0:
            raise ValueError("use_moe=False (the DINO baseline) has no router: set route_weight: 0")
        if not isinstance(h.route_backbone_grad, bool):
            raise ValueError(f"route_backbone_grad must be true or false, got "
                             f"{h.route_backbone_grad!r}")
        if not h.use_moe and not h.route_backbone_grad:
            raise ValueError("route_backbone_grad=False stops L_route's gradient at the backbone, "
                             "but use_moe=False (the DINO baseline) has no router and no "
                             "L_route: leave route_backbone_grad: true")
        if h.cst_loss not in ("infonce", "dino_ce"):
            raise ValueError(f"cst_loss must be 'infonce' or 'dino_ce', got {h.cst_loss!r}")
        if h.infonce_expert_mean not in ("nonempty", "all"):
            raise ValueError(f"infonce_expert_mean must be 'nonempty' or 'all', got {h.infonce_expert_mean!r}")
        if h.infonce_gather not in ("float32", "bfloat16"):
            raise ValueError(f"infonce_gather must be 'float32' or 'bfloat16', got {h.infonce_gather!r}")
        if h.sinkhorn_impl not in ("swav", "authors"):
            raise ValueError(f"sinkhorn_impl must be 'swav' or 'authors', got {h.sinkhorn_impl!r}")
        if h.teacher_views not in ("global", "all"):
            raise ValueError(f"teacher_views must be 'global' or 'all', got {h.teacher_views!r}")
        checks = [(name, h[name] >= 1, ">= 1") for name in (
            "expert_hidden_dim", "bottleneck_dim", "expert_layers", "out_dim", "sinkhorn_iters")]
        # Temperatures (and the Sinkhorn epsilon, which divides the router logits the same way)
        # below the floor give losses of ~1/temperature that are finite, so the non-finite check
        # never stops them.
        checks += [(name, finite(h[name]) and h[name] >= MIN_TEMPERATURE, TEMPERATURE_RANGE)
                   for name in ("student_temp", "teacher_temp", "warmup_teacher_temp",
                                "infonce_temp", "sinkhorn_eps")]
        checks += [(name, finite(h[name]) and h[name] >= 0, "finite and >= 0")
                   for name in ("route_weight", "cst_weight", "load_balance_weight", "router_noise",
                                "gate_noise", "warmup_teacher_temp_epochs",
                                "freeze_last_layer_epochs")]
        checks.append(("center_momentum", 0 <= h.center_momentum <= 1, "in [0, 1]"))
        if h.num_global_views is not None:
            checks.append(("num_global_views", h.num_global_views >= 1, ">= 1"))
        raise_on_failed(h, checks)
        if h.route_weight == 0 and h.cst_weight == 0 and h.load_balance_weight == 0:
            raise ValueError(
                "route_weight, cst_weight and load_balance_weight are all 0: the loss is a "
                "constant and nothing trains; give at least one of them a weight > 0"
            )

    # ------------------------------------------------------------------ the base's hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        save_init_report(self, self.init_report)  # the run folder records its start weights

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student, self.teacher)]

    def compile_targets(self) -> list[nn.Module]:
        return [self.student["backbone"], self.teacher["backbone"]]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.hparams.grad_checkpointing == "auto" and not self._checkpointing_resolved:
            self._checkpointing_resolved = True
            on = resolve_checkpointing(self, self.hparams.backbone, batch["views"])
            self.student["backbone"].set_grad_checkpointing(on)

    def teacher_temp_at(self, step: int) -> float:
        h = self.hparams
        warmup = self.epochs_to_steps(h.warmup_teacher_temp_epochs)
        return linear_warmup(step, warmup, h.warmup_teacher_temp, h.teacher_temp)

    @property
    def last_layer(self) -> nn.Module:
        return self.student["projector"].projection

    def deferred_updates(self) -> list[DeferredUpdate]:
        # the DINO centre moves only with a step that trains (dinov2's order)
        return [self.dino_loss] if self.dino_loss is not None else []

    def on_after_backward(self) -> None:
        super().on_after_backward()
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for param in self.last_layer.parameters():
                param.grad = None

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput | None:
        h = self.hparams
        views = [self.normalizer(v) for v in batch["views"]]
        num_views, batch_size = len(views), views[0].shape[0]
        num_global = h.num_global_views or batch.get("num_global")
        if num_global is None:
            raise ValueError("the batch has no 'num_global' and num_global_views is not set")
        num_teacher = num_global if h.teacher_views == "global" else num_views
        if num_teacher > num_views:
            raise ValueError(f"{num_teacher} teacher views requested but the batch has {num_views}")
        teacher_temp = self.teacher_temp_at(self.global_step)

        with torch.no_grad():
            t_out = self.teacher["projector"](
                encode_views(self.teacher["backbone"], views[:num_teacher]).flatten(0, 1))
        s_feats = encode_views(self.student["backbone"], views).flatten(0, 1)
        s_out = self.student["projector"](s_feats)
        s_rep = s_out.representation.view(num_views, batch_size, -1)
        t_rep = t_out.representation.view(num_teacher, batch_size, -1)
        health = self._health(t_out, batch_size, teacher_temp) if self.health_due() else {}

        logs: dict[str, Any] = self.device_scalars({"train/teacher_temp": teacher_temp})
        routing: dict[str, ExpertChoice] = {}
        l_route = l_balance = s_rep.new_zeros(())
        if s_out.router_logits is not None:
            n = self.num_experts
            t_logits = t_out.router_logits.view(num_teacher, batch_size, n)
            log_a_t = teacher_routing_log_probs(t_logits, teacher_temp, h.sinkhorn_eps, h.sinkhorn_iters,
                                                h.sinkhorn_impl)
            # One expert per image for L_cst: the teacher's balanced routing, averaged over views.
            assignment = log_a_t.exp().mean(dim=0).argmax(dim=-1)
            s_route_logits = s_out.router_logits
            if not h.route_backbone_grad:
                s_route_logits = self._route_logits_without_backbone_grad(s_feats, s_route_logits)
            l_route = routing_cross_entropy(
                s_route_logits.view(num_views, batch_size, n), log_a_t, h.student_temp, h.route_form
            )
            student_top1 = s_out.expert_index[:, 0].view(num_views, batch_size)[:num_teacher]
            logs["route/student_teacher_agreement"] = (student_top1 == assignment).float().mean()
            logs["train/l_route"] = l_route
            if h.load_balance_weight > 0:
                l_balance = switch_load_balance_loss(s_out.router_logits, s_out.expert_index[:, 0])
                logs["train/l_balance"] = l_balance
            top1 = t_logits.detach().float().mean(dim=0).argmax(dim=-1)
            routing = {
                "route_epoch": ExpertChoice(assignment, n, collapse_check=True, idle_check=False,
                                            label="training assignment"),
                "route_top1": ExpertChoice(top1, n, collapse_check=False, idle_check=True,
                                           label="teacher router top-1 (training images)"),
            }
        else:  # no MoE: one expert takes every image (reported, never a collapse)
            assignment = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            routing = {"route_epoch": ExpertChoice(assignment, 1, collapse_check=False,
                                                   idle_check=False, label="one expert (no MoE)")}

        if self.dino_loss is not None:
            l_cst = self.dino_loss(s_rep, t_rep, teacher_temp)
        else:
            l_cst = expert_infonce_loss(
                s_rep, t_rep, assignment, self.num_experts, h.infonce_temp,
                check_inputs=False, expert_mean=h.infonce_expert_mean,
                gather_dtype=getattr(torch, h.infonce_gather),
            )
        loss = h.route_weight * l_route + h.cst_weight * l_cst + h.load_balance_weight * l_balance
        terms = {"l_route": l_route, "l_cst": l_cst, "l_balance": l_balance, "total": loss}
        if not self.check_finite(terms, batch_idx):  # the DINO centre's update is discarded
            return None  # Lightning skips backward and the optimiser step
        # index_add_, not bincount: CUDA bincount reads the maximum back to the host.
        usage = assignment.new_zeros(self.num_experts, dtype=torch.float32).index_add_(
            0, assignment, assignment.new_ones(batch_size, dtype=torch.float32)
        ) / batch_size
        logs.update({f"route/expert_{i}": usage[i] for i in range(self.num_experts)})
        logs.update({"train/loss": loss, "train/l_cst": l_cst})
        self.log_dict(logs, on_step=True, on_epoch=False)
        weighted = {"l_cst": h.cst_weight * l_cst}
        if s_out.router_logits is not None:
            weighted["l_route"] = h.route_weight * l_route
        self.log_term_grad_norms(weighted, self.student["backbone"])
        self.log_progress(loss)
        self.mark_trained(batch_size)
        return {"loss": loss, "routing": routing, "health": health}

    def _route_logits_without_backbone_grad(self, feats: torch.Tensor,
                                            logits: torch.Tensor) -> torch.Tensor:
        """The student router's logits for L_route with no gradient path into the backbone
        (``route_backbone_grad: false``): the router applied to the detached features, plus
        the router noise that ``logits`` (the projector's own, which chose the experts) carry.
        The router's parameters keep L_route's gradient."""
        projector = self.student["projector"]
        router = projector.router
        out = router(feats.detach())
        if projector.training and projector.router_noise > 0:
            with torch.no_grad():  # the projector's draw (to rounding): logits = router + noise
                noise = logits - router(feats)
            out = out + noise
        return out

    @torch.no_grad()
    def _health(self, t_out: Any, batch_size: int, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Teacher-collapse diagnostics of this step's teacher outputs (before the DINO centre
        moves): mean cosine of different images' representations (first view), the centred,
        sharpened DINO target's statistics, and the teacher router's entropy before Sinkhorn."""
        rep = t_out.representation
        stats: dict[str, torch.Tensor] = {}
        first_view = rep[:batch_size]
        if first_view.shape[0] >= 2:
            stats["teacher/mean_cosine"] = mean_pairwise_cosine(first_view)
        if self.dino_loss is not None:
            probs = ((rep.float() - self.dino_loss.center) / teacher_temp).softmax(dim=-1)
            stats.update({f"teacher/{k}": v for k, v in distribution_stats(probs).items()})
        if t_out.router_logits is not None:
            routing = distribution_stats((t_out.router_logits.float() / teacher_temp).softmax(dim=-1))
            stats["route/router_entropy"] = routing["entropy"]
            stats["route/router_info"] = routing["info"]
        return stats

    # ------------------------------------------------------------------ what it exports, how it routes
    def export_modules(self) -> dict[str, BackboneExport]:
        h = self.hparams
        overrides = dict(h.backbone_kwargs or {})
        return {
            "teacher_backbone": BackboneExport(
                self.teacher["backbone"], h.backbone, overrides,
                description="M-IDoL teacher backbone (EMA of the student): what downstream tasks use"),
            "student_backbone": BackboneExport(
                self.student["backbone"], h.backbone, overrides, description="M-IDoL student backbone"),
        }

    def summary_metrics(self) -> list[str]:
        """Logged values that the end-of-run summary reports (their last value)."""
        return ["train/l_route", "train/l_cst"]

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled teacher-backbone features of uint8 images (what downstream tasks use)."""
        return self.teacher["backbone"](self.normalizer(images))

    teacher_features = embed  # the name of midol <= 0.1.0

    def routers(self) -> dict[str, int]:
        return {"projector": self.num_experts} if self.teacher["projector"].router is not None else {}

    def pooled_router(self) -> nn.Module | None:
        """The teacher's router, a head on the exported backbone's pooled features (Grad-CAM)."""
        return self.teacher["projector"].router

    @torch.no_grad()
    def route(self, images: torch.Tensor, temperature: float | None = None
              ) -> tuple[torch.Tensor, dict[str, Routing]]:
        """Teacher features and the teacher router's per-image top-1 under
        ``softmax(g_T(f) / temperature)`` (default: ``teacher_temp``), without Sinkhorn
        balancing (which depends on the batch an image sits in)."""
        features = self.embed(images)
        router = self.teacher["projector"].router
        if router is None:
            return features, {}
        temperature = float(self.hparams.teacher_temp if temperature is None else temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        probs = (router(features).float() / temperature).softmax(dim=-1)
        confidence, expert = probs.max(dim=-1)
        return features, {"projector": Routing(expert, confidence)}


PretrainModule = MIDoL  # the class name of midol <= 0.1.0: every old config and checkpoint loads
