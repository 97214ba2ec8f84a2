"""Seeded label-efficient draws of a training set: k shots per class, or a stratified fraction.

A draw depends only on the training labels, the optional patient groups, the request (``shots``
or ``fraction``) and the seed, never on features, so every backbone evaluated on a task sees the
very same training subsets and backbone comparisons are paired. The generator of a draw is
``np.random.default_rng(SeedSequence([seed, kind, value]))`` (``kind`` 1 = shots with ``value =
k``, 2 = fraction with ``value = round(f * 1e9)``), so the draw (k=5, seed=0) is independent of
the draws for other k, other fractions and other seeds.

Units. Without ``groups`` every training row is its own unit. With ``groups`` (patient ids, any
hashable dtype) the unit is a patient: whole groups are drawn, so a patient's images are either
all in a draw or all out of it. A unit *belongs to* a class when any of its rows has that class
(multilabel: when any of its rows is positive for that label). A group whose images span several
classes therefore counts once for each of them: one such patient drawn for class 1 also counts
towards class 2's shots, and all of its images (of every class) enter the draw.

Shots (``shots=k``). Units are visited in one seeded random order. Classes are filled rarest
first (fewest units): a class takes, in that order, units belonging to it that are not drawn
yet until k drawn units belong to it. Without groups, single-label tasks therefore get exactly k
rows per class. With groups or multilabel labels a class may end up with more than k (units
drawn for other classes also count), never fewer. Multilabel: k is a number of *positive* units
per label; in addition, when the training set has rows with no positive label, units holding
such rows are added until k of them are drawn (or all are, if fewer: all-negative rows are not
a class, so they never make a k impossible). A class (multilabel: a label) with fewer than k
units makes k impossible: :func:`draw_subset` raises ``ValueError`` with the reasons of
:func:`skipped_shots`.

Fraction (``fraction=f``, ``0 < f <= 1``). Single-label: units are stratified by their class
(a group spanning classes is filed under its most frequent class, ties to the lower id) and each
stratum of n units contributes ``max(1, round(f * n))`` units (Python's ``round``). Multilabel:
``max(1, round(f * n_units))`` units uniformly at random. Then, in both cases, a class with no
drawn unit gets one (in the seeded order): every class present in the training set is in the
draw. With groups the share is a share of patients, not of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASK_TYPES = ("binary", "multiclass", "ordinal", "multilabel")
_SHOTS, _FRACTION = 1, 2


@dataclass
class Draw:
    """One label-efficient training subset.

    Attributes:
        kind: ``"full"`` (the whole training set), ``"shots"`` or ``"fraction"``.
        value: k for shots, f for fraction, None for full.
        seed: The draw's seed (0 for full).
        indices: Sorted int64 indices into the training set.
    """

    kind: str
    value: float | int | None
    seed: int
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.size)


def _check_labels(labels: np.ndarray, task_type: str) -> np.ndarray:
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    y = np.asarray(labels)
    if task_type == "multilabel":
        if y.ndim != 2:
            raise ValueError(f"multilabel labels must be (N, L), got shape {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("multilabel labels must be 0/1")
        return y.astype(bool)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"class labels must be (N,), got shape {y.shape}")
    if y.size and (y.min() < 0 or not np.array_equal(y, np.round(y))):
        raise ValueError("class labels must be non-negative integer ids")
    return y.astype(np.int64)


def _units(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Unit id of every row (the row itself, or its group's rank among the sorted group ids)."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must be (N,) = ({n},), got shape {g.shape}")
    uniq, inverse = np.unique(g, return_inverse=True)
    return inverse.reshape(-1), int(uniq.size)


def _membership(
    y: np.ndarray, task_type: str, unit: np.ndarray, n_units: int, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(n_units, K) bool: unit belongs to class/label; (n_units, K) int: its rows per class."""
    if task_type == "multilabel":
        counts = np.zeros((n_units, y.shape[1]), dtype=np.int64)
        np.add.at(counts, unit, y.astype(np.int64))
    else:
        k = max(int(y.max()) + 1 if y.size else 0, num_classes or 0)
        counts = np.zeros((n_units, k), dtype=np.int64)
        np.add.at(counts, (unit, y), 1)
    return counts > 0, counts


def _rng(seed: int, kind: int, value: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, kind, value]))


def _rows_of(units_drawn: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(unit, units_drawn)).astype(np.int64)


