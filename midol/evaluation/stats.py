"""Bootstrap confidence intervals, paired comparisons and verdicts for the eval report card.

Every interval here is a 95 % percentile interval over bootstrap resamples of the test set:
a resample is a row of per-sample counts (:func:`bootstrap_weights`) and a metric of all rows
comes from :func:`midol.evaluation.metrics.metric_values` in one call. A configuration is
scored by its seeded runs (its "draws"); its point value is the mean over draws, and each
resample scores every draw on the same rows, so the interval covers test-set sampling of the
draw-mean (the spread between seeds is reported apart, as ``sd``).

Two backbones are compared on the SAME resamples (a paired bootstrap): the resampled
difference cancels what the test set does to both, which is what makes small differences
decidable. The decision rule is fixed in :data:`VERDICT_RULE`, printed before any number.

Nan handling: a resample on which a metric is undefined (e.g. no class with both positives
and negatives for AUC) gives nan; such resamples are dropped before percentiles and p-values,
and the number kept is reported (``n_resamples``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from midol.evaluation.metrics import METRICS, metric_values

__all__ = [
    "BETTER",
    "LOWER_IS_BETTER",
    "NOT_DISTINGUISHABLE",
    "VERDICT_RULE",
    "WORSE",
    "Comparison",
    "Summary",
    "bootstrap_weights",
    "compare",
    "paired_bootstrap",
    "paired_seeds",
    "seed_resamples",
    "summarize_seeds",
    "pool",
    "summarize",
]

BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"
CI_LEVEL = 0.95
_Q_LO, _Q_HI = 100 * (1 - CI_LEVEL) / 2, 100 * (1 + CI_LEVEL) / 2
# Metrics where a smaller value is the better one: their verdict reads the difference reversed.
LOWER_IS_BETTER = frozenset({"ece"})
_ROWS_PER_CHUNK = 256  # bounds the B x n index matrix held at once

VERDICT_RULE = (
    "Verdict rule (fixed before any result): for each metric, diff = A - B, the difference of "
    "the mean over seeded runs of A and of B on the same test set. Its 95% confidence "
    "interval is the 2.5th-97.5th percentile of the paired bootstrap: A and B are scored on "
    "the same resamples of the test set (stratified by class where the task has classes), "
    "and a suite-level difference is the mean over tasks, each task resampled independently. "
    "A is 'better' than B if the interval lies entirely on the favourable side of 0 (above 0; "
    "below 0 for ECE, where lower is better), 'worse' if it lies entirely on the other side, "
    "and 'not distinguishable' otherwise. The two-sided bootstrap p-value is "
    "min(1, 2 min(P(diff* <= 0), P(diff* >= 0))) over the resampled differences diff*, "
    "floored at 1/(B+1) for B resamples; resamples where a metric is undefined are dropped. "
    "No correction is made for the number of metrics or tasks compared."
)


def bootstrap_weights(
    n: int, n_resamples: int = 1000, seed: int = 0, strata: NDArray[np.generic] | None = None
) -> NDArray[np.int32]:
    """``n_resamples x n`` int32 counts: how often each of ``n`` samples is drawn per resample.

    Every row sums to ``n``. With ``strata`` (one key per sample: a class id, or an
    ``n x L`` array whose rows are the keys, e.g. multilabel label vectors), each stratum is
    resampled within itself, so every row keeps each stratum's size; a rare class then never
    vanishes from a resample. Deterministic in ``seed``.
    """
    if n <= 0 or n_resamples <= 0:
        raise ValueError(f"need n > 0 and n_resamples > 0, got n={n}, n_resamples={n_resamples}")
    rng = np.random.default_rng(seed)
    if strata is None:
        # One block with every sample: draws uniformly over all n.
        members = np.arange(n)
        block_start = np.zeros(n, dtype=np.int64)
        block_size = np.full(n, n, dtype=np.int64)
    else:
        keys = np.asarray(strata)
        if keys.ndim == 0 or keys.shape[0] != n:
            raise ValueError(f"strata must have {n} entries, got shape {keys.shape}")
        if keys.ndim == 1:
            _, inv = np.unique(keys, return_inverse=True)
        else:
            _, inv = np.unique(keys.reshape(n, -1), axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        # Samples sorted by stratum: position j draws a member of its own stratum's block.
        members = np.argsort(inv, kind="stable")
        sizes = np.bincount(inv)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        block_start = starts[inv[members]]
        block_size = sizes[inv[members]]
    out = np.empty((n_resamples, n), dtype=np.int32)
    for r0 in range(0, n_resamples, _ROWS_PER_CHUNK):
        rows = min(_ROWS_PER_CHUNK, n_resamples - r0)
        pick = members[block_start + rng.integers(0, block_size, size=(rows, n))]
        flat = (pick + n * np.arange(rows)[:, None]).ravel()
        out[r0:r0 + rows] = np.bincount(flat, minlength=rows * n).reshape(rows, n)
    return out


@dataclass
class Summary:
    """One metric of one configuration: draw-mean, seed spread and bootstrap interval."""

    mean: float  # mean over draws of the metric on the full test set
    sd: float  # sample sd over draws (0 for one draw)
    lo: float  # 2.5th percentile over resamples of the draw-mean metric (nan: no resamples)
    hi: float  # 97.5th percentile
    n_draws: int
    per_draw: list[float] = field(default_factory=list)
    n_resamples: int = 0  # resamples kept (finite); 0 without weights


@dataclass
class Comparison:
    """A vs B on one metric (or its mean over ``n_tasks`` tasks) with its verdict."""

    metric: str
    diff: float  # A - B of the draw-means
    lo: float  # 95 % percentile interval of the paired bootstrap difference
    hi: float
    p: float  # two-sided bootstrap p-value, floored at 1/(B+1)
    verdict: str  # BETTER, WORSE or NOT_DISTINGUISHABLE, for A
    n_tasks: int
    n_resamples: int = 0  # finite resampled differences used


def _percentiles(values: NDArray[np.float64]) -> tuple[float, float, int]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(finite, [_Q_LO, _Q_HI])
    return float(lo), float(hi), int(finite.size)


def _draw_means(
    y_true: ArrayLike,
    draws: Sequence[NDArray[np.floating]],
    task_type: str,
    weights: NDArray[np.integer] | NDArray[np.floating] | None,
    names: tuple[str, ...],
) -> tuple[dict[str, list[float]], dict[str, NDArray[np.float64]]]:
    """Per metric: the full-set value of each draw, and the (B,) draw-mean over resamples."""
    if len(draws) == 0:
        raise ValueError("need at least one draw (score matrix)")
    points: dict[str, list[float]] = {m: [] for m in names}
    resampled: dict[str, NDArray[np.float64]] = {}
    for d in draws:
        for m, v in metric_values(y_true, d, task_type, metrics=names).items():
            points[m].append(float(v))
        if weights is not None:
            for m, v in metric_values(y_true, d, task_type, weights, names).items():
                resampled[m] = resampled.get(m, 0.0) + np.asarray(v, dtype=np.float64)
    return points, {m: v / len(draws) for m, v in resampled.items()}


def _names(task_type: str, metrics: Sequence[str] | None) -> tuple[str, ...]:
    if task_type not in METRICS:
        raise ValueError(f"task_type must be one of {tuple(METRICS)}, got {task_type!r}")
    return tuple(METRICS[task_type] if metrics is None else metrics)


def summarize(
    y_true: ArrayLike,
    draws: Sequence[NDArray[np.floating]],
    task_type: str,
    weights: NDArray[np.integer] | NDArray[np.floating] | None,
    metrics: Sequence[str] | None = None,
) -> dict[str, Summary]:
    """``{metric: Summary}`` of one configuration's ``draws`` (score matrices of its seeded
    runs on the same test set) over the resamples ``weights`` (``B x N``, the same for every
    draw; ``None``: no interval, ``lo = hi = nan``)."""
    names = _names(task_type, metrics)
    points, resampled = _draw_means(y_true, draws, task_type, weights, names)
    out: dict[str, Summary] = {}
    for m in names:
        per_draw = points[m]
        sd = float(np.std(per_draw, ddof=1)) if len(per_draw) > 1 else 0.0
        if m in resampled:
            lo, hi, kept = _percentiles(resampled[m])
        else:
            lo, hi, kept = float("nan"), float("nan"), 0
        out[m] = Summary(float(np.mean(per_draw)), sd, lo, hi, len(per_draw), per_draw, kept)
    return out


def paired_bootstrap(
    y_true: ArrayLike,
    draws_a: Sequence[NDArray[np.floating]],
    draws_b: Sequence[NDArray[np.floating]],
    task_type: str,
    weights: NDArray[np.integer] | NDArray[np.floating],
    metrics: Sequence[str] | None = None,
) -> dict[str, tuple[float, NDArray[np.float64]]]:
    """``{metric: (diff, resampled)}``: A - B of the draw-means on the full test set, and the
    ``(B,)`` differences on the resamples ``weights``, both backbones scored on the same rows
    (paired). A and B may have different numbers of draws."""
    names = _names(task_type, metrics)
    points_a, res_a = _draw_means(y_true, draws_a, task_type, weights, names)
    points_b, res_b = _draw_means(y_true, draws_b, task_type, weights, names)
    return {
        m: (float(np.mean(points_a[m]) - np.mean(points_b[m])), res_a[m] - res_b[m])
        for m in names
    }


def compare(
    point: float, resampled: NDArray[np.floating], metric: str, n_tasks: int = 1
) -> Comparison:
    """Interval, p-value and verdict of a paired difference ``point`` (A - B) from its
    resampled differences, per :data:`VERDICT_RULE`. Nan resamples are dropped; with none
    left (or a nan ``point``) the result is nan and "not distinguishable"."""
    diffs = np.asarray(resampled, dtype=np.float64).ravel()
    lo, hi, kept = _percentiles(diffs)
    if kept == 0 or not np.isfinite(point):
        nan = float("nan")
        return Comparison(metric, float(point), nan, nan, nan, NOT_DISTINGUISHABLE, n_tasks, kept)
    finite = diffs[np.isfinite(diffs)]
    p = min(1.0, 2.0 * min(float(np.mean(finite <= 0)), float(np.mean(finite >= 0))))
    p = max(p, 1.0 / (kept + 1))  # a finite bootstrap cannot support p = 0
    favourable, unfavourable = (WORSE, BETTER) if metric in LOWER_IS_BETTER else (BETTER, WORSE)
    if lo > 0:
        verdict = favourable
    elif hi < 0:
        verdict = unfavourable
    else:
        verdict = NOT_DISTINGUISHABLE
    return Comparison(metric, float(point), lo, hi, p, verdict, n_tasks, kept)


def pool(
    parts: Sequence[tuple[float, NDArray[np.floating]]],
) -> tuple[float, NDArray[np.float64]]:
    """Suite-level difference: the mean over tasks of the point differences and, resample by
    resample, of the resampled differences (tasks are resampled independently, so row ``i``
    of every task together is one resample of the suite). A resample that is nan for any
    task is nan for the suite (and then dropped by :func:`compare`)."""
    if len(parts) == 0:
        raise ValueError("need at least one task to pool")
    arrays = [np.asarray(r, dtype=np.float64).ravel() for _, r in parts]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"tasks have different resample counts: {[a.size for a in arrays]}")
    return float(np.mean([p for p, _ in parts])), np.mean(np.stack(arrays), axis=0)


def seed_resamples(n_seeds: int, n_resamples: int = 1000, seed: int = 0) -> NDArray[np.int64]:
    """``(B, S)`` indices of pre-training seeds drawn with replacement, one row per resample
    (all zeros for one seed). The same ``(S, B, seed)`` gives the same rows, so every task of
    a suite resamples the same pre-trained models."""
    if n_seeds < 1 or n_resamples < 1:
        raise ValueError(f"need n_seeds >= 1 and n_resamples >= 1, got {n_seeds}, {n_resamples}")
    if n_seeds == 1:
        return np.zeros((n_resamples, 1), dtype=np.int64)
    rng = np.random.default_rng([seed, n_seeds, 7919])
    return rng.integers(0, n_seeds, size=(n_resamples, n_seeds), dtype=np.int64)


def _seed_boot(per_seed: NDArray[np.float64], seed_idx: NDArray[np.int64]) -> NDArray[np.float64]:
    """``(S, B)`` resampled values per seed -> ``(B,)`` mean over the resample's seeds (row
    ``b`` of ``seed_idx`` picks the seeds of test resample ``b``: a two-level bootstrap)."""
    cols = np.arange(per_seed.shape[1])[:, None]
    return np.asarray(per_seed[seed_idx, cols].mean(axis=1), dtype=np.float64)


def summarize_seeds(
    y_true: ArrayLike,
    members: Sequence[Sequence[NDArray[np.floating]]],
    task_type: str,
    weights: NDArray[np.integer] | NDArray[np.floating],
    seed_idx: NDArray[np.int64],
    metrics: Sequence[str] | None = None,
) -> dict[str, Summary]:
    """:func:`summarize` of a row whose backbone was pre-trained with several seeds:
    ``members[s]`` are the draws of seed ``s``. The mean is over seeds of each seed's
    draw-mean; ``sd`` is across seeds (across draws for one seed); the interval resamples
    seeds (``seed_idx``, :func:`seed_resamples`) and test samples together."""
    if len(members) == 1:
        return summarize(y_true, members[0], task_type, weights, metrics)
    names = _names(task_type, metrics)
    per = [_draw_means(y_true, draws, task_type, weights, names) for draws in members]
    out: dict[str, Summary] = {}
    for m in names:
        seed_means = [float(np.mean(p[0][m])) for p in per]
        boot = _seed_boot(np.stack([p[1][m] for p in per]), seed_idx)
        lo, hi, kept = _percentiles(boot)
        out[m] = Summary(float(np.mean(seed_means)), float(np.std(seed_means, ddof=1)), lo, hi,
                         sum(len(p[0][m]) for p in per), [v for p in per for v in p[0][m]], kept)
    return out


def paired_seeds(
    y_true: ArrayLike,
    members_a: Sequence[Sequence[NDArray[np.floating]]],
    members_b: Sequence[Sequence[NDArray[np.floating]]],
    task_type: str,
    weights: NDArray[np.integer] | NDArray[np.floating],
    seed_idx: NDArray[np.int64],
    metrics: Sequence[str] | None = None,
) -> dict[str, tuple[float, NDArray[np.float64]]]:
    """:func:`paired_bootstrap` of two rows pre-trained with the same seeds, paired seed by
    seed (``members_a[s]`` with ``members_b[s]``): the point is the mean over seeds of the
    differences of draw-means, the resamples draw seeds and test samples together."""
    if len(members_a) != len(members_b):
        raise ValueError(f"paired rows need the same seeds, got {len(members_a)} and {len(members_b)}")
    if len(members_a) == 1:
        return paired_bootstrap(y_true, members_a[0], members_b[0], task_type, weights, metrics)
    names = _names(task_type, metrics)
    per_a = [_draw_means(y_true, d, task_type, weights, names) for d in members_a]
    per_b = [_draw_means(y_true, d, task_type, weights, names) for d in members_b]
    out: dict[str, tuple[float, NDArray[np.float64]]] = {}
    for m in names:
        diffs = [float(np.mean(a[0][m]) - np.mean(b[0][m])) for a, b in zip(per_a, per_b)]
        per_seed = np.stack([a[1][m] - b[1][m] for a, b in zip(per_a, per_b)])
        out[m] = (float(np.mean(diffs)), _seed_boot(per_seed, seed_idx))
    return out
