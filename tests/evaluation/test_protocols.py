"""kNN and linear probes on frozen features (midol/evaluation/protocols.py).

The kNN is checked against a plain double-loop restatement of DINO's weighted vote; the linear
probe against direct scikit-learn fits and its own C selection recomputed by hand. Real features
are flattened, downsampled MedMNIST pixels from the shared data folder (skipped when absent).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from midol.evaluation.protocols import DEFAULT_CS, knn_scores, linear_scores

# knn_scores computes cosine similarities in float32 (error ~1e-6), which exp(s / T) amplifies
# by 1 / T ~ 14; a wrong neighbour or weight moves a score by ~1e-2.
KNN_ATOL = 5e-5
MEDMNIST = Path(__file__).parents[2] / ".." / "shared" / "data" / "medmnist"


def _medmnist(name: str) -> dict[str, np.ndarray]:
    path = MEDMNIST / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (the project's shared MedMNIST data is not mounted)")
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _pixels(images: np.ndarray, step: int) -> np.ndarray:
    """Flattened, downsampled pixels in [0, 1] as float32 'frozen features'."""
    return (images[:, ::step, ::step].reshape(len(images), -1) / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def retina() -> dict[str, np.ndarray]:
    d = _medmnist("retinamnist")
    rng = np.random.default_rng(0)
    tr = rng.choice(len(d["train_images"]), 300, replace=False)
    return {
        "xtr": _pixels(d["train_images"][tr], 4),  # 7 x 7 x 3 = 147 dims
        "ytr": d["train_labels"][tr, 0].astype(np.int64),
        "xte": _pixels(d["test_images"][:60], 4),
        "xva": _pixels(d["val_images"], 4),
        "yva": d["val_labels"][:, 0].astype(np.int64),
    }


@pytest.fixture(scope="module")
def pneumonia() -> dict[str, np.ndarray]:
    d = _medmnist("pneumoniamnist")
    rng = np.random.default_rng(0)
    tr = rng.choice(len(d["train_images"]), 1000, replace=False)
    return {
        "xtr": _pixels(d["train_images"][tr], 2),  # 14 x 14 = 196 dims
        "ytr": d["train_labels"][tr, 0].astype(np.int64),
        "xva": _pixels(d["val_images"], 2),
        "yva": d["val_labels"][:, 0].astype(np.int64),
        "xte": _pixels(d["test_images"], 2),
        "yte": d["test_labels"][:, 0].astype(np.int64),
    }


# ------------------------------------------------------------------------------------------
# kNN


def naive_knn(train_x, train_y, test_x, num_classes, k, temperature, multilabel=False):
    """DINO's weighted kNN restated one test sample and one training sample at a time."""
    train = [np.asarray(r, np.float64) / max(np.linalg.norm(r), 1e-12) for r in train_x]
    out = np.zeros((len(test_x), num_classes))
    for i, t in enumerate(test_x):
        t = np.asarray(t, np.float64) / max(np.linalg.norm(t), 1e-12)
        sims = [float(np.dot(t, r)) for r in train]
        neighbours = sorted(range(len(train)), key=lambda j: (-sims[j], j))[:k]
        total = 0.0
        for j in neighbours:
            w = math.exp(sims[j] / temperature)
            total += w
            if multilabel:
                out[i] += w * np.asarray(train_y[j], np.float64)
            else:
                out[i, int(train_y[j])] += w
        out[i] /= total
    return out


@pytest.mark.parametrize("k", [10, 20])
def test_knn_equals_naive_loop_random(k: int) -> None:
    rng = np.random.default_rng(k)
    xtr, xte = rng.normal(size=(150, 24)), rng.normal(size=(30, 24))
    ytr = rng.integers(0, 4, size=150)  # num_classes 5: class 4 absent -> a zero column
    got = knn_scores(xtr, ytr, xte, "multiclass", 5, k=k)
    want = naive_knn(xtr, ytr, xte, 5, k, 0.07)
    assert got.shape == (30, 5)
    np.testing.assert_allclose(got, want, atol=KNN_ATOL)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(got[:, 4] == 0.0)

    yml = (rng.random((150, 3)) < 0.3).astype(np.float32)
    got = knn_scores(xtr, yml, xte, "multilabel", 3, k=k)
    np.testing.assert_allclose(got, naive_knn(xtr, yml, xte, 3, k, 0.07, True), atol=KNN_ATOL)


@pytest.mark.parametrize("k", [10, 20])
def test_knn_equals_naive_loop_on_retinamnist_pixels(retina, k: int) -> None:
    xtr, ytr, xte = retina["xtr"], retina["ytr"], retina["xte"]
    got = knn_scores(xtr, ytr, xte, "ordinal", 5, k=k)
    np.testing.assert_allclose(got, naive_knn(xtr, ytr, xte, 5, k, 0.07), atol=KNN_ATOL)
    # Multilabel from the same grades: "grade >= 1", ..., "grade >= 4".
    yml = (ytr[:, None] >= np.arange(1, 5)[None, :]).astype(np.float32)
    got = knn_scores(xtr, yml, xte, "multilabel", 4, k=k, temperature=0.1)
    want = naive_knn(xtr, yml, xte, 4, k, 0.1, multilabel=True)
    np.testing.assert_allclose(got, want, atol=KNN_ATOL)
    # Cumulative labels stay monotone under a weighted mean.
    assert np.all(np.diff(got, axis=1) <= 1e-12)