def skipped_shots(
    labels: np.ndarray,
    task_type: str,
    shots: int,
    groups: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
) -> list[str]:
    """Why ``shots`` per class cannot be drawn (one reason per short class); empty if it can.

    ``num_classes`` (optional, single-label tasks) also reports classes with no training row.
    """
    y = _check_labels(labels, task_type)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    unit, n_units = _units(y.shape[0], groups)
    member, _ = _membership(y, task_type, unit, n_units, num_classes)
    have = member.sum(axis=0)
    what = "patient groups" if groups is not None else "examples"
    if task_type == "multilabel":
        who, what = "label", ("positive " + what)
    else:
        who = "class"
    return [
        f"{who} {c} has {int(have[c])} {what} (< {shots} shots)"
        for c in range(have.size)
        if have[c] < shots
    ]


def draw_subset(
    labels: np.ndarray,
    task_type: str,
    *,
    shots: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    groups: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Draw:
    """A seeded label-efficient subset of the training rows (see the module docstring).

    Args:
        labels: ``(N,)`` class ids, or ``(N, L)`` 0/1 labels for multilabel.
        task_type: ``binary`` | ``multiclass`` | ``ordinal`` | ``multilabel``.
        shots: k units per class (per label's positives for multilabel).
        fraction: Stratified share ``0 < f <= 1`` of the units.
        seed: Non-negative draw seed. Neither ``shots`` nor ``fraction``: the full set.
        groups: ``(N,)`` patient ids; whole groups are drawn.
        num_classes: Optional; with shots, a class id below it with no row makes k impossible.

    Raises:
        ValueError: ``shots`` cannot be met (message: :func:`skipped_shots`' reasons joined by
            "; "), or an invalid request.
    """
    y = _check_labels(labels, task_type)
    n = y.shape[0]
    if shots is not None and fraction is not None:
        raise ValueError("give shots or fraction, not both")
    if shots is None and fraction is None:
        return Draw("full", None, 0, np.arange(n, dtype=np.int64))
    unit, n_units = _units(n, groups)
    member, counts = _membership(y, task_type, unit, n_units, num_classes)

    if shots is not None:
        if int(shots) != shots or shots < 1:
            raise ValueError(f"shots must be a positive integer, got {shots}")
        k = int(shots)
        reasons = skipped_shots(y, task_type, k, groups, num_classes=num_classes)
        if reasons:
            raise ValueError("; ".join(reasons))
        order = _rng(seed, _SHOTS, k).permutation(n_units)
        m = member[order]  # rows in visiting order
        drawn = np.zeros(n_units, dtype=bool)  # indexed by position in `order`
        targets = [int(c) for c in np.argsort(m.sum(axis=0), kind="stable")]  # rarest first
        if task_type == "multilabel":
            # Units holding an all-negative row: filled last, up to k, never required.
            no_label = np.zeros(n_units, dtype=bool)
            np.logical_or.at(no_label, unit, ~y.any(axis=1))
            m = np.column_stack([m, no_label[order]])
            targets.append(m.shape[1] - 1)
        for c in targets:
            col = m[:, c]
            short = k - int(np.count_nonzero(col & drawn))
            if short > 0:
                free = np.flatnonzero(col & ~drawn)[:short]
                drawn[free] = True
        return Draw("shots", k, seed, _rows_of(order[drawn], unit))

    assert fraction is not None
    f = float(fraction)
    if not 0 < f <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    order = _rng(seed, _FRACTION, int(round(f * 1e9))).permutation(n_units)
    m = member[order]
    drawn = np.zeros(n_units, dtype=bool)
    if task_type == "multilabel":
        drawn[: max(1, round(f * n_units))] = True
    else:
        primary = np.argmax(counts[order], axis=1)  # most rows; ties to the lower class id
        for c in np.unique(primary):
            stratum = np.flatnonzero(primary == c)
            drawn[stratum[: max(1, round(f * stratum.size))]] = True
    for c in range(m.shape[1]):  # every class present in train reaches the draw
        if m[:, c].any() and not (m[:, c] & drawn).any():
            drawn[np.flatnonzero(m[:, c])[0]] = True
    return Draw("fraction", f, seed, _rows_of(order[drawn], unit))


def disjoint_groups_check(
    train_groups: np.ndarray, test_groups: np.ndarray, *, names: tuple[str, str] = ("train", "test")
) -> None:
    """Raise ``ValueError`` naming the groups (patients) found on both sides of a split."""
    shared = np.intersect1d(np.asarray(train_groups), np.asarray(test_groups))
    if shared.size:
        shown = ", ".join(str(g) for g in shared[:10])
        more = f" and {shared.size - 10} more" if shared.size > 10 else ""
        raise ValueError(
            f"{shared.size} group(s) on both the {names[0]} and {names[1]} sides: {shown}{more}"
        )
