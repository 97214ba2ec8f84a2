"""Schedules as pure functions of the global step, so a resumed run continues exactly."""

from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total_steps``)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def warmup_cosine_schedule(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float
) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, peak, final)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, constant ``end`` afterwards."""
    if step >= warmup_steps or warmup_steps <= 0:
        return end
    return start + (end - start) * step / warmup_steps
