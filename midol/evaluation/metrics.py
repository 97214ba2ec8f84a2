"""Classification metrics of one test set, for the full set and many bootstrap resamples at once.

A bootstrap resample of a test set of ``N`` samples is a row of per-sample counts (how often
each sample was drawn), so ``B`` resamples are a ``B x N`` weight matrix and every metric here
is a weighted metric evaluated for all rows together:

* counting metrics (acc, bal_acc, F1, kappa) read a weighted confusion matrix per row,
  ``weights @ onehot(true * C + pred)``;
* ranking metrics (AUC, AP) sort each score column once (positives and negatives apart);
  per row, cumulative sums of the weights along those orders, read at each positive's
  "scored above" / "scored at or above" positions (``searchsorted`` on the sorted scores),
  give AUC with ties at half credit and AP over the distinct thresholds, exactly as
  scikit-learn's ``roc_auc_score`` / ``average_precision_score``;
* ECE sums ``weights @ (per-bin correct - confidence)``.

Each metric of a row equals scikit-learn's on that row's materialised resample
(``np.repeat(samples, counts)``), and so equals scikit-learn with ``sample_weight=row``
except where scikit-learn counts a class that only zero-weight samples carry (see
:func:`metric_values`).

Speed (measured on one shared CPU core, ``OMP_NUM_THREADS=1``): all 7 metrics of a 9-class
task for ``B = 1000`` resamples of ``N = 600`` samples take about 0.085 s (AUC + AP 0.045 s of
it, the four confusion-matrix metrics 0.004 s); the unweighted full-set values about 1 ms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ECE_BINS", "F1_THRESHOLD", "METRICS", "TASK_TYPES", "metric_values"]

TASK_TYPES = ("binary", "multiclass", "ordinal", "multilabel")
# Per task type, in report order.
METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("acc", "bal_acc", "auc", "aupr", "f1", "kappa", "ece"),
    "multiclass": ("acc", "bal_acc", "auc", "aupr", "f1", "kappa", "ece"),
    "ordinal": ("acc", "bal_acc", "auc", "aupr", "f1", "kappa", "ece"),
    "multilabel": ("auc", "aupr", "f1"),
}
ECE_BINS = 15
F1_THRESHOLD = 0.5  # multilabel: a label is predicted when its probability is >= this

FloatArray = NDArray[np.float64]
_CM_METRICS = frozenset({"acc", "bal_acc", "f1", "kappa"})


def metric_values(
    y_true: ArrayLike,
    scores: NDArray[np.floating],
    task_type: str,
    weights: NDArray[np.integer] | NDArray[np.floating] | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, FloatArray | np.float64]:
    """``{metric: value}`` for ``metrics`` (default ``METRICS[task_type]``, in that order).

    Args:
        y_true: ``N`` class ids in ``[0, C)`` (binary, multiclass, ordinal) or an ``N x L``
            0/1 matrix (multilabel).
        scores: ``N x C`` class probabilities (binary: ``C = 2``, column 1 is the positive
            class) or ``N x L`` per-label probabilities (multilabel).
        task_type: one of :data:`TASK_TYPES`.
        weights: optional ``B x N`` non-negative per-sample weights (bootstrap counts).

    Returns:
        Without ``weights`` each value is an ``np.float64`` (a Python float of shape ``()``);
        with ``weights`` a ``(B,)`` float64 array, one value per row.

    Definitions (prediction = argmax of ``scores``; "present" = positive total weight):

    * ``acc``, ``bal_acc`` (mean recall over classes present in ``y_true``);
    * ``f1``: macro F1 over the classes present in ``y_true`` or the predictions; multilabel:
      macro F1 of ``scores >= 0.5`` over all ``L`` labels, a label with no positives and no
      predictions scoring 0 (scikit-learn's ``zero_division``);
    * ``kappa``: Cohen's kappa, quadratic weights ``(i - j)^2`` on the class ids for
      ``ordinal``, unweighted otherwise;
    * ``auc``: binary: ROC AUC of column 1; multiclass/ordinal: mean over classes with both
      positives and negatives of the one-vs-rest AUC of the class's own column; multilabel:
      mean over labels with both values;
    * ``aupr``: average precision, likewise (over classes/labels with positives);
    * ``ece``: ``sum_b (n_b / N) |acc_b - conf_b|`` over 15 equal-width bins ``(lo, hi]`` of
      the top-1 confidence ``conf = max_c scores[:, c]``, ``acc_b`` and ``conf_b`` being the
      bin's accuracy and mean confidence (``n_b``, ``N``: weighted counts).

    A row where nothing is scorable (e.g. no class with both positives and negatives) gives
    nan for that metric. Classes are "present" by weight: a class carried only by samples of
    weight 0 is absent from that row, as in its materialised resample, whereas scikit-learn's
    ``sample_weight`` still lists it (its macro F1 would then average in a 0 for it).

    Raises:
        ValueError: unknown task type or metric, shapes that disagree, class ids outside
            ``[0, C)``, non-finite scores, negative weights.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    names = tuple(METRICS[task_type] if metrics is None else metrics)
    unknown = [m for m in names if m not in METRICS[task_type]]
    if unknown:
        raise ValueError(f"unknown {task_type} metric(s) {unknown}; known: {METRICS[task_type]}")
    y, s = _check_inputs(y_true, scores, task_type)
    single = weights is None
    w = np.ones((1, s.shape[0])) if weights is None else _check_weights(weights, s.shape[0])

    if task_type == "multilabel":
        out = _multilabel(y, s, w, names)
    else:
        out = _single_label(y, s, w, names, ordinal=task_type == "ordinal",
                            binary=task_type == "binary")
    ordered = {m: out[m] for m in names}
    if single:
        return {m: np.float64(v[0]) for m, v in ordered.items()}
    return dict(ordered)


def _check_inputs(
    y_true: ArrayLike, scores: NDArray[np.floating], task_type: str
) -> tuple[NDArray[np.int64], FloatArray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty N x C matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain nan or inf")
    y_raw = np.asarray(y_true)
    if task_type == "multilabel":
        if y_raw.shape != s.shape:
            raise ValueError(f"multilabel y_true {y_raw.shape} and scores {s.shape} differ")
        if not np.isin(y_raw, (0, 1)).all():
            raise ValueError("multilabel y_true must be 0/1")
        return y_raw.astype(np.int64), s
    if y_raw.ndim != 1 or y_raw.shape[0] != s.shape[0]:
        raise ValueError(f"y_true must have shape ({s.shape[0]},), got {y_raw.shape}")
    if not np.issubdtype(y_raw.dtype, np.integer) and not np.array_equal(y_raw, np.round(y_raw)):
        raise ValueError("y_true must hold integer class ids")
    y = y_raw.astype(np.int64)
    n_classes = s.shape[1]
    if task_type == "binary" and n_classes != 2:
        raise ValueError(f"binary scores must have 2 columns, got {n_classes}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"class ids must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    return y, s


def _check_weights(weights: NDArray[np.integer] | NDArray[np.floating], n: int) -> FloatArray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must have shape (B, {n}), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    return w


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    """``num / den`` with nan where ``den == 0`` (an empty resample or an unscorable class)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _masked_mean(values: FloatArray, mask: NDArray[np.bool_]) -> FloatArray:
    """Row-wise mean of ``values`` over ``mask`` (B x K); nan for rows with nothing masked."""
    return _ratio(np.where(mask, values, 0.0).sum(axis=1), mask.sum(axis=1).astype(np.float64))


def _single_label(
    y: NDArray[np.int64], s: FloatArray, w: FloatArray, names: tuple[str, ...],
    ordinal: bool, binary: bool,
) -> dict[str, FloatArray]:
    n_classes = s.shape[1]
    pred = s.argmax(axis=1)
    total = w.sum(axis=1)
    out: dict[str, FloatArray] = {}

    if _CM_METRICS.intersection(names):
        cm = _confusion(y, pred, n_classes, w)  # B x C(true) x C(pred)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support = cm.sum(axis=2)
        predicted = cm.sum(axis=1)
        if "acc" in names:
            out["acc"] = _ratio(tp.sum(axis=1), total)
        if "bal_acc" in names:
            out["bal_acc"] = _masked_mean(_ratio(tp, support), support > 0)
        if "f1" in names:
            # 2tp / (2tp + fp + fn) = 2tp / (support + predicted)
            out["f1"] = _masked_mean(_ratio(2 * tp, support + predicted),
                                     (support + predicted) > 0)
        if "kappa" in names:
            ids = np.arange(n_classes, dtype=np.float64)
            dist = (ids[:, None] - ids[None, :]) ** 2 if ordinal else 1.0 - np.eye(n_classes)
            observed = np.einsum("bij,ij->b", cm, dist)
            expected = _ratio(np.einsum("bi,bj,ij->b", support, predicted, dist), total)
            with np.errstate(divide="ignore", invalid="ignore"):
                out["kappa"] = np.where(expected > 0, 1.0 - observed / expected, np.nan)

    if "auc" in names or "aupr" in names:
        # Binary scores only the positive class; multiclass averages one-vs-rest over classes.
        classes = [1] if binary else list(range(n_classes))
        auc_sum = np.zeros(w.shape[0])
        auc_n = np.zeros(w.shape[0])
        ap_sum = np.zeros(w.shape[0])
        ap_n = np.zeros(w.shape[0])
        for c in classes:
            auc, ap = _rank_metrics(y == c, s[:, c], w)
            auc_ok, ap_ok = np.isfinite(auc), np.isfinite(ap)
            auc_sum += np.where(auc_ok, auc, 0.0)
            auc_n += auc_ok
            ap_sum += np.where(ap_ok, ap, 0.0)
            ap_n += ap_ok
        if "auc" in names:
            out["auc"] = _ratio(auc_sum, auc_n)
        if "aupr" in names:
            out["aupr"] = _ratio(ap_sum, ap_n)

    if "ece" in names:
        conf = s.max(axis=1)
        edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
        # searchsorted(left) - 1 puts conf in the bin (lo, hi] of the very same edges.
        bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, ECE_BINS - 1)
        gap = np.zeros((s.shape[0], ECE_BINS))
        gap[np.arange(s.shape[0]), bins] = (pred == y) - conf
        out["ece"] = _ratio(np.abs(w @ gap).sum(axis=1), total)
    return out


def _confusion(
    y: NDArray[np.int64], pred: NDArray[np.int64], n_classes: int, w: FloatArray
) -> FloatArray:
    """``B x C x C`` weighted confusion matrices (rows: true class, columns: prediction)."""
    pair = y * n_classes + pred
    # Only the (true, pred) pairs that occur get a column, so the product stays B x N x (<= C^2).
    uniq, inv = np.unique(pair, return_inverse=True)
    onehot = (inv.reshape(-1)[:, None] == np.arange(uniq.size)[None, :]).astype(np.float64)
    cm = np.zeros((w.shape[0], n_classes * n_classes))
    cm[:, uniq] = w @ onehot
    return cm.reshape(w.shape[0], n_classes, n_classes)


def _rank_metrics(
    positive: NDArray[np.bool_], score: FloatArray, w: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per-row ROC AUC and average precision of ``score`` for the labels ``positive``.

    AUC is nan in a row without positives or without negatives, AP in a row without positives.
    """
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive)
    # Positives and negatives are sorted apart (descending score), so only the positives'
    # columns are read per positive; the negatives enter through one cumulative sum.
    pos_idx = pos_idx[np.argsort(-score[pos_idx], kind="stable")]
    neg_idx = neg_idx[np.argsort(-score[neg_idx], kind="stable")]
    pos_key, neg_key = -score[pos_idx], -score[neg_idx]  # ascending keys for searchsorted
    neg_above = np.searchsorted(neg_key, pos_key, side="left")  # negatives scored > s_i
    neg_at_or_above = np.searchsorted(neg_key, pos_key, side="right")  # ... >= s_i
    pos_at_or_above = np.searchsorted(pos_key, pos_key, side="right")  # positives >= s_i

    n_rows = w.shape[0]
    w_pos = w[:, pos_idx]
    cum_pos = np.zeros((n_rows, pos_idx.size + 1))
    np.cumsum(w_pos, axis=1, out=cum_pos[:, 1:])
    cum_neg = np.zeros((n_rows, neg_idx.size + 1))
    np.cumsum(w[:, neg_idx], axis=1, out=cum_neg[:, 1:])
    n_pos, n_neg = cum_pos[:, -1], cum_neg[:, -1]

    # A positive beats the negatives scored strictly lower, and half of those it ties with:
    # n_neg - above - tied / 2 = n_neg - (above + at_or_above) / 2.
    below = n_neg[:, None] - 0.5 * (cum_neg[:, neg_above] + cum_neg[:, neg_at_or_above])
    auc = _ratio((w_pos * below).sum(axis=1), n_pos * n_neg)
    # AP = sum over distinct thresholds of (recall step) x precision = the positives' weighted
    # mean of the precision at their own score (tied samples share one threshold).
    tps = cum_pos[:, pos_at_or_above]
    predicted = tps + cum_neg[:, neg_at_or_above]
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted > 0)
    ap = _ratio((w_pos * precision).sum(axis=1), n_pos)
    return auc, ap


def _multilabel(
    y: NDArray[np.int64], s: FloatArray, w: FloatArray, names: tuple[str, ...]
) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    n_labels = s.shape[1]
    if "auc" in names or "aupr" in names:
        per = [_rank_metrics(y[:, j] == 1, s[:, j], w) for j in range(n_labels)]
        auc = np.stack([a for a, _ in per], axis=1)
        ap = np.stack([p for _, p in per], axis=1)
        if "auc" in names:
            out["auc"] = _masked_mean(auc, np.isfinite(auc))
        if "aupr" in names:
            out["aupr"] = _masked_mean(ap, np.isfinite(ap))
    if "f1" in names:
        truth = y == 1
        pred = s >= F1_THRESHOLD
        tp = w @ (truth & pred).astype(np.float64)
        den = w @ truth.astype(np.float64) + w @ pred.astype(np.float64)  # 2tp + fp + fn
        # A label with no positives and no predictions scores 0, as scikit-learn's default.
        f1 = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)
        out["f1"] = np.where(w.sum(axis=1) > 0, f1.mean(axis=1), np.nan)
    return out