def test_knn_k_larger_than_train_uses_all_rows() -> None:
    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    ytr = np.array([0, 1, 1, 2, 0, 2, 2])
    got = knn_scores(xtr, ytr, xte, "multiclass", 3, k=20)
    np.testing.assert_allclose(got, naive_knn(xtr, ytr, xte, 3, 7, 0.07), atol=KNN_ATOL)
    # All 7 rows vote: with T huge every weight is ~1 and the scores are the class shares.
    flat = knn_scores(xtr, ytr, xte, "multiclass", 3, k=50, temperature=1e6)
    np.testing.assert_allclose(flat, np.tile([2 / 7, 2 / 7, 3 / 7], (4, 1)), atol=1e-5)


def test_knn_ties_go_to_the_lower_index_and_small_temperature_is_finite() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    xtr = np.stack([b, a, a, a])  # three identical rows tie for the nearest neighbour of a
    ytr = np.array([3, 0, 1, 2])
    got = knn_scores(xtr, ytr, a[None], "multiclass", 4, k=2)
    np.testing.assert_array_equal(got, [[0.5, 0.5, 0.0, 0.0]])
    got = knn_scores(xtr, ytr, np.stack([a, 0.6 * a + 0.8 * b]), "multiclass", 4, k=4,
                     temperature=1e-3)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], [1 / 3, 1 / 3, 1 / 3, 0.0])  # exp(-1000) ~ 0


def test_knn_binary_and_bad_inputs() -> None:
    xtr = np.array([[1.0, 0.0], [0.0, 1.0]])
    got = knn_scores(xtr, np.array([0, 1]), np.array([[2.0, 0.1]]), "binary", 2, k=1)
    np.testing.assert_array_equal(got, [[1.0, 0.0]])
    with pytest.raises(ValueError, match="num_classes == 2"):
        knn_scores(xtr, np.array([0, 1]), xtr, "binary", 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_scores(xtr, np.array([0, 2]), xtr, "binary", 2)
    with pytest.raises(ValueError, match="non-finite"):
        knn_scores(xtr, np.array([0, 1]), np.array([[np.nan, 0.0]]), "binary", 2)


# ------------------------------------------------------------------------------------------
# linear probe


def _direct_fit(xtr, ytr, xeval, C):
    """Standardise (fit on train, float64) and fit scikit-learn's lbfgs logistic regression."""
    xtr, xeval = np.asarray(xtr, np.float64), np.asarray(xeval, np.float64)
    scaler = StandardScaler().fit(xtr)
    model = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(xtr), ytr)
    return model.predict_proba(scaler.transform(xeval)), model


def test_linear_beats_chance_on_pneumoniamnist_and_selects_c_on_val(pneumonia) -> None:
    p = pneumonia
    res = linear_scores(p["xtr"], p["ytr"], p["xte"], "binary", 2, val_x=p["xva"], val_y=p["yva"])
    assert res.chosen_by == "val"
    assert res.scores.shape == (624, 2)
    np.testing.assert_allclose(res.scores.sum(axis=1), 1.0, atol=1e-12)
    # Measured: C = 0.1, test AUC 0.918, accuracy 0.856 (majority class: 0.625).
    auc = roc_auc_score(p["yte"], res.scores[:, 1])
    acc = float(np.mean(res.scores.argmax(axis=1) == p["yte"]))
    assert auc > 0.88 and acc > 0.80, (auc, acc)

    # The selection, recomputed with direct scikit-learn fits: val log-loss per C, argmin.
    losses = {}
    for C in DEFAULT_CS:
        proba, _ = _direct_fit(p["xtr"], p["ytr"], p["xva"], C)
        losses[C] = -np.mean(np.log(proba[np.arange(len(p["yva"])), p["yva"]]))
    assert res.C == min(losses, key=losses.get) == 0.1
    for C in DEFAULT_CS:
        assert res.val_losses[C] == pytest.approx(losses[C], rel=1e-9)
    # The final model is trained on train only with the chosen C.
    proba, _ = _direct_fit(p["xtr"], p["ytr"], p["xte"], res.C)
    np.testing.assert_allclose(res.scores, proba, rtol=1e-7, atol=1e-10)


