"""DEX pre-training (Director-Experts, He, You, Li 2026): a timm ViT whose block MLPs are DEX
layers (image-wise routed experts + a group-EMA director), trained with MAE.

``L = L_MAE + lambda_co L_co + lambda_bal L_bal`` (DEX Eq. 8; code: 0.01 / 0.01).
``use_dex: false`` is the plain-MAE baseline of the same ViT (dense MLPs, no L_co, no L_bal),
the monolithic pre-training DEX claims to improve on. Facts and the code-vs-supplement table:
``docs/papers/dex.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

import timm
import torch
from torch import nn

from midol.losses.dex import balance_loss, coherence_loss, layer_weights
from midol.losses.mae import masked_mae_loss, patchify
from midol.methods.base import BaseMethod, BaseMethodOptions
from midol.methods.init_weights import DEFAULT_MIN_LOADED, load_init_weights, save_init_report
from midol.methods.interfaces import BackboneExport, ExpertChoice, Routing, StepOutput
from midol.methods.validation import MIN_TEMPERATURE, TEMPERATURE_RANGE, finite, raise_on_failed
from midol.models.backbone import build_backbone
from midol.models.dex import (
    DISPATCHES,
    DEXDispatch,
    DEXLayer,
    director_state_dict,
    inject_dex,
    set_dex_mode,
)
from midol.models.mae import MAEDecoder, Masking, encode_visible, random_masking
from midol.models.weight_maps import Layout
from midol.optim.schedules import cosine_schedule
from midol.utils.deferred import DeferredUpdate

CoForm = Literal["ce", "cosine"]
BalSchedule = Literal["constant", "cosine"]
DEXMode = Literal["experts", "director"]
CompileScope = Literal["auto", "model", "decoder"]




class DEXOptions(BaseMethodOptions, Protocol):
    """``self.hparams`` of :class:`DEX`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    backbone: str
    backbone_kwargs: dict[str, Any] | None
    img_size: int
    init_checkpoint: str | None
    init_layout: Layout
    min_loaded: float
    grad_checkpointing: bool
    use_dex: bool
    num_experts: int
    top_k: int
    dex_blocks: list[int] | None
    routing_temperature: float
    freq_momentum: float
    token_routing: bool
    dex_dispatch: DEXDispatch
    noise_start: float
    noise_end: float
    director_momentum_start: float
    director_momentum_end: float
    mask_ratio: float
    norm_pix_loss: bool
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    co_weight: float
    co_form: CoForm
    co_director_temp: float
    co_expert_temp: float
    bal_weight: float
    bal_schedule: BalSchedule
    compile_scope: CompileScope


