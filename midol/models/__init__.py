"""Layers and networks in plain PyTorch: the timm backbone factory, MoE projector, heads, the
EMA update and the segmentation decoder."""

from midol.models.backbone import DEFAULT_BACKBONE, build_backbone, load_backbone_weights
from midol.models.ema import ema_update
from midol.models.heads import ExpertBank, NormedLinear
from midol.models.moe import MoEOutput, MoEProjector

__all__ = [
    "DEFAULT_BACKBONE",
    "ExpertBank",
    "MoEOutput",
    "MoEProjector",
    "NormedLinear",
    "build_backbone",
    "ema_update",
    "load_backbone_weights",
]
