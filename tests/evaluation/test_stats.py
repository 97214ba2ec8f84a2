"""Bootstrap weights, confidence intervals (with their coverage), paired comparisons, verdicts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import norm

from midol.evaluation.metrics import metric_values
from midol.evaluation.stats import (
    BETTER,
    NOT_DISTINGUISHABLE,
    VERDICT_RULE,
    WORSE,
    bootstrap_weights,
    compare,
    paired_bootstrap,
    pool,
    summarize,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _degraded(p: np.ndarray, sd: float, seed: int) -> np.ndarray:
    """``p`` with Gaussian noise of ``sd`` added to its log-probabilities."""
    noise = np.random.default_rng(seed).normal(0.0, sd, size=p.shape)
    return _softmax(np.log(np.clip(p, 1e-12, 1.0)) + noise)


# --- bootstrap_weights ------------------------------------------------------------------------


def test_bootstrap_weights_are_resample_counts() -> None:
    w = bootstrap_weights(50, n_resamples=300, seed=7)
    assert w.shape == (300, 50) and w.dtype == np.int32
    assert (w >= 0).all() and (w.sum(axis=1) == 50).all()
    # Each sample is drawn once per resample on average, about 63 % of samples per resample.
    assert abs(w.mean() - 1.0) < 1e-12
    assert 0.6 < (w > 0).mean() < 0.67
    np.testing.assert_array_equal(w, bootstrap_weights(50, 300, seed=7))  # deterministic
    assert not np.array_equal(w, bootstrap_weights(50, 300, seed=8))


def test_stratified_weights_keep_each_stratum_size() -> None:
    strata = np.array([0] * 30 + [1] * 5 + [2] * 1 + [7] * 14)
    np.random.default_rng(0).shuffle(strata)
    w = bootstrap_weights(len(strata), n_resamples=400, seed=3, strata=strata)
    assert (w.sum(axis=1) == len(strata)).all()
    for s in np.unique(strata):
        assert (w[:, strata == s].sum(axis=1) == (strata == s).sum()).all()
    assert (w[:, strata == 2] == 1).all()  # a stratum of one is always itself
    assert np.ptp(w[:, strata == 1].sum(axis=0)) > 0  # but within strata rows do vary
    # Unstratified rows do not keep the sizes.
    free = bootstrap_weights(len(strata), n_resamples=400, seed=3)
    assert (free[:, strata == 1].sum(axis=1) != 5).any()


def test_stratified_by_multilabel_rows() -> None:
    labels = np.random.default_rng(1).integers(0, 2, size=(60, 3))
    w = bootstrap_weights(60, n_resamples=50, seed=0, strata=labels)
    keys = labels @ np.array([1, 2, 4])
    for k in np.unique(keys):
        assert (w[:, keys == k].sum(axis=1) == (keys == k).sum()).all()


def test_bootstrap_weights_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n > 0"):
        bootstrap_weights(0)
    with pytest.raises(ValueError, match="strata"):
        bootstrap_weights(5, strata=np.zeros(4))


# --- summarize and CI coverage ----------------------------------------------------------------


def test_summarize_mean_sd_and_interval(retina: tuple) -> None:
    y, p = retina
    draws = [p, _degraded(p, 0.3, seed=1), _degraded(p, 0.3, seed=2)]
    w = bootstrap_weights(len(y), 200, seed=0, strata=y)
    got = summarize(y, draws, "ordinal", w)
    for m, s in got.items():
        per = [float(metric_values(y, d, "ordinal", metrics=(m,))[m]) for d in draws]
        assert s.n_draws == 3 and s.per_draw == pytest.approx(per)
        assert s.mean == pytest.approx(np.mean(per)) and s.sd == pytest.approx(np.std(per, ddof=1))
        boot = np.mean([metric_values(y, d, "ordinal", w, (m,))[m] for d in draws], axis=0)
        assert (s.lo, s.hi) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
        assert s.lo < s.mean < s.hi and s.n_resamples == 200
    assert got["acc"].sd > 0
    one = summarize(y, [p], "ordinal", None, metrics=("kappa",))["kappa"]
    assert one.sd == 0.0 and np.isnan(one.lo) and np.isnan(one.hi) and one.n_resamples == 0


def _coverage(
    simulate: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    metric: str, truth: float, reps: int,
) -> float:
    """Share of ``reps`` simulated test sets whose 95 % interval contains ``truth``."""
    rng = np.random.default_rng(0)
    hits = 0
    for r in range(reps):
        y, p = simulate(rng)
        w = bootstrap_weights(len(y), 1000, seed=r, strata=y)
        s = summarize(y, [p], "binary", w, metrics=(metric,))[metric]
        hits += s.lo <= truth <= s.hi
    return hits / reps


def test_accuracy_interval_covers_the_truth_95_percent() -> None:
    def simulate(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, 200)
        pred = np.where(rng.random(200) < 0.8, y, 1 - y)  # correct with probability 0.8
        s = np.where(pred == 1, 0.7, 0.3)
        return y, np.stack([1 - s, s], axis=1)

    assert 0.92 <= _coverage(simulate, "acc", 0.8, reps=400) <= 0.98


def test_auc_interval_covers_the_truth_95_percent() -> None:
    shift = np.sqrt(2) * norm.ppf(0.8)  # binormal, unit variances: AUC = Phi(shift / sqrt 2)

    def simulate(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat([0, 1], 100)
        s = 1 / (1 + np.exp(-(rng.normal(size=200) + shift * y)))
        return y, np.stack([1 - s, s], axis=1)

    assert 0.92 <= _coverage(simulate, "auc", 0.8, reps=250) <= 0.98


# --- paired comparisons -----------------------------------------------------------------------


def test_planted_difference_is_detected(pneumonia: tuple) -> None:
    y, a = pneumonia
    b = _degraded(a, 1.5, seed=0)
    w = bootstrap_weights(len(y), 1000, seed=0, strata=y)
    diffs = paired_bootstrap(y, [a], [b], "binary", w)
    for m in ("acc", "auc", "aupr"):
        point, resampled = diffs[m]
        full_a = metric_values(y, a, "binary", metrics=(m,))[m]
        full_b = metric_values(y, b, "binary", metrics=(m,))[m]
        assert point == pytest.approx(full_a - full_b) and resampled.shape == (1000,)
        c = compare(point, resampled, m)
        assert c.verdict == BETTER and c.lo > 0 and c.p < 0.01 and c.p >= 1 / 1001, m
        back = compare(-point, -resampled, m)  # B vs A
        assert back.verdict == WORSE and back.p == pytest.approx(c.p)
    # The noise also miscalibrates B: A's ECE is lower, which for ECE is the better side.
    ece = compare(*diffs["ece"], "ece")
    assert ece.diff < 0 and ece.hi < 0 and ece.verdict == BETTER
    # Pairing is what narrows the interval: resampling A and B independently widens it.
    other = bootstrap_weights(len(y), 1000, seed=1, strata=y)
    unpaired = (metric_values(y, a, "binary", w, ("auc",))["auc"]
                - metric_values(y, b, "binary", other, ("auc",))["auc"])
    c = compare(*diffs["auc"], "auc")
    assert c.hi - c.lo < 0.8 * np.ptp(np.percentile(unpaired, [2.5, 97.5]))


def test_identical_backbones_are_not_distinguishable(retina: tuple) -> None:
    y, p = retina
    draws = [p, _degraded(p, 0.2, seed=5)]
    w = bootstrap_weights(len(y), 200, seed=1, strata=y)
    for m, (point, resampled) in paired_bootstrap(y, draws, draws, "multiclass", w).items():
        c = compare(point, resampled, m)
        assert c.diff == 0.0 and c.lo == 0.0 and c.hi == 0.0 and c.p == 1.0, m
        assert c.verdict == NOT_DISTINGUISHABLE and c.n_tasks == 1


def test_pool_is_the_mean_over_tasks(pneumonia: tuple, retina: tuple) -> None:
    parts = []
    for seed, (y, p) in enumerate((pneumonia, retina)):
        w = bootstrap_weights(len(y), 300, seed=seed, strata=y)
        parts.append(paired_bootstrap(y, [p], [_degraded(p, 1.0, seed)], "multiclass", w,
                                      metrics=("auc",))["auc"])
    point, resampled = pool(parts)
    assert point == pytest.approx((parts[0][0] + parts[1][0]) / 2)
    np.testing.assert_allclose(resampled, (parts[0][1] + parts[1][1]) / 2)
    c = compare(point, resampled, "auc", n_tasks=2)
    assert c.n_tasks == 2 and c.verdict == BETTER
    with pytest.raises(ValueError, match="resample counts"):
        pool([parts[0], (0.0, np.zeros(5))])


# --- compare ----------------------------------------------------------------------------------


def test_compare_p_value_and_verdicts() -> None:
    r = np.arange(-10.0, 90.0)  # 11 of 100 resamples <= 0, 90 >= 0
    c = compare(40.0, r, "acc")
    assert c.p == pytest.approx(0.22) and c.verdict == NOT_DISTINGUISHABLE
    assert (c.lo, c.hi) == pytest.approx(tuple(np.percentile(r, [2.5, 97.5])))
    c = compare(1.0, np.linspace(0.5, 1.5, 99), "auc")
    assert c.verdict == BETTER and c.p == pytest.approx(1 / 100)  # floored at 1/(B+1)
    assert compare(-1.0, -np.linspace(0.5, 1.5, 99), "auc").verdict == WORSE
    # ECE: lower is better, so a negative difference A - B is a better A.
    assert compare(-0.02, np.linspace(-0.03, -0.01, 99), "ece").verdict == BETTER
    assert compare(0.02, np.linspace(0.01, 0.03, 99), "ece").verdict == WORSE


def test_compare_drops_nan_resamples() -> None:
    r = np.r_[np.linspace(0.1, 0.2, 50), [np.nan] * 10]
    c = compare(0.15, r, "auc")
    assert c.n_resamples == 50 and c.verdict == BETTER and c.p == pytest.approx(1 / 51)
    empty = compare(0.15, np.full(10, np.nan), "auc")
    assert np.isnan(empty.lo) and np.isnan(empty.p) and empty.verdict == NOT_DISTINGUISHABLE


def test_verdict_rule_states_the_rule() -> None:
    for phrase in ("95%", "2.5th-97.5th percentile", "same resamples", "'better'",
                   "'not distinguishable'", "1/(B+1)", "ECE"):
        assert phrase in VERDICT_RULE
