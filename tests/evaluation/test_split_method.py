"""``split_method: stratified_group_kfold`` (scikit-learn) against midol's patient carving on the
real NIH chest X-rays of ../shared/data (800 images, patients of very different sizes): no
patient on both sides either way; the library's test part is closer to its image share and to
the class balance (issue 28 item 5)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from midol.evaluation.suite import SuiteError, _parse_task, load_suite, load_task
from tests.helpers.paths import REPO_ROOT, SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "chest_xray").is_dir(), reason="needs ../shared/data")


def _nih(method: str, seed: int):
    suite = load_suite(REPO_ROOT / "configs" / "eval" / "shared_data.yaml", data_root=str(SHARED_DATA))
    spec = next(t for t in suite.tasks if t.name == "nih_normal_abnormal")
    spec = dataclasses.replace(spec, split_method=method, split_seed=seed, test_fraction=0.2)
    return load_task(spec, suite.data_root)


def _shares(task) -> tuple[float, float]:
    train, test = task.splits["train"].targets, task.splits["test"].targets
    assert set(task.groups["train"]).isdisjoint(task.groups["test"])  # no patient on two sides
    n = len(train) + len(test)
    overall = np.concatenate([train, test]).mean()
    return len(test) / n, abs(test.mean() - overall)


def test_group_kfold_keeps_patients_apart_and_hits_the_share_better() -> None:
    ours = [_shares(_nih("patients", s)) for s in range(4)]
    library = [_shares(_nih("stratified_group_kfold", s)) for s in range(4)]
    assert all(abs(share - 0.2) < 0.01 for share, _ in library), library
    assert max(abs(share - 0.2) for share, _ in library) < max(abs(share - 0.2) for share, _ in ours)
    assert max(dev for _, dev in library) < 0.02


def test_an_unknown_split_method_is_refused() -> None:
    task = {"name": "t", "type": "binary", "train": {"path": "x.csv"}, "test_fraction": 0.2,
            "split_method": "random"}
    with pytest.raises(SuiteError, match="split_method must be patients or stratified_group_kfold"):
        _parse_task(task, "suite")
