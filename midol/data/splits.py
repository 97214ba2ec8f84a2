"""Seeded train/val/test splits (stratified by class when labels are given)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def seeded_split(
    n: int, fractions: Sequence[float], seed: int, strata: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split ``range(n)`` into ``[rest, part_1, ..., part_k]`` with ``part_i`` holding about
    ``fractions[i] * n`` items.

    With ``strata`` (one class id per item) every class is split on its own, so each part keeps
    the class proportions; counts are rounded per class (a class of one item stays in ``rest``).
    The same ``(n, fractions, seed, strata)`` always gives the same sorted index arrays.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [
        np.flatnonzero(strata == c) for c in np.unique(strata)
    ]
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for members in groups:
        members = rng.permutation(members)
        start = 0
        for k, frac in enumerate(fractions, start=1):
            count = int(round(frac * len(members)))
            parts[k].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
