"""Range checks of method options at construction: one message format for every method.

A value that passes these checks cannot silently break training (a zero output width, a
temperature so low that the losses reach 1e29 and stay finite, a negative loss weight).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from midol.utils.hparams import HParams

# The lowest temperature (and Sinkhorn epsilon) accepted: below it the losses reach
# ~1/temperature and stay finite, so the non-finite check never stops the run.
MIN_TEMPERATURE = 1e-3
TEMPERATURE_RANGE = f"finite and >= {MIN_TEMPERATURE:g} (lower values make the losses explode)"

Check = tuple[str, bool, str]  # (option, holds, allowed range in words)


def finite(value: Any) -> bool:
    """True for a number that is not NaN or infinite (False for non-numbers)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def temperature_checks(hparams: Mapping[str, Any], names: Iterable[str]) -> list[Check]:
    return [(n, finite(hparams[n]) and hparams[n] >= MIN_TEMPERATURE, TEMPERATURE_RANGE) for n in names]


def nonnegative_checks(hparams: Mapping[str, Any], names: Iterable[str]) -> list[Check]:
    return [(n, finite(hparams[n]) and hparams[n] >= 0, "finite and >= 0") for n in names]


def raise_on_failed(hparams: Mapping[str, Any] | HParams, checks: Iterable[Check]) -> None:
    """``ValueError("<option> must be <range>, got <value>")`` for the first failed check."""
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {hparams[name]!r}")
