"""Speed switches that depend on the run's device, resolved once the Trainer has placed the
model (``compile: auto`` lives in :class:`~midol.methods.base.BaseMethod`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from midol.models.speed_switches import estimate_memory


def resolve_checkpointing(module: L.LightningModule, backbone: str,
                          views: Sequence[torch.Tensor]) -> bool:
    """``grad_checkpointing: auto``: on when the first batch's step would not fit the device
    without it (:func:`~midol.models.speed_switches.estimate_memory`); off on a CPU."""
    device = module.device
    if device.type != "cuda":
        rank_zero_info("activation checkpointing off (grad_checkpointing: auto, not on CUDA)")
        return False
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    sides = [math.sqrt(v.shape[-2] * v.shape[-1]) for v in views]
    estimate = estimate_memory(backbone, int(views[0].shape[0]), sides, trainable, frozen, total)
    if estimate is None:
        rank_zero_warn(f"grad_checkpointing: auto has no memory coefficient for {backbone!r}: "
                       "checkpointing stays on (set grad_checkpointing: false if it fits)")
        return True
    rank_zero_info(estimate.describe() + " (grad_checkpointing: auto)")
    return estimate.checkpointing