class DEXStepModule(nn.Module):
    """The differentiable part of a DEX (or plain-MAE) training step as one module: the MAE
    encoder with its DEX layers, the decoder, L_MAE and the DEX terms (L_co weighted by
    ``alpha``, DEX Eq. 7-8; L_bal), each block's director-expert alignment and top-1 choices.
    ``compile_scope: model`` compiles this, so with ``dense`` dispatch the whole forward is one
    graph (issue 30). Holds the DEX's own ViT and decoder, no parameters of its own."""

    def __init__(self, vit: nn.Module, decoder: MAEDecoder, blocks: list[int], patch_size: int,
                 norm_pix_loss: bool, co_form: CoForm, co_director_temp: float,
                 co_expert_temp: float) -> None:
        super().__init__()
        self.vit, self.decoder, self.blocks = vit, decoder, list(blocks)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.co_form, self.co_director_temp, self.co_expert_temp = co_form, co_director_temp, co_expert_temp

    def forward(self, images: torch.Tensor, keep: torch.Tensor, restore: torch.Tensor,
                mask: torch.Tensor, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """``l_mae``; with DEX layers also ``l_co``, ``l_bal``, ``alignment`` (blocks) and
        ``top1`` (blocks x rows, each row's first choice)."""
        masking = Masking(keep, restore, mask)
        pred = self.decoder(encode_visible(self.vit, images, masking), masking)  # type: ignore[arg-type]
        out = {"l_mae": masked_mae_loss(pred.float(), patchify(images, self.patch_size), mask,
                                        self.norm_pix_loss)}
        if not self.blocks:
            return out
        co, bal, align, top1 = [], [], [], []
        for block in self.blocks:
            layer = self.vit.blocks[block].mlp  # type: ignore[index]
            last = layer.last
            if last is None or last.director_out is None:
                raise RuntimeError(f"DEX block {block} kept no routing state this step")
            expert_out, director_out = last.expert_out.float(), last.director_out.float()
            co.append(coherence_loss(expert_out, director_out, self.co_form,
                                     self.co_director_temp, self.co_expert_temp))
            bal.append(balance_loss(last.probs))
            with torch.no_grad():
                align.append(torch.nn.functional.cosine_similarity(expert_out, director_out, dim=-1).mean())
            top1.append(last.indices[:, 0])
            layer.last = None  # frees the block's activations with the graph
        out["l_co"] = (alpha * torch.stack(co)).sum() / len(co)
        out["l_bal"] = torch.stack(bal).mean()
        out["alignment"] = torch.stack(align)
        out["top1"] = torch.stack(top1)
        return out


class DEX(BaseMethod):
    """DEX: MAE pre-training of a ViT with Director-Experts MLPs; defaults follow the released
    pre-training code (``YutingHe-list/DEX`` at dc1afc6), the supplement where marked. Values
    that would train silently wrong (temperatures below 1e-3, negative or non-finite weights and
    noise, momenta outside [0, 1], sizes below 1) raise a ValueError naming the option and range.

    Args:
        backbone: timm ViT name (DEX: ``vit_base_patch16_224``, run at ``img_size`` 256).
        backbone_kwargs: Overrides for ``timm.create_model`` (a tiny ViT for tests and demo).
        img_size: Input side the ViT is built for (its position embedding).
        init_checkpoint: Local plain-ViT weights to start from (their code: ImageNet MAE ViT-B);
            the director and every expert are copied from each block's MLP. What loaded is
            printed and saved as ``init_report.json`` in the run folder.
        init_layout: Key layout of ``init_checkpoint``: ``auto`` (read from its keys),
            ``timm``, ``mae`` (MAE, RETFound), ``dinov2``, ... (:mod:`midol.models.weight_maps`).
        min_loaded: Refuse to start when less than this share of the ViT's tensors comes from
            ``init_checkpoint`` (1.0: every tensor must).
        grad_checkpointing: Activation checkpointing over the ViT blocks.
        use_dex: False: the plain-MAE baseline (no DEX layers, no L_co, no L_bal).
        num_experts: E experts per DEX block (8).
        top_k: Experts per image (2).
        dex_blocks: Block indices that get a DEX layer (None: every block, as DEX).
        routing_temperature: Softmax temperature of the routing probabilities (0.5).
        freq_momentum: Momentum of the running gate-mass share behind the frequency bias (0.99).
        token_routing: Route every token on its own instead of every image by its class token
            (off in DEX; a switch for comparison).
        dex_dispatch: How rows reach their experts (:class:`~midol.models.dex.DEXLayer`):
            ``loop`` (one device-to-host read per expert and block), ``sorted`` (one per
            block), ``dense`` (none, static shapes, E / top_k times the experts' FLOPs),
            ``grouped`` (none, static shapes, the loop's FLOPs through ``torch._grouped_mm``;
            compiles in bf16 only). Same loss and gradients (tested).
        noise_start: sigma_t at step 0 of the routing noise ``sigma_t (eps + f)`` (1.0) ...
        noise_end: ... and at the end, cosine in between (0.0).
        director_momentum_start: m of the director's group EMA at step 0 (0.99) ...
        director_momentum_end: ... and at the end, cosine in between (0.999).
        mask_ratio: Share of patches removed (0.75).
        norm_pix_loss: Per-patch normalised pixel targets (MAE; DEX uses them).
        decoder_dim: MAE decoder width (512).
        decoder_depth: MAE decoder blocks (8).
        decoder_heads: MAE decoder heads (16).
        co_weight: lambda_co (code: 0.01).
        co_form: ``ce``: the code's feature-axis cross-entropy, director target at
            ``co_director_temp`` and experts at ``co_expert_temp`` (default: what produced the
            released model); ``cosine``: DEX Eq. 7 (supplement), ``1 - cos(f_E, f_D)``.
        co_director_temp: Temperature of the director's softmax in ``ce`` (0.5).
        co_expert_temp: Temperature of the experts' log-softmax in ``ce`` (1.0).
        bal_weight: lambda_bal at step 0 (code: 0.01 constant; supplement: 0.001, cosine decay).
        bal_schedule: ``constant`` (code, default) or ``cosine`` decay to 0 (supplement).
        compile_scope: What ``compile`` compiles: ``model``: the whole differentiable step
            (encoder with DEX layers, decoder, L_MAE, L_co, L_bal; one graph with ``dense``
            or ``grouped`` (bf16) dispatch or without DEX); ``decoder``: the decoder only;
            ``auto``: ``model`` with ``dense``/``grouped`` dispatch or ``use_dex: false``, else
            ``decoder`` (the loop's data-dependent shapes would recompile at every new split).
        base_lr: Learning rate per ``lr_batch_size`` (512) images (DEX code: 1e-4).
        lr_batch_size: Batch size ``base_lr`` refers to (512, as MAE).
        min_lr: End of the cosine schedule (0).
        warmup_epochs: Linear warm-up (10).
        weight_decay: AdamW weight decay (1e-6, constant: ``weight_decay_end`` equal).
        weight_decay_end: Weight decay at the end of training.
        betas: AdamW betas (0.9, 0.999).
        **kwargs: Further options of :class:`~midol.methods.base.BaseMethod` (``clip_mode``,
            ``nonfinite``, ``compile``, ``grad_norm_every``, ...).
    """


    if TYPE_CHECKING:

        @property
        def hparams(self) -> DEXOptions: ...  # type: ignore[override]

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        img_size: int = 256,
        init_checkpoint: str | None = None,
        init_layout: Layout = "auto",
        min_loaded: float = DEFAULT_MIN_LOADED,
        grad_checkpointing: bool = False,
        use_dex: bool = True,
        num_experts: int = 8,
        top_k: int = 2,
        dex_blocks: list[int] | None = None,
        routing_temperature: float = 0.5,
        freq_momentum: float = 0.99,
        token_routing: bool = False,
        dex_dispatch: DEXDispatch = "loop",
        noise_start: float = 1.0,
        noise_end: float = 0.0,
        director_momentum_start: float = 0.99,
        director_momentum_end: float = 0.999,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        co_weight: float = 0.01,
        co_form: CoForm = "ce",
        co_director_temp: float = 0.5,
        co_expert_temp: float = 1.0,
        bal_weight: float = 0.01,
        bal_schedule: BalSchedule = "constant",
        compile_scope: CompileScope = "auto",
        base_lr: float = 1e-4,
        lr_batch_size: int = 512,
        min_lr: float = 0.0,
        warmup_epochs: float = 10,
        weight_decay: float = 1e-6,
        weight_decay_end: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        **kwargs: Any,
    ) -> None:
        super().__init__(base_lr=base_lr, lr_batch_size=lr_batch_size, min_lr=min_lr,
                         warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                         weight_decay_end=weight_decay_end, betas=betas, **kwargs)
        self._validate()
        overrides = {"img_size": img_size, **(backbone_kwargs or {})}
        try:
            vit = build_backbone(backbone, overrides, None, grad_checkpointing)
        except TypeError as err:  # e.g. a CNN does not take img_size
            raise ValueError(f"DEX needs a timm VisionTransformer; {backbone!r} with {overrides}: {err}") from err
        if not isinstance(vit, timm.models.vision_transformer.VisionTransformer):
            raise ValueError(f"DEX needs a timm VisionTransformer, {backbone!r} is {type(vit).__name__}")
        # loaded before inject_dex, which copies each block's MLP into the director and experts
        self.init_report = load_init_weights(vit, init_checkpoint, init_layout, min_loaded)
        self.vit = vit
        self.timm_overrides = overrides
        self.dex_layer_blocks: list[int] = []
        if use_dex:
            blocks = list(range(len(vit.blocks))) if dex_blocks is None else list(dex_blocks)
            if not blocks or any(not 0 <= b < len(vit.blocks) for b in blocks) or len(set(blocks)) != len(blocks):
                raise ValueError(f"dex_blocks must be distinct indices in [0, {len(vit.blocks)}), got {dex_blocks}")
            inject_dex(vit, sorted(blocks), num_experts=num_experts, top_k=top_k,
                       temperature=routing_temperature, freq_momentum=freq_momentum,
                       token_routing=token_routing, dispatch=dex_dispatch)
            self.dex_layer_blocks = sorted(blocks)
            for layer in self.dex_layers():
                layer.defer_updates = True  # committed by BaseMethod after backward (checkpoint-safe)
        patch = vit.patch_embed.patch_size[0]
        self.patch_size = patch
        self.decoder = MAEDecoder(vit.embed_dim, tuple(vit.patch_embed.grid_size), patch,
                                  dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads,
                                  num_prefix_tokens=vit.num_prefix_tokens)
        self.num_experts = num_experts if use_dex else 1
        # alpha_l of L_co on the module's device, so no step copies it from the host
        self.register_buffer("block_alpha", self.block_weights(), persistent=False)
        # Outside the module tree (object.__setattr__): its parameters are the ViT's and the
        # decoder's, so state dicts keep their keys; what compile_scope 'model' compiles.
        object.__setattr__(self, "step_module", DEXStepModule(
            vit, self.decoder, self.dex_layer_blocks, patch, norm_pix_loss, co_form,
            co_director_temp, co_expert_temp))

    def _validate(self) -> None:
        h = self.hparams
        if h.use_dex and h.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {h.num_experts!r}")
        if h.use_dex and not 1 <= h.top_k <= h.num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={h.num_experts}], got {h.top_k}")
        if h.co_form not in ("ce", "cosine"):
            raise ValueError(f"co_form must be 'ce' or 'cosine', got {h.co_form!r}")
        if h.dex_dispatch not in DISPATCHES:
            raise ValueError(f"dex_dispatch must be one of {DISPATCHES}, got {h.dex_dispatch!r}")
        if h.compile_scope not in ("auto", "model", "decoder"):
            raise ValueError(f"compile_scope must be 'auto', 'model' or 'decoder', got {h.compile_scope!r}")
        if h.bal_schedule not in ("constant", "cosine"):
            raise ValueError(f"bal_schedule must be 'constant' or 'cosine', got {h.bal_schedule!r}")
        checks = [(name, h[name] >= 1, ">= 1") for name in ("img_size", "decoder_dim", "decoder_heads")]
        checks.append(("decoder_depth", h.decoder_depth >= 0, ">= 0"))
        checks += [(name, finite(h[name]) and h[name] >= 0, "finite and >= 0")
                   for name in ("co_weight", "bal_weight", "noise_start", "noise_end")]
        # Below the floor the softmaxes saturate and L_co reaches ~1/temperature: finite, so the
        # non-finite check never stops the run.
        checks += [(name, finite(h[name]) and h[name] >= MIN_TEMPERATURE, TEMPERATURE_RANGE)
                   for name in ("routing_temperature", "co_director_temp", "co_expert_temp")]
        checks += [(name, 0 <= h[name] <= 1, "in [0, 1]")
                   for name in ("freq_momentum", "director_momentum_start", "director_momentum_end")]
        checks.append(("mask_ratio", 0 <= h.mask_ratio < 1, "in [0, 1)"))
        raise_on_failed(h, checks)
        if h.decoder_depth > 0 and h.decoder_dim % h.decoder_heads:
            raise ValueError(f"decoder_dim must be divisible by decoder_heads={h.decoder_heads}, "
                             f"got {h.decoder_dim}")

    # ------------------------------------------------------------------ the base's hooks
    def on_fit_start(self) -> None:
        super().on_fit_start()
        save_init_report(self, self.init_report)  # the run folder records its start weights

    def trainable_modules(self) -> list[nn.Module]:
        return [self.vit, self.decoder]

    def resolved_compile_scope(self) -> Literal["model", "decoder"]:
        """``compile_scope`` with ``auto`` resolved (``model`` where the step is one graph)."""
        h = self.hparams
        if h.compile_scope != "auto":
            return h.compile_scope
        static = h.dex_dispatch in ("dense", "grouped")  # no data-dependent shapes
        return "model" if not self.dex_layer_blocks or static else "decoder"

    def compile_targets(self) -> list[nn.Module]:
        return [self.step_module if self.resolved_compile_scope() == "model" else self.decoder]

    def dex_layers(self) -> list[DEXLayer]:
        return [self.vit.blocks[b].mlp for b in self.dex_layer_blocks]

    def noise_at(self, step: int) -> float:
        h = self.hparams
        return cosine_schedule(step, self._total_steps, h.noise_start, h.noise_end)

    def director_momentum_at(self, step: int) -> float:
        h = self.hparams
        return cosine_schedule(step, self._total_steps, h.director_momentum_start, h.director_momentum_end)

    def bal_weight_at(self, step: int) -> float:
        h = self.hparams
        if h.bal_schedule == "constant":
            return float(h.bal_weight)
        return cosine_schedule(step, self._total_steps, h.bal_weight, 0.0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        step = self.global_step
        noise, momentum = self.noise_at(step), self.director_momentum_at(step)
        for layer in self.dex_layers():
            layer.noise_std, layer.director_momentum = noise, momentum
        if self.dex_layer_blocks:
            self.log_dict(self.device_scalars({"dex/noise_std": noise, "dex/director_momentum": momentum}),
                          on_step=True, on_epoch=False)

    def deferred_updates(self) -> list[DeferredUpdate]:
        # each DEX layer's frequency statistics and director group EMA (DEXLayer.defer_updates)
        return list(self.dex_layers())

    # ------------------------------------------------------------------ step
    def block_weights(self) -> torch.Tensor:
        """``alpha_l = 1 / (L - l + 1)`` of each DEX block by its depth l in the ViT (DEX)."""
        return layer_weights(len(self.vit.blocks), self.dex_layer_blocks)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput | None:
        h = self.hparams
        images = self.normalizer(batch["views"][0])
        num_patches = self.decoder.pos_embed.shape[1] - self.vit.num_prefix_tokens
        masking = random_masking(images.shape[0], num_patches, h.mask_ratio, images.device)
        out = self.step_module(images, masking.keep, masking.restore, masking.mask, self.block_alpha)
        l_mae = out["l_mae"]
        terms: dict[str, torch.Tensor] = {"l_mae": l_mae}
        logs: dict[str, Any] = {}
        routing: dict[str, ExpertChoice] = {}
        loss = l_mae
        layers = self.dex_layers()
        if layers:
            for i, (block, layer) in enumerate(zip(self.dex_layer_blocks, layers, strict=True)):
                # director-expert alignment, what L_co drives up
                logs[f"dex/alignment_block{block:02d}"] = out["alignment"][i]
                if not layer.token_routing:
                    routing[f"route_block{block:02d}"] = ExpertChoice(
                        out["top1"][i], layer.num_experts, collapse_check=True, idle_check=True,
                        label=f"block {block} top-1 expert (training images)")
            l_co, l_bal = out["l_co"], out["l_bal"]
            bal_weight = self.bal_weight_at(self.global_step)
            loss = l_mae + h.co_weight * l_co + bal_weight * l_bal
            terms.update(l_co=l_co, l_bal=l_bal)
            logs["train/l_co"], logs["train/l_bal"] = l_co, l_bal
        terms["total"] = loss
        if not self.check_finite(terms, batch_idx):
            return None
        logs.update({"train/loss": loss, "train/l_mae": l_mae})
        self.log_dict(logs, on_step=True, on_epoch=False)
        self.log_progress(loss)
        self.mark_trained(images.shape[0])
        return {"loss": loss, "routing": routing}

    # ------------------------------------------------------------------ export, routing
    def director_vit(self) -> nn.Module:
        """A plain timm ViT whose MLPs are the directors (the dense model DEX deploys)."""
        h = self.hparams
        plain = timm.create_model(h.backbone, pretrained=False, num_classes=0, **self.timm_overrides)
        plain.load_state_dict(director_state_dict(self.vit.state_dict()), strict=True)
        return plain.to(next(self.vit.parameters()).device)

    def export_modules(self) -> dict[str, BackboneExport]:
        h = self.hparams
        if not self.dex_layer_blocks:
            return {"backbone": BackboneExport(self.vit, h.backbone, dict(self.timm_overrides),
                                               description="MAE-pre-trained ViT (plain-MAE baseline)")}
        layer = self.dex_layers()[0]
        recipe = {"blocks": list(self.dex_layer_blocks), "num_experts": layer.num_experts,
                  "top_k": layer.top_k, "temperature": layer.temperature,
                  "token_routing": layer.token_routing}
        return {
            "director_backbone": BackboneExport(
                self.director_vit(), h.backbone, dict(self.timm_overrides),
                description="DEX director-only dense ViT: every block's MLP is its director"),
            "experts_backbone": BackboneExport(
                self.vit, h.backbone, dict(self.timm_overrides), dex=recipe,
                description="DEX routed-experts ViT (experts, router, director): midol's "
                            "fine-tuning modules load it (dex_mode: experts)"),
        }

    def summary_metrics(self) -> list[str]:
        return ["train/l_mae", "train/l_co", "train/l_bal"] if self.dex_layer_blocks else ["train/l_mae"]

    def flat_term_hint(self, key: str) -> str:
        """Why a DEX loss term can stay flat (the routing monitor's warning)."""
        if key == "train/l_co" and self.hparams.co_form == "ce":
            return ("with co_form: ce, L_co cannot fall below the entropy of its target "
                    "softmax(f_D / co_director_temp), which is ~log(D) while the block outputs are "
                    "small, and the experts start as copies of the director: a flat L_co at that "
                    "floor means the experts stay coherent with the director (the term is satisfied), "
                    "not that its gradient is lost; dex/alignment_block* shows the coherence itself")
        return ""

    def collapse_hint(self) -> str:
        """Counter-measures the routing monitor suggests when a block's experts collapse."""
        return ("a larger model.init_args.bal_weight (L_bal), a larger noise_start or a later "
                "noise decay, a higher routing_temperature (README, DEX section).")

    def set_mode(self, mode: DEXMode) -> None:
        """``experts``: routed experts (top-k, no noise in eval); ``director``: dense directors."""
        set_dex_mode(self.vit, mode)

    @contextlib.contextmanager
    def _eval_vit(self) -> Iterator[None]:
        """The ViT in eval mode (no routing noise, no frequency or director update), restored
        afterwards."""
        was_training = self.vit.training
        self.vit.eval()
        try:
            yield
        finally:
            self.vit.train(was_training)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (class-token) features of uint8 images with the current mode's MLPs (eval)."""
        with self._eval_vit():
            return self.vit(self.normalizer(images))

    def routers(self) -> dict[str, int]:
        return {f"block{b:02d}": self.num_experts for b in self.dex_layer_blocks}

    @torch.no_grad()
    def route(self, images: torch.Tensor, temperature: float | None = None
              ) -> tuple[torch.Tensor, dict[str, Routing]]:
        """Pooled features and every block's per-image top-1 expert (routed-experts mode, no
        noise); ``temperature`` defaults to the routing temperature."""
        layers = self.dex_layers()
        previous = [layer.mode for layer in layers]
        self.set_mode("experts")
        try:
            with self._eval_vit():
                features = self.vit(self.normalizer(images))
        finally:
            for layer, mode in zip(layers, previous, strict=True):
                layer.mode = mode
        out: dict[str, Routing] = {}
        for block, layer in zip(self.dex_layer_blocks, layers, strict=True):
            last = layer.last
            if last is None:
                continue
            probs = last.probs
            if temperature is not None:
                if not temperature > 0:
                    raise ValueError(f"temperature must be > 0, got {temperature}")
                probs = (probs.clamp_min(1e-30).log() * layer.temperature / temperature).softmax(-1)
            confidence, expert = probs.max(dim=-1)
            out[f"block{block:02d}"] = Routing(expert, confidence)
            layer.last = None
        return features, out
