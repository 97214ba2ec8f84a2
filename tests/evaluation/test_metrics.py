"""metric_values: every metric, full set and bootstrap rows, equals scikit-learn on real data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from midol.evaluation.metrics import ECE_BINS, METRICS, TASK_TYPES, metric_values

# the fixtures pneumonia and retina (real MedMNIST labels and probabilities): conftest.py
TOL = 1e-9


def _multilabel(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3 labels from retina grades: grade >= 1, >= 2, >= 3, scored by P(grade >= k)."""
    labels = np.stack([y >= k for k in (1, 2, 3)], axis=1).astype(np.int64)
    scores = np.stack([p[:, k:].sum(axis=1) for k in (1, 2, 3)], axis=1)
    return labels, scores


def _task(name: str, pneumonia: tuple, retina: tuple) -> tuple[np.ndarray, np.ndarray]:
    if name == "binary":
        return pneumonia
    if name == "multilabel":
        return _multilabel(*retina)
    return retina


def _resample_rows(n: int, rows: int = 5, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=rows)


def _sklearn(y: np.ndarray, p: np.ndarray, task: str, w: np.ndarray | None) -> dict[str, float]:
    """The reference: scikit-learn with ``sample_weight=w``."""
    if task == "multilabel":
        return {
            "auc": skm.roc_auc_score(y, p, average="macro", sample_weight=w),
            "aupr": skm.average_precision_score(y, p, average="macro", sample_weight=w),
            "f1": skm.f1_score(y, (p >= 0.5).astype(int), average="macro", sample_weight=w,
                               zero_division=0),
        }
    pred = p.argmax(axis=1)
    weight = np.ones(len(y)) if w is None else w
    if task == "binary":
        auc = skm.roc_auc_score(y, p[:, 1], sample_weight=w)
        aupr = skm.average_precision_score(y, p[:, 1], sample_weight=w)
    else:  # one-vs-rest over the classes with positives and negatives in this (weighted) set
        pos = [c for c in range(p.shape[1]) if weight[y == c].sum() > 0]
        both = [c for c in pos if weight[y != c].sum() > 0]
        auc = np.mean([skm.roc_auc_score(y == c, p[:, c], sample_weight=w) for c in both])
        aupr = np.mean([skm.average_precision_score(y == c, p[:, c], sample_weight=w)
                        for c in pos])
    return {
        "acc": skm.accuracy_score(y, pred, sample_weight=w),
        "bal_acc": skm.balanced_accuracy_score(y, pred, sample_weight=w),
        "auc": auc,
        "aupr": aupr,
        "f1": skm.f1_score(y, pred, average="macro", sample_weight=w),
        "kappa": skm.cohen_kappa_score(y, pred, sample_weight=w,
                                       weights="quadratic" if task == "ordinal" else None),
        "ece": _ece_loop(y, p, w),
    }


