"""Fixtures of the evaluation tests: real MedMNIST test labels with LogisticRegression
probabilities (the metric and statistics references run on these)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.helpers.paths import SHARED_DATA

MEDMNIST = SHARED_DATA / "medmnist"


def _medmnist(name: str, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Test labels and LogisticRegression probabilities (``pool x pool``-averaged pixels)."""
    path = MEDMNIST / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found (needs the project's shared data folder ../shared/data)")
    data = np.load(path)

    def features(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float64) / 255.0
        x = x[..., None] if x.ndim == 3 else x
        n, h, w, c = x.shape
        return x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4)).reshape(n, -1)

    model = LogisticRegression(max_iter=300)
    model.fit(features(data["train_images"]), data["train_labels"].ravel())
    return data["test_labels"].ravel().astype(np.int64), model.predict_proba(
        features(data["test_images"]))


@pytest.fixture(scope="module")
def pneumonia() -> tuple[np.ndarray, np.ndarray]:
    return _medmnist("pneumoniamnist", 4)  # 624 x 2, about 85 % accurate


@pytest.fixture(scope="module")
def retina() -> tuple[np.ndarray, np.ndarray]:
    return _medmnist("retinamnist", 4)  # 400 x 5 grades, about 55 % accurate
