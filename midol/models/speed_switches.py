"""Hardware-dependent speed switches for a backbone: activation checkpointing by a memory
estimate, and timm's fused (SDPA) window attention.

Neither changes the math: checkpointing recomputes the same forward (RNG state restored), and
fused attention computes the same softmax attention in one kernel; the tests compare losses
and gradients with each switch on and off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

# Saved activations of one image's view at 224 px in the student of a training step (bf16
# autocast, no checkpointing), in GiB. Swin-B: issue 12's estimate of ~71 GiB for the authors'
# setting (64 images x 8 views at 224 px), i.e. 71 / 512 per view; a view of side s costs
# (s / 224)^2 of it. Not yet measured on a GPU here (issue 12's GPU suite, section B, measures
# peak memory with checkpointing on and off).
ACTIVATION_GIB_PER_224_VIEW: dict[str, float] = {
    "swin_base_patch4_window7_224": 71.0 / 512,
}
# Allocator fragmentation, the CUDA context, logits and loss temporaries on top of the sum.
MARGIN = 1.1
USABLE_FRACTION = 0.95


@dataclass(frozen=True)
class MemoryEstimate:
    """What a training step needs on one device and whether that fits without checkpointing."""

    activations_gib: float
    states_gib: float
    device_gib: float

    @property
    def need_gib(self) -> float:
        return MARGIN * (self.activations_gib + self.states_gib)

    @property
    def checkpointing(self) -> bool:
        return self.need_gib > USABLE_FRACTION * self.device_gib

    def describe(self) -> str:
        state = "on" if self.checkpointing else "off"
        return (f"activation checkpointing {state}: the step needs ~{self.need_gib:.0f} GiB "
                f"({self.activations_gib:.0f} GiB of activations + {self.states_gib:.1f} GiB of "
                f"weights, gradients and AdamW moments, x{MARGIN}) of {self.device_gib:.0f} GiB")


def parameter_state_gib(trainable: int, frozen: int) -> float:
    """fp32 weights, gradients and two AdamW moments per trainable parameter; weights only for
    frozen ones (the EMA teacher)."""
    return (16 * trainable + 4 * frozen) / 2**30


def estimate_memory(
    backbone: str, batch_size: int, view_sides: Sequence[float], trainable_params: int,
    frozen_params: int, device_gib: float,
) -> MemoryEstimate | None:
    """The estimate for a known backbone, None for one without a measured coefficient."""
    per_view = ACTIVATION_GIB_PER_224_VIEW.get(backbone)
    if per_view is None:
        return None
    views = sum((side / 224) ** 2 for side in view_sides)
    return MemoryEstimate(per_view * batch_size * views,
                          parameter_state_gib(trainable_params, frozen_params), device_gib)


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm's attention modules to ``F.scaled_dot_product_attention`` (or back).

    timm decides per module at construction, and for Swin's window attention only with
    ``TIMM_FUSED_ATTN=2`` ("experimental"); this sets the same per-module flag after the model
    exists, so one run can choose without an environment variable. Returns how many modules
    changed; raises if the model has none (a flag that does nothing must not pass silently)."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no timm attention module with a "
                         "fused_attn flag: fused_attn cannot apply to it")
    for module in modules:
        setattr(module, "fused_attn", enabled)  # noqa: B010  (a plain bool on timm's Attention)
    return len(modules)