def _ece_loop(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """ECE by the definition, one sample at a time: sum_b (n_b / N) |acc_b - conf_b|."""
    weight = np.ones(len(y)) if w is None else w
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    n_b = [0.0] * ECE_BINS
    correct_b = [0.0] * ECE_BINS
    conf_b = [0.0] * ECE_BINS
    for yi, pi, wi in zip(y, p, weight):
        conf = float(max(pi))
        b = next(k for k in range(ECE_BINS) if edges[k] < conf <= edges[k + 1])
        n_b[b] += wi
        correct_b[b] += wi * (int(np.argmax(pi)) == yi)
        conf_b[b] += wi * conf
    total = sum(n_b)
    return sum(n / total * abs(c / n - f / n) for n, c, f in zip(n_b, correct_b, conf_b) if n)


@pytest.mark.parametrize("task", TASK_TYPES)
def test_full_set_matches_sklearn(task: str, pneumonia: tuple, retina: tuple) -> None:
    y, p = _task(task, pneumonia, retina)
    got = metric_values(y, p, task)
    assert list(got) == list(METRICS[task])
    want = _sklearn(y, p, task, None)
    for m, v in got.items():
        assert isinstance(v, float) and np.shape(v) == ()
        assert v == pytest.approx(want[m], abs=TOL), m
    if task == "binary":  # a real model, not a degenerate one
        assert 0.8 < got["acc"] < 0.9 and got["auc"] > 0.9


@pytest.mark.parametrize("task", TASK_TYPES)
def test_bootstrap_rows_match_sklearn_sample_weight(
    task: str, pneumonia: tuple, retina: tuple
) -> None:
    y, p = _task(task, pneumonia, retina)
    w = _resample_rows(len(y))
    got = metric_values(y, p, task, w)
    for m, v in got.items():
        assert v.shape == (len(w),) and v.dtype == np.float64
        want = [_sklearn(y, p, task, row)[m] for row in w]
        np.testing.assert_allclose(v, want, rtol=0, atol=TOL, err_msg=m)
        assert np.ptp(v) > 0, m  # the rows are really different resamples


def test_fractional_weights_match_sklearn(retina: tuple) -> None:
    y, p = retina
    w = np.random.default_rng(2).uniform(0.0, 3.0, size=(2, len(y)))
    got = metric_values(y, p, "ordinal", w)
    for i, row in enumerate(w):
        want = _sklearn(y, p, "ordinal", row)
        for m in got:
            assert got[m][i] == pytest.approx(want[m], abs=TOL), m


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_tied_scores_half_credit_like_sklearn(task: str, pneumonia: tuple, retina: tuple) -> None:
    y, p = _task(task, pneumonia, retina)
    rounded = np.round(p, 1)  # ~11 distinct values: nearly every pair of samples ties
    assert len(np.unique(rounded)) <= 11
    w = _resample_rows(len(y), rows=4, seed=3)
    got = metric_values(y, rounded, task, w, metrics=("auc", "aupr"))
    for i, row in enumerate(w):
        want = _sklearn(y, rounded, task, row)
        assert got["auc"][i] == pytest.approx(want["auc"], abs=TOL)
        assert got["aupr"][i] == pytest.approx(want["aupr"], abs=TOL)
    full = metric_values(y, rounded, task, metrics=("auc",))["auc"]
    assert full == pytest.approx(_sklearn(y, rounded, task, None)["auc"], abs=TOL)
    # Ties lose information: the rounded scores rank worse than the originals.
    assert full < metric_values(y, p, task, metrics=("auc",))["auc"]


def test_ece_equals_plain_loop(pneumonia: tuple, retina: tuple) -> None:
    for y, p in (pneumonia, retina):
        ece = metric_values(y, p, "multiclass", metrics=("ece",))["ece"]
        assert ece == pytest.approx(_ece_loop(y, p), abs=TOL)
        assert 0.0 < ece < 0.5
    y, p = retina
    w = _resample_rows(len(y), rows=3)
    got = metric_values(y, p, "multiclass", w, metrics=("ece",))["ece"]
    np.testing.assert_allclose(got, [_ece_loop(y, p, row) for row in w], rtol=0, atol=TOL)


def test_ece_bins_are_right_closed() -> None:
    # Confidences exactly on the edges 2/15 ... : (lo, hi] bins, the same edges as the loop.
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    conf = np.r_[edges[8:], 0.55, 0.999]
    p = np.stack([conf, 1.0 - conf], axis=1)
    y = np.r_[np.zeros(4, np.int64), np.ones(len(conf) - 4, np.int64)]
    got = metric_values(y, p, "binary", metrics=("ece",))["ece"]
    assert got == pytest.approx(_ece_loop(y, p), abs=TOL)


def test_perfect_and_chance_predictions() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    v = metric_values(y, perfect, "multiclass")
    for m in ("acc", "bal_acc", "auc", "aupr", "f1", "kappa"):
        assert v[m] == pytest.approx(1.0)
    assert v["ece"] == pytest.approx(1 - (0.9 + 0.1 / 3))
    flat = np.full((6, 3), 1 / 3)  # all tied: AUC 0.5, argmax always class 0
    v = metric_values(y, flat, "multiclass")
    assert v["auc"] == pytest.approx(0.5) and v["acc"] == pytest.approx(1 / 3)
    assert v["kappa"] == pytest.approx(0.0)


def test_unscorable_class_drops_out_of_macro_auc(retina: tuple) -> None:
    y, p = retina
    w = np.ones((3, len(y)))
    w[0, y == 4] = 0  # class 4 has no positives in row 0
    w[1, y != 0] = 0  # row 1 holds class 0 only: no class has both positives and negatives
    got = metric_values(y, p, "multiclass", w, metrics=("auc", "aupr"))
    present = range(4)  # every class but 4
    want_auc = np.mean([skm.roc_auc_score(y == c, p[:, c], sample_weight=w[0]) for c in present])
    want_ap = np.mean([skm.average_precision_score(y == c, p[:, c], sample_weight=w[0])
                       for c in present])
    assert got["auc"][0] == pytest.approx(want_auc, abs=TOL)
    assert got["aupr"][0] == pytest.approx(want_ap, abs=TOL)
    assert np.isnan(got["auc"][1])
    # Class 0 alone has positives and no negatives: AP 1 (every threshold is fully precise).
    assert got["aupr"][1] == pytest.approx(1.0)
    assert got["auc"][2] == pytest.approx(metric_values(y, p, "multiclass")["auc"], abs=TOL)


def test_class_carried_only_by_zero_weights_is_absent() -> None:
    # Class 2 appears only in sample 5, dropped by the resample: the row's metrics are those
    # of the materialised resample, where class 2 does not exist (scikit-learn's sample_weight
    # would still list it and average a 0 into macro F1).
    rng = np.random.default_rng(4)
    y = np.array([0, 0, 1, 1, 0, 2, 1, 0, 1, 0])
    p = rng.dirichlet(np.ones(3), size=len(y))
    p[5] = [0.1, 0.1, 0.8]
    counts = np.array([[2, 1, 1, 0, 1, 0, 2, 1, 1, 1]])
    got = metric_values(y, p, "multiclass", counts)
    idx = np.repeat(np.arange(len(y)), counts[0])
    want = metric_values(y[idx], p[idx], "multiclass")
    for m in got:
        assert got[m][0] == pytest.approx(want[m], abs=TOL), m
    pred = p[idx].argmax(axis=1)
    assert got["f1"][0] == pytest.approx(skm.f1_score(y[idx], pred, average="macro"), abs=TOL)


def test_counts_equal_materialised_resample(pneumonia: tuple) -> None:
    y, p = pneumonia
    counts = _resample_rows(len(y), rows=2, seed=5)
    got = metric_values(y, p, "binary", counts)
    for i, row in enumerate(counts):
        idx = np.repeat(np.arange(len(y)), row)
        want = metric_values(y[idx], p[idx], "binary")
        for m in got:
            assert got[m][i] == pytest.approx(want[m], abs=TOL), m


def test_metric_subset_in_requested_order(retina: tuple) -> None:
    y, p = retina
    got = metric_values(y, p, "multiclass", metrics=("kappa", "auc"))
    assert list(got) == ["kappa", "auc"]
    qwk = metric_values(y, p, "ordinal", metrics=("kappa",))["kappa"]
    assert qwk != pytest.approx(got["kappa"])  # quadratic weights only for ordinal


@pytest.mark.parametrize(
    ("y", "p", "task", "w", "metrics", "match"),
    [
        ([0, 1], np.full((2, 2), 0.5), "regression", None, None, "task_type"),
        ([0, 1], np.full((2, 2), 0.5), "multilabel", None, None, "multilabel y_true"),
        ([0, 1], np.full((2, 2), 0.5), "binary", None, ("auc", "rmse"), "unknown"),
        ([0, 1], np.full((2, 3), 0.5), "binary", None, None, "2 columns"),
        ([0, 3], np.full((2, 3), 0.5), "multiclass", None, None, r"\[0, 3\)"),
        ([0, 1], np.array([[0.5, np.nan], [0.5, 0.5]]), "binary", None, None, "nan"),
        ([0, 1], np.full((2, 2), 0.5), "binary", np.ones(2), None, "shape"),
        ([0, 1], np.full((2, 2), 0.5), "binary", -np.ones((1, 2)), None, "non-negative"),
    ],
)
def test_rejects_bad_inputs(y, p, task, w, metrics, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        metric_values(np.asarray(y), p, task, w, metrics)
