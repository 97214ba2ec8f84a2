"""Hand-computed reference metrics for the downstream-task tests."""

from __future__ import annotations


def pair_auc(scores: list[float], positive: list[bool]) -> float:
    """Mann-Whitney: fraction of (positive, negative) pairs ranked correctly, ties count 1/2."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))
