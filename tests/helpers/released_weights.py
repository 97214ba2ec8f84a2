"""Tiny stand-ins for released weight files, written in each source's own key layout and nesting
(built from a timm model, so every tensor's expected value is known). Nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from midol.models import build_backbone


def tiny_model(name: str, **overrides: Any) -> nn.Module:
    """A randomly initialised backbone, values made distinct from a fresh one (seeded)."""
    torch.manual_seed(sum(map(ord, name)) + len(overrides))
    model = build_backbone(name, overrides)
    with torch.no_grad():  # timm starts some tensors at constants (norms, layer scale): vary them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def swin_ms_release(model: nn.Module, classes: int = 10) -> dict[str, Any]:
    """Microsoft's Swin release (``swin_base_patch4_window7_224_22k.pth``): ``{"model": ...}``,
    patch merging at the end of a stage (timm's ``layers.i.downsample`` is their
    ``layers.i-1.downsample``), the ``relative_position_index`` and ``attn_mask`` buffers, a head."""
    out = {}
    for k, v in state(model).items():
        out[re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)] = v
    for k, v in model.named_buffers():
        if k.endswith("relative_position_index"):
            out[k] = v.clone()
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 4, 4)
    out["head.weight"] = torch.randn(classes, model.num_features)
    out["head.bias"] = torch.zeros(classes)
    return {"model": out}


def dinov2_hub(model: nn.Module, chunks: int = 0) -> dict[str, torch.Tensor]:
    """DINOv2's hub ViT state dict (flat, ``mask_token``, layer scale ``ls1.gamma``); with
    ``chunks`` the training layout of FSDP block chunks: block ``n`` as ``blocks.c.n``."""
    out = state(model)
    if chunks:
        per = -(-len(model.blocks) // chunks)
        out = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // per}.{m.group(1)}.", k): v
               for k, v in out.items()}
    out["mask_token"] = torch.randn(1, model.embed_dim)
    return out


def dinov2_hub_registers(model: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 with registers (``vit_*_reg4_dinov2``): ``register_tokens``, and a ``pos_embed``
    with a class-token row that timm folds into ``cls_token`` (timm's model has none)."""
    own = state(model)
    pos0 = torch.randn(1, 1, model.embed_dim)
    out = {k: v for k, v in own.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    out["register_tokens"] = own["reg_token"]
    out["cls_token"] = own["cls_token"] - pos0
    out["pos_embed"] = torch.cat([pos0, own["pos_embed"]], dim=1)
    out["mask_token"] = torch.randn(1, model.embed_dim)
    return out


def mae_pretrain(model: nn.Module, decoder_dim: int = 16) -> dict[str, Any]:
    """MAE / RETFound pre-training checkpoint: ``{"model": encoder + decoder_* + mask_token}``."""
    out: dict[str, Any] = state(model)
    n = model.pos_embed.shape[1]
    out.update({
        "mask_token": torch.randn(1, 1, decoder_dim),
        "decoder_embed.weight": torch.randn(decoder_dim, model.embed_dim),
        "decoder_embed.bias": torch.randn(decoder_dim),
        "decoder_pos_embed": torch.randn(1, n, decoder_dim),
        "decoder_blocks.0.norm1.weight": torch.randn(decoder_dim),
        "decoder_norm.weight": torch.randn(decoder_dim),
        "decoder_pred.weight": torch.randn(3 * 64, decoder_dim),
    })
    return {"model": out}


def mae_finetuned(model: nn.Module, classes: int = 5) -> dict[str, Any]:
    """A global-pool fine-tuned MAE / RETFound ViT: ``norm`` moved to ``fc_norm``, a head."""
    out: dict[str, Any] = {("fc_norm" + k[4:] if k.startswith("norm.") else k): v
                           for k, v in state(model).items()}
    out["head.weight"] = torch.randn(classes, model.embed_dim)
    out["head.bias"] = torch.randn(classes)
    return {"model": out}


def save(obj: dict[str, Any], path: Path) -> Path:
    torch.save(obj, path)
    return path


def dinov3_release(model: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv3's ViT state dict (timm builds it as an Eva): ``storage_tokens``, ``mask_token``,
    RoPE ``periods``, layer scale ``ls1.gamma``, one ``qkv.bias`` (k part zero) + ``bias_mask``."""
    out: dict[str, torch.Tensor] = {}
    own = state(model)
    for k, v in own.items():
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):
            v_bias = own[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * v.numel())
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v
    out["mask_token"] = torch.randn(1, model.embed_dim)
    out["rope_embed.periods"] = torch.rand(4)  # a buffer the model recomputes
    return out
