"""Patient-grouped, class-stratified splits: midol's way (``midol.data.splits.seeded_split`` over
the unique patients, each patient's stratum the class of its first image, as
``midol.evaluation.suite._carve`` does; imported read-only) against scikit-learn's
``StratifiedGroupKFold`` (one of 5 folds as the 20 % test part) and ``GroupShuffleSplit``
(test_size 0.2, not stratified).

Data: the NIH normal/abnormal chest X-rays of ../shared/data (800 images; patient = the first
part of the NIH image index, e.g. ``00000231`` of ``00000231_013.png``), 10 seeds.
Reported per method: patients on two sides (must be 0), the test part's share of images,
the largest deviation of a class's share in the test part from its share overall (mean over
seeds), time per split.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/split_compare.py
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import load_average, need_shared_data  # noqa: E402
from midol.data.splits import seeded_split  # noqa: E402


def midol_split(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    unique, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    g_rest, g_test = seeded_split(len(unique), [0.2], seed, y[first])
    return np.flatnonzero(np.isin(inverse, g_rest)), np.flatnonzero(np.isin(inverse, g_test))


def sgkf_split(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train, test = next(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(y, y, groups))
    return train, test


def gss_split(y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train, test = next(GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(y, y, groups))
    return train, test


def main() -> int:
    root = need_shared_data()
    with open(root / "chest_xray/nih_normal_abnormal_64px/labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([r["label"] == "abnormal" for r in rows], dtype=np.int64)
    groups = np.array([r["nih_image_index"].split("_")[0] for r in rows])
    overall = np.bincount(y) / len(y)
    report: dict[str, object] = {"load": load_average(), "images": len(y),
                                 "patients": len(set(groups.tolist())), "abnormal_share": float(overall[1])}
    for name, fn in (("midol seeded_split over patients", midol_split),
                     ("sklearn StratifiedGroupKFold(5), fold 0", sgkf_split),
                     ("sklearn GroupShuffleSplit(test_size=0.2)", gss_split)):
        leaks, shares, devs, times = [], [], [], []
        for seed in range(10):
            start = time.perf_counter()
            train, test = fn(y, groups, seed)
            times.append(time.perf_counter() - start)
            leaks.append(len(set(groups[train]) & set(groups[test])))
            shares.append(len(test) / len(y))
            devs.append(float(np.abs(np.bincount(y[test], minlength=2) / len(test) - overall).max()))
        report[name] = {"patients_on_two_sides": int(sum(leaks)),
                        "test_share_mean": float(np.mean(shares)),
                        "test_share_range": [float(min(shares)), float(max(shares))],
                        "class_share_deviation_mean": float(np.mean(devs)),
                        "class_share_deviation_max": float(np.max(devs)),
                        "ms_per_split": 1e3 * float(np.median(times))}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