def test_linear_inner_cv_without_val(retina) -> None:
    x, y, xte = retina["xtr"][:150], retina["ytr"][:150], retina["xte"]
    Cs = (1e-2, 1e-1, 1.0)
    res = linear_scores(x, y, xte, "multiclass", 5, Cs=Cs, seed=3)
    assert res.chosen_by == "inner-cv"
    counts = np.bincount(y, minlength=5)
    assert counts.min() >= 3  # so three folds
    folds = list(StratifiedKFold(3, shuffle=True, random_state=3).split(x, y))
    for C in Cs:
        total = 0.0
        for fit_rows, held in folds:
            proba, model = _direct_fit(x[fit_rows], y[fit_rows], x[held], C)
            assert list(model.classes_) == [0, 1, 2, 3, 4]
            # log-loss with probabilities clipped to [1e-15, 1 - 1e-15] (an overfitted fold
            # gives some held-out rows p < 1e-15 at C = 1)
            p_true = np.clip(proba[np.arange(held.size), y[held]], 1e-15, 1 - 1e-15)
            total -= np.log(p_true).sum()
        assert res.val_losses[C] == pytest.approx(total / len(y), rel=1e-9)
    assert res.C == min(res.val_losses, key=res.val_losses.get)
    proba, _ = _direct_fit(x, y, xte, res.C)
    np.testing.assert_allclose(res.scores, proba, rtol=1e-7, atol=1e-10)
    again = linear_scores(x, y, xte, "multiclass", 5, Cs=Cs, seed=3)
    np.testing.assert_array_equal(again.scores, res.scores)


def test_linear_missing_class_gets_a_zero_column(retina) -> None:
    keep = retina["ytr"] != 3
    x, y = retina["xtr"][keep], retina["ytr"][keep]
    res = linear_scores(x, y, retina["xte"], "ordinal", 5, val_x=retina["xva"],
                        val_y=retina["yva"], Cs=(0.01, 1.0))
    assert res.chosen_by == "val"  # val rows of class 3 get a clipped, finite loss
    assert all(np.isfinite(v) for v in res.val_losses.values())
    assert res.scores.shape == (60, 5)
    assert np.all(res.scores[:, 3] == 0.0)
    np.testing.assert_allclose(res.scores.sum(axis=1), 1.0, atol=1e-12)
    proba, _ = _direct_fit(x, y, retina["xte"], res.C)
    np.testing.assert_allclose(res.scores[:, [0, 1, 2, 4]], proba, rtol=1e-7, atol=1e-10)


def test_linear_too_few_samples_and_single_class() -> None:
    rng = np.random.default_rng(0)
    x, xte = rng.normal(size=(21, 6)), rng.normal(size=(5, 6))
    y = np.array([0] * 10 + [1] * 10 + [2])  # class 2 has one row: no stratified CV
    res = linear_scores(x, y, xte, "multiclass", 4)
    assert (res.C, res.chosen_by) == (1.0, "fixed (too few samples)")
    proba, _ = _direct_fit(x, y, xte, 1.0)
    np.testing.assert_allclose(res.scores[:, :3], proba, rtol=1e-7, atol=1e-10)
    assert np.all(res.scores[:, 3] == 0.0)
    one = linear_scores(x, np.full(21, 2), xte, "multiclass", 4)
    assert one.chosen_by == "fixed (one class in train)"
    np.testing.assert_array_equal(one.scores, np.tile([0.0, 0.0, 1.0, 0.0], (5, 1)))


def test_linear_multilabel_one_vs_rest(retina) -> None:
    x, grade = retina["xtr"], retina["ytr"]
    y = np.column_stack([grade >= 1, grade >= 3, np.zeros_like(grade)]).astype(np.float32)
    yva = np.column_stack([retina["yva"] >= 1, retina["yva"] >= 3,
                           np.zeros_like(retina["yva"])]).astype(np.float32)
    res = linear_scores(x, y, retina["xte"], "multilabel", 3, val_x=retina["xva"], val_y=yva,
                        Cs=(0.01, 0.1, 1.0))
    assert res.chosen_by == "val" and res.scores.shape == (60, 3)
    for j in range(2):
        proba, _ = _direct_fit(x, y[:, j].astype(int), retina["xte"], res.C)
        np.testing.assert_allclose(res.scores[:, j], proba[:, 1], rtol=1e-7, atol=1e-10)
    assert np.all(res.scores[:, 2] == 0.0)  # a label never positive in train: its rate, 0
    cv = linear_scores(x, y, retina["xte"], "multilabel", 3, Cs=(0.01, 0.1))
    assert cv.chosen_by == "inner-cv" and set(cv.val_losses) == {0.01, 0.1}


def test_linear_records_non_convergence_instead_of_warning(monkeypatch, recwarn) -> None:
    import midol.evaluation.protocols as protocols

    monkeypatch.setattr(protocols, "MAX_ITER", 3)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 40)), rng.integers(0, 3, 60)
    res = linear_scores(x, y, x[:4], "multiclass", 3, Cs=(100.0,))
    # 3 inner-CV folds + the final fit, all stopped by max_iter=3.
    assert res.notes == ["lbfgs reached max_iter=3 in 4 fit(s) at C=100"]
    assert not [w for w in recwarn if "converge" in str(w.message)]
