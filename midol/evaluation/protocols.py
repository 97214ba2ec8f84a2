"""Probing protocols on precomputed frozen features: weighted kNN and an L2 logistic probe.

Both predictors take ``(N, D)`` feature arrays (any float dtype) and return scores for the
test rows: ``(N_test, C)`` class probabilities whose rows sum to 1 for ``binary`` (C = 2),
``multiclass`` and ``ordinal`` (treated as multiclass here), or ``(N_test, L)`` independent
per-label probabilities for ``multilabel``. Class labels are int ids ``(N,)`` in
``[0, num_classes)``; multilabel labels are ``(N, L)`` 0/1 arrays with ``L == num_classes``.
``num_classes`` is explicit because a label-efficient draw may lack a class: its column still
exists (probability 0 for both predictors, see :func:`knn_scores` and :func:`linear_scores`).

kNN (:func:`knn_scores`) is DINO's weighted kNN (Caron et al. 2021, ``eval_knn.py``), with torch
on the CPU (float32 cosine similarities, chunked over test rows) and ties at the k-th neighbour
broken towards the lower training index, so results do not depend on ``topk``'s tie order.

Linear probe (:func:`linear_scores`): scikit-learn's ``LogisticRegression`` (lbfgs, L2,
multinomial for 3+ classes, one-vs-rest binary fits for multilabel) on features standardised
with a ``StandardScaler`` fitted on the training rows only. The implementation was chosen by
measurement against a torch ``LBFGS`` fit of the same objective (mean cross-entropy +
``||W||^2 / (2 C N)``, strong-Wolfe line search, gradient tolerance 1e-4 like scikit-learn's,
float32 and float64), on N = 1000 standardised synthetic frozen features (32-dim latent
structure + noise), 5 classes, the 6 default Cs fitted one after another (median of 5
interleaved repetitions, this project's 2-core shared CPU box, torch 2.14, scikit-learn 1.9.1):

=========================  ===========  ===========
fitting the 6 Cs           D = 768      D = 128
=========================  ===========  ===========
scikit-learn, 1 BLAS thr.  0.20 s       0.07 s
torch float32, 1 thread    1.00 s       0.26 s
torch float64, 1 thread    1.19 s       0.24 s
scikit-learn, 2 BLAS thr.  2.03 s       0.08 s
torch float64, 2 threads   0.63 s       0.17 s
=========================  ===========  ===========

scikit-learn with one BLAS thread is the fastest at both widths (2.4-6x ahead of every torch
variant, whose per-iteration overhead dominates at these sizes; iteration counts are alike, 16-82
per C), so it is the implementation. End to end, ``linear_scores`` on 1000 pneumoniamnist
training images as 196 downsampled pixels, C chosen on the 524 validation images, takes 0.12 s.
OpenBLAS's own threading made scikit-learn's tall-skinny products *slower* on this box (2.03 s
vs 0.20 s at D = 768; 10.5 s vs 5.1 s at N = 10000, D = 768), so every fit runs under
``threadpool_limits(1, "blas")``, which also keeps results bitwise reproducible whatever the
machine's core count. Results are deterministic given ``seed`` (lbfgs has no randomness; the
seed only shuffles the inner-CV folds).

``max_iter`` is 1000. A fit that reaches it (a nearly separable problem at large C, where the
optimum is far away and the log-loss curve flat) is not an error: its ``ConvergenceWarning`` is
silenced because one warning per fold and C would flood ``midol eval``'s output for dozens of
fits, and instead every non-converged fit is *recorded* in :attr:`LinearResult.notes`, which the
report can print once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

TASK_TYPES = ("binary", "multiclass", "ordinal", "multilabel")
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_ITER = 1000
# Probabilities are clipped to [EPS, 1 - EPS] inside the selection log-loss only (a class absent
# from the fitting rows has probability exactly 0; the clip keeps its log-loss finite).
EPS = 1e-15
# Test rows per similarity chunk: at most 2**24 float32 similarities (64 MiB) at a time.
_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------
# input checks


def _check_task(task_type: str, num_classes: int) -> None:
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if task_type == "binary" and num_classes != 2:
        raise ValueError(f"binary tasks have num_classes == 2, got {num_classes}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _features(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite values")
    return arr


def _labels(y: np.ndarray, n: int, task_type: str, num_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if task_type == "multilabel":
        if arr.shape != (n, num_classes):
            raise ValueError(f"{name} must be (N, L) = ({n}, {num_classes}), got {arr.shape}")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name}: multilabel labels must be 0/1")
        return arr.astype(np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != (n,):
        raise ValueError(f"{name} must be (N,) = ({n},) class ids, got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name}: class ids must lie in [0, {num_classes})")
    if not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"{name}: class ids must be integers")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------------------------
# kNN


def _topk_lowest_index_ties(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k similarities per row, a tie at the k-th value going to the lower column index."""
    vals, idx = torch.topk(sims, k, dim=1)
    tied = (sims >= vals[:, -1:]).sum(dim=1) > k
    if bool(tied.any()):
        rows = torch.nonzero(tied).flatten()
        order = torch.sort(-sims[rows], dim=1, stable=True).indices[:, :k]
        idx[rows] = order
        vals[rows] = torch.gather(sims[rows], 1, order)
    return vals, idx


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    task_type: str,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Weighted kNN scores of DINO (Caron et al. 2021, ``eval_knn.py``).

    Features are L2-normalised, so the similarity is the cosine ``s_ij = <x_i, x_j> /
    (|x_i| |x_j|)`` (a zero vector has similarity 0 to everything). With ``N_k(i)`` the
    ``k`` training rows most similar to test row ``i`` (``k`` clipped to the number of
    training rows; a tie at the k-th similarity goes to the lower training index), each
    neighbour votes with weight ``w_ij = exp(s_ij / T)`` and

        score_ic = sum_{j in N_k(i)} w_ij [y_j = c]  /  sum_{j in N_k(i)} w_ij

    (DINO's ``retrieval_one_hot * exp(distances / T)`` summed over neighbours, normalised here to
    sum 1). Multilabel: per label ``l``, the weighted mean of the neighbours' 0/1 labels,
    ``sum_j w_ij y_jl / sum_j w_ij``. The weights are computed as ``exp((s_ij - max_j s_ij) /
    T)``, which cancels in the ratio and cannot overflow at small ``T``.

    Args:
        train_x: ``(N, D)`` training features.
        train_y: ``(N,)`` class ids, or ``(N, L)`` 0/1 labels for multilabel.
        test_x: ``(M, D)`` test features.
        task_type: ``binary`` | ``multiclass`` | ``ordinal`` | ``multilabel``.
        num_classes: Number of classes (multilabel: of labels); absent classes score 0.
        k: Number of neighbours (DINO's default is 20).
        temperature: ``T`` of the vote weights (DINO's 0.07).

    Returns:
        ``(M, num_classes)`` float64 scores.
    """
    _check_task(task_type, num_classes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    xtr = _features(train_x, "train_x")
    xte = _features(test_x, "test_x")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"feature widths differ: train {xtr.shape[1]}, test {xte.shape[1]}")
    n = xtr.shape[0]
    if n == 0:
        raise ValueError("knn_scores needs at least one training row")
    ytr = _labels(train_y, n, task_type, num_classes, "train_y")
    kk = min(k, n)

    train = torch.nn.functional.normalize(torch.from_numpy(np.asarray(xtr, np.float32)), dim=1)
    test = torch.nn.functional.normalize(torch.from_numpy(np.asarray(xte, np.float32)), dim=1)
    labels = torch.from_numpy(ytr)
    out = np.zeros((xte.shape[0], num_classes), dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    with torch.no_grad():
        for start in range(0, xte.shape[0], chunk):
            sims = test[start : start + chunk] @ train.T
            vals, idx = _topk_lowest_index_ties(sims, kk)
            vals64 = vals.double()
            w = torch.exp((vals64 - vals64[:, :1]) / temperature)  # (m, k); first is the max
            if task_type == "multilabel":
                votes = torch.einsum("mk,mkl->ml", w, labels[idx])
            else:
                votes = torch.zeros(w.shape[0], num_classes, dtype=torch.float64)
                votes.scatter_add_(1, labels[idx], w)
            out[start : start + chunk] = (votes / w.sum(dim=1, keepdim=True)).numpy()
    return out


# --------------------------------------------------------------------------------------------
# linear probe


@dataclass
class LinearResult:
    """Scores of the linear probe and how its regularisation was chosen.

    Attributes:
        scores: ``(N_test, C)`` class probabilities (rows sum to 1) or ``(N_test, L)``
            per-label probabilities for multilabel.
        C: The inverse L2 strength used for the final fit on the training rows.
        chosen_by: ``"val"`` (lowest validation log-loss), ``"inner-cv"`` (lowest stratified
            inner cross-validation log-loss on train), ``"fixed (too few samples)"`` (a class, or
            for multilabel a label's positives or negatives, has fewer than 2 training rows:
            C = 1.0) or ``"fixed (one class in train)"`` (nothing to fit: the scores are that
            class's one-hot, or for multilabel every label's training rate).
        val_losses: Mean selection log-loss per candidate C (empty when C was fixed).
        notes: Human-readable remarks for the report, e.g. fits that reached ``max_iter``.
    """

    scores: np.ndarray
    C: float
    chosen_by: str
    val_losses: dict[float, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Predictor = Callable[[np.ndarray], np.ndarray]


class _Fitter:
    """Fits one C on (standardised) rows and counts fits that reach ``max_iter``."""

    def __init__(self, task_type: str, num_classes: int) -> None:
        self.task_type = task_type
        self.num_classes = num_classes
        self.fits = 0
        self.not_converged: dict[float, int] = {}

    def _logreg(self, x: np.ndarray, y: np.ndarray, C: float) -> LogisticRegression:
        model = LogisticRegression(C=C, max_iter=MAX_ITER)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x, y)
        self.fits += 1
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                # Recorded in LinearResult.notes instead (see the module docstring).
                self.not_converged[C] = self.not_converged.get(C, 0) + 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model

    def fit(self, x: np.ndarray, y: np.ndarray, C: float) -> Predictor:
        if self.task_type == "multilabel":
            return self._fit_multilabel(x, y, C)
        present = np.unique(y)
        if present.size == 1:
            only = int(present[0])
            return lambda xe: np.eye(self.num_classes)[np.full(xe.shape[0], only)]
        model = self._logreg(x, y, C)
        cols = model.classes_.astype(np.int64)

        def predict(xe: np.ndarray) -> np.ndarray:
            out = np.zeros((xe.shape[0], self.num_classes))
            out[:, cols] = model.predict_proba(xe)
            return out

        return predict

    def _fit_multilabel(self, x: np.ndarray, y: np.ndarray, C: float) -> Predictor:
        per_label: list[LogisticRegression | float] = []
        for j in range(y.shape[1]):
            col = y[:, j]
            if np.all(col == col[0]):
                per_label.append(float(col.mean()))  # a single value: its train rate
            else:
                per_label.append(self._logreg(x, col.astype(np.int64), C))

        def predict(xe: np.ndarray) -> np.ndarray:
            out = np.empty((xe.shape[0], len(per_label)))
            for j, m in enumerate(per_label):
                out[:, j] = m if isinstance(m, float) else m.predict_proba(xe)[:, 1]
            return out

        return predict


def _log_loss(scores: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """Mean log-loss (multilabel: mean binary cross-entropy over rows and labels)."""
    p = np.clip(scores, EPS, 1 - EPS)
    if multilabel:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(y.shape[0]), y])))


def _inner_cv_plan(y: np.ndarray, multilabel: bool) -> tuple[int, np.ndarray] | None:
    """(folds, stratification target) of the inner CV, or None when a class has < 2 rows.

    Single-label: stratify by class, folds = min(3, smallest class count). Multilabel: over the
    labels that vary, the rarer side (positives or negatives) of the most unbalanced label sets
    the folds and is the stratification target (other labels are not stratified; a label that
    becomes constant in a fold's training rows gets its constant-rate score there).
    """
    if multilabel:
        pos = y.sum(axis=0)
        minority = np.minimum(pos, y.shape[0] - pos)
        varying = np.flatnonzero(minority > 0)
        smallest = int(minority[varying].min())
        target = y[:, varying[np.argmin(minority[varying])]].astype(np.int64)
    else:
        counts = np.bincount(y)
        smallest = int(counts[counts > 0].min())
        target = y
    if smallest < 2:
        return None
    return min(3, smallest), target


def linear_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    task_type: str,
    num_classes: int,
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> LinearResult:
    """L2 logistic-regression probe on standardised frozen features.

    The ``StandardScaler`` is fitted on ``train_x`` only. ``C`` is the candidate with the lowest
    mean log-loss (ties: the earlier candidate) on the validation split when one is given, and
    otherwise in a stratified inner cross-validation on train (``StratifiedKFold``, 3 folds
    capped by the smallest class count, shuffled with ``seed``; each fold fits its own scaler on
    its fit rows, so held-out rows never inform the standardisation); when a class has fewer than 2
    training rows, ``C = 1.0``. The final model is fitted on the training rows alone with the
    chosen ``C`` (validation rows are never trained on). Multilabel tasks fit one binary model
    per label (one-vs-rest) sharing one ``C``, chosen on the mean binary log-loss; a label with a
    single value in train scores its train rate. A class absent from the training rows has a
    probability column of zeros (scikit-learn's ``classes_`` mapped into ``num_classes``).

    Returns:
        :class:`LinearResult` with ``(N_test, num_classes)`` float64 scores.
    """
    _check_task(task_type, num_classes)
    multilabel = task_type == "multilabel"
    xtr = _features(train_x, "train_x")
    xte = _features(test_x, "test_x")
    if xtr.shape[0] == 0:
        raise ValueError("linear_scores needs at least one training row")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"feature widths differ: train {xtr.shape[1]}, test {xte.shape[1]}")
    cands = [float(c) for c in Cs]
    if not cands or min(cands) <= 0:
        raise ValueError(f"Cs must be non-empty and positive, got {list(Cs)}")
    ytr = _labels(train_y, xtr.shape[0], task_type, num_classes, "train_y")
    x64 = xtr.astype(np.float64)
    scaler = StandardScaler().fit(x64)
    ztr = scaler.transform(x64)
    zte = scaler.transform(xte.astype(np.float64))
    fitter = _Fitter(task_type, num_classes)
    losses: dict[float, float] = {}
    have_val = val_x is not None and val_y is not None and np.asarray(val_y).shape[0] > 0

    with threadpool_limits(limits=1, user_api="blas"):
        varies = bool(np.any(ytr != ytr[0]))
        if not varies:
            predict = fitter.fit(ztr, ytr, 1.0)
            return LinearResult(predict(zte), 1.0, "fixed (one class in train)")
        if have_val:
            assert val_x is not None and val_y is not None
            xva = _features(val_x, "val_x")
            yva = _labels(val_y, xva.shape[0], task_type, num_classes, "val_y")
            zva = scaler.transform(xva.astype(np.float64))
            best: tuple[float, Predictor] | None = None
            for C in cands:
                predict = fitter.fit(ztr, ytr, C)
                losses[C] = _log_loss(predict(zva), yva, multilabel)
                if best is None or losses[C] < losses[best[0]]:
                    best = (C, predict)
            assert best is not None
            chosen, final = best[0], best[1]
            chosen_by = "val"
        else:
            plan = _inner_cv_plan(ytr, multilabel)
            if plan is None:
                chosen, chosen_by = 1.0, "fixed (too few samples)"
            else:
                folds, target = plan
                splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
                # Each fold repeats the whole protocol: its own scaler, fitted on its fit rows.
                folds_z = []
                for fit_rows, held_rows in splitter.split(xtr, target):
                    fold_scaler = StandardScaler().fit(x64[fit_rows])
                    folds_z.append((fold_scaler.transform(x64[fit_rows]), ytr[fit_rows],
                                    fold_scaler.transform(x64[held_rows]), ytr[held_rows]))
                for C in cands:
                    total = 0.0
                    for z_fit, y_fit, z_held, y_held in folds_z:
                        predict = fitter.fit(z_fit, y_fit, C)
                        total += _log_loss(predict(z_held), y_held, multilabel) * y_held.shape[0]
                    losses[C] = total / ztr.shape[0]
                chosen = min(cands, key=lambda c: losses[c])  # first minimum on ties
                chosen_by = "inner-cv"
            final = fitter.fit(ztr, ytr, chosen)
        scores = final(zte)

    notes = [
        f"lbfgs reached max_iter={MAX_ITER} in {n} fit(s) at C={C:g}"
        for C, n in sorted(fitter.not_converged.items())
    ]
    return LinearResult(scores, chosen, chosen_by, losses, notes)
