"""Seeded label-efficient draws (midol/evaluation/fewshot.py)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from midol.evaluation.fewshot import Draw, disjoint_groups_check, draw_subset, skipped_shots


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Class ids with the given per-class counts, shuffled."""
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y)


def _patients(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """60 patients with 1-4 images each; most have one class, every fifth spans two."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(60):
        n = int(rng.integers(1, 5))
        cls = p % 3
        row = [cls] * n
        if p % 5 == 0 and n > 1:
            row[-1] = (cls + 1) % 3
        labels += row
        groups += [f"P{p:03d}"] * n
    order = rng.permutation(len(labels))  # interleave patients' rows
    return np.array(labels)[order], np.array(groups)[order]


def _assert_whole_groups(draw: Draw, groups: np.ndarray) -> None:
    inside = np.zeros(len(groups), dtype=bool)
    inside[draw.indices] = True
    for g in np.unique(groups):
        rows = inside[groups == g]
        assert rows.all() or not rows.any(), f"patient {g} split across the draw"


def test_shots_exact_per_class_counts() -> None:
    y = _labels([40, 25, 9, 5])
    for k in (1, 5):
        for seed in (0, 1, 2):
            d = draw_subset(y, "multiclass", shots=k, seed=seed)
            assert (d.kind, d.value, d.seed) == ("shots", k, seed)
            np.testing.assert_array_equal(np.bincount(y[d.indices], minlength=4), [k] * 4)
            assert np.all(np.diff(d.indices) > 0) and d.indices.dtype == np.int64
    d = draw_subset(y[y < 2], "binary", shots=3, seed=0)
    np.testing.assert_array_equal(np.bincount(y[y < 2][d.indices]), [3, 3])


def test_fraction_sizes_are_stratified() -> None:
    y = _labels([500, 300, 150, 50])
    d = draw_subset(y, "multiclass", fraction=0.1, seed=4)
    assert (d.kind, d.value) == ("fraction", 0.1)
    np.testing.assert_array_equal(np.bincount(y[d.indices]), [50, 30, 15, 5])
    d = draw_subset(y, "multiclass", fraction=0.25, seed=4)
    np.testing.assert_array_equal(np.bincount(y[d.indices]), [125, 75, 38, 12])  # round(37.5)
    # At least one per class even when f * n_c rounds to 0.
    d = draw_subset(y, "multiclass", fraction=0.001, seed=4)
    np.testing.assert_array_equal(np.bincount(y[d.indices]), [1, 1, 1, 1])
    assert len(draw_subset(y, "multiclass", fraction=1.0)) == 1000
    full = draw_subset(y, "multiclass")
    assert (full.kind, full.value) == ("full", None)
    np.testing.assert_array_equal(full.indices, np.arange(1000))


def test_draws_depend_only_on_labels_request_and_seed() -> None:
    # No feature argument exists: every backbone of a task gets the same draws.
    params = set(inspect.signature(draw_subset).parameters)
    assert params == {"labels", "task_type", "shots", "fraction", "seed", "groups", "num_classes"}
    y = _labels([40, 25, 9, 5])
    a = draw_subset(y, "multiclass", shots=5, seed=0)
    np.random.seed(123)  # global NumPy state plays no part
    draw_subset(y, "multiclass", shots=2, seed=0)  # nor do other draws made in between
    draw_subset(y, "multiclass", fraction=0.3, seed=0)
    b = draw_subset(y, "multiclass", shots=5, seed=0)
    np.testing.assert_array_equal(a.indices, b.indices)
    c = draw_subset(y, "multiclass", shots=5, seed=1)
    assert not np.array_equal(a.indices, c.indices)
    # Pinned: a change of the seed derivation would silently change every reported number.
    pinned = draw_subset(_labels([6, 6]), "binary", shots=2, seed=0)
    assert pinned.indices.tolist() == [1, 7, 8, 9]
    f1 = draw_subset(y, "multiclass", fraction=0.3, seed=7).indices
    f2 = draw_subset(y, "multiclass", fraction=0.3, seed=7).indices
    f3 = draw_subset(y, "multiclass", fraction=0.3, seed=8).indices
    np.testing.assert_array_equal(f1, f2)
    assert not np.array_equal(f1, f3)


def test_too_few_examples_raises_naming_the_class() -> None:
    y = _labels([10, 10, 10, 4])
    assert skipped_shots(y, "multiclass", 4) == []
    assert skipped_shots(y, "multiclass", 5) == ["class 3 has 4 examples (< 5 shots)"]
    with pytest.raises(ValueError, match=r"^class 3 has 4 examples \(< 5 shots\)$"):
        draw_subset(y, "multiclass", shots=5, seed=0)
    # A class id with no training row at all, known through num_classes.
    assert skipped_shots(y, "multiclass", 1, num_classes=6) == [
        "class 4 has 0 examples (< 1 shots)",
        "class 5 has 0 examples (< 1 shots)",
    ]
    with pytest.raises(ValueError, match="class 5 has 0 examples"):
        draw_subset(y, "multiclass", shots=1, num_classes=6)


def test_group_shots_never_split_a_patient() -> None:
    y, g = _patients()
    for seed in range(3):
        d = draw_subset(y, "multiclass", shots=4, seed=seed, groups=g)
        _assert_whole_groups(d, g)
        for c in range(3):  # at least 4 patients with an image of class c
            assert len(set(g[d.indices][y[d.indices] == c])) >= 4
    # The class needing the most patients is short: counted in patients, not images.
    per_class = [len(set(g[y == c])) for c in range(3)]
    k = max(per_class) + 1
    reasons = skipped_shots(y, "multiclass", k, groups=g)
    assert reasons == [f"class {c} has {n} patient groups (< {k} shots)"
                       for c, n in enumerate(per_class)]
    with pytest.raises(ValueError, match="patient groups"):
        draw_subset(y, "multiclass", shots=k, groups=g)


def test_group_fraction_and_disjoint_check() -> None:
    y, g = _patients(1)
    d = draw_subset(y, "multiclass", fraction=0.2, seed=0, groups=g)
    _assert_whole_groups(d, g)
    assert set(y[d.indices]) == {0, 1, 2}
    n_groups = len(set(g[d.indices]))
    assert 10 <= n_groups <= 14  # 20% of 60 patients, stratum by stratum, plus top-ups

    disjoint_groups_check(g[g < "P030"], g[g >= "P030"])
    with pytest.raises(ValueError, match=r"1 group\(s\) on both the train and test sides: P030"):
        disjoint_groups_check(g[g <= "P030"], g[g >= "P030"])


def test_multilabel_shots_and_fraction() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < [0.3, 0.1, 0.05, 0.5]).astype(np.float32)
    d = draw_subset(y, "multilabel", shots=5, seed=0)
    pos = y[d.indices].sum(axis=0)
    assert np.all(pos >= 5)
    assert (~y[d.indices].astype(bool).any(axis=1)).sum() >= 5  # all-negative rows too
    assert draw_subset(y, "multilabel", shots=5, seed=0).indices.tolist() == d.indices.tolist()
    y_short = y.copy()
    y_short[:, 2] = 0
    y_short[:3, 2] = 1
    assert skipped_shots(y_short, "multilabel", 5) == [
        "label 2 has 3 positive examples (< 5 shots)"
    ]
    f = draw_subset(y, "multilabel", fraction=0.1, seed=0)
    assert len(f) >= 30 and np.all(y[f.indices].sum(axis=0) >= 1)
