"""The continued pre-training presets (configs/continue/) at tiny scale: a stand-in for each
preset's released file, written in that file's own layout at the path the preset names, and an
override config that shrinks the backbone, heads and data (CPU, one step on sample images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from tests.helpers import released_weights as rw
from tests.helpers.tiny import SAMPLE_DATA, TINY_SWIN

REPO = Path(__file__).resolve().parents[2]
CONTINUE = REPO / "configs" / "continue"
TINY_VIT: dict[str, Any] = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
TINY_DINOV2: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=2)
SOURCES = [{"path": str(SAMPLE_DATA / "xray"), "modality": "xray"},
           {"path": str(SAMPLE_DATA / "pathology"), "modality": "pathology"}]
TRAINER = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
           "max_epochs": 1, "limit_train_batches": 2, "enable_progress_bar": False}
MIDOL_HEADS = {"num_experts": 3, "expert_hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64,
               "compile": False, "grad_checkpointing": False}
MAE_HEADS = {"img_size": 32, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
             "grad_checkpointing": False, "compile": False}


def multicrop(size: int, local: int) -> dict[str, Any]:
    return {"class_path": "midol.data.MultiCropTransform",
            "init_args": {"global_size": size, "local_size": local, "num_global": 2, "num_local": 2}}


def single_view(size: int) -> dict[str, Any]:
    return {"class_path": "midol.data.SingleViewTransform", "init_args": {"size": size}}


def _swin(name: str) -> dict[str, torch.Tensor]:
    return rw.swin_ms_release(rw.tiny_model(name, **TINY_SWIN))


def _dinov2(name: str) -> dict[str, torch.Tensor]:
    return rw.dinov2_hub(rw.tiny_model(name, **TINY_DINOV2, img_size=42))  # 3 x 3 patches -> 2 x 2


def _dinov3(name: str) -> dict[str, torch.Tensor]:
    return rw.dinov3_release(rw.tiny_model(name, **TINY_DINOV2, img_size=32))


def _mae(name: str) -> dict[str, torch.Tensor]:
    return rw.mae_pretrain(rw.tiny_model(name, **TINY_VIT, img_size=16))  # 2 x 2 patches -> 4 x 4


# preset -> (stand-in writer, model overrides, transform, tensors reshaped by the recipe)
TINY: dict[str, tuple[Any, dict[str, Any], dict[str, Any], set[str]]] = {
    "continue_swin_base": (_swin, {"backbone_kwargs": TINY_SWIN, **MIDOL_HEADS}, multicrop(32, 16), set()),
    "continue_dino_vit": (_dinov2, {"backbone_kwargs": {**TINY_DINOV2, "img_size": 28}, **MIDOL_HEADS},
                          multicrop(28, 28), {"pos_embed"}),
    "continue_dinov3_vit": (_dinov3, {"backbone_kwargs": {**TINY_DINOV2, "img_size": 32}, **MIDOL_HEADS},
                           multicrop(32, 16), {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
                                               "blocks.1.attn.q_bias", "blocks.1.attn.v_bias"}),
    "continue_mae_vit_base": (_mae, {"backbone_kwargs": TINY_VIT, **MAE_HEADS}, single_view(32), {"pos_embed"}),
    "continue_dex_vit_base": (_mae, {"backbone_kwargs": TINY_VIT, **MAE_HEADS}, single_view(32), {"pos_embed"}),
    "continue_retfound_vit_large": (_mae, {"backbone_kwargs": TINY_VIT, **MAE_HEADS}, single_view(32),
                                    {"pos_embed"}),
}


def preset_init_args(preset: str) -> dict[str, Any]:
    text = (CONTINUE / f"{preset}.yaml").read_text()
    return dict(yaml.safe_load(text)["model"]["init_args"])


def backbone_name(preset: str) -> str:
    """The timm model the composed preset names."""
    from midol.config_compose import load_composed

    return str(load_composed(CONTINUE / f"{preset}.yaml")["model"]["init_args"]["backbone"])


def tiny_setup(preset: str, root: Path) -> Path:
    """Write the stand-in at ``root / init_checkpoint`` (the preset's relative path) and the
    override config ``root / tiny_<preset>.yaml``; returns the override's path."""
    writer, model, transform, _ = TINY[preset]
    weights = root / preset_init_args(preset)["init_checkpoint"]
    weights.parent.mkdir(parents=True, exist_ok=True)
    rw.save(writer(backbone_name(preset)), weights)
    override = {"trainer": TRAINER, "model": {"init_args": model},
                "data": {"init_args": {"sources": SOURCES, "batch_size": 8, "num_workers": 0,
                                       "transform": transform}}}
    path = root / f"tiny_{preset}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path
