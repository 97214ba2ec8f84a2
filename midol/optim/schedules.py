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
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine to ``final``.

    Step ``s < warmup_steps`` runs at ``peak * (s + 1) / warmup_steps``: step 0 at
    ``peak / warmup_steps`` (not 0, which would waste the first step), the last warm-up step
    at ``peak``. DINO's warm-up starts at exactly 0 and reaches ``peak`` one step later."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, peak, final)


def poly_schedule(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float, power: float = 1.0
) -> float:
    """The same linear warm-up, then ``final + (peak - final) * (1 - progress) ** power``
    (mmsegmentation's PolyLR with ``eta_min = final``)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return final + (peak - final) * (1.0 - progress) ** power


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, constant ``end`` afterwards."""
    if step >= warmup_steps or warmup_steps <= 0:
        return end
    return start + (end - start) * step / warmup_steps


def momentum_at(step: int, total_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """EMA momentum used for the update after optimiser step ``step`` (0-based): cosine from
    ``start`` to ``end`` (M-IDoL Eq. 22 with DINO's schedule)."""
    return cosine_schedule(step, total_steps, start, end)
