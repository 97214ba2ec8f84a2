"""Routing-table statistics: midol's own NMI / MI (``midol.utils.cluster_metrics`` before this
measurement, restated here) against scikit-learn's ``normalized_mutual_info_score`` (on the
table expanded back to one label pair per image) and ``mutual_info_score(contingency=...)``.

Tables: the demo M-IDoL run's routing table (``outputs/demo/routing_table.md``, 317 real
images of 4 modalities; ``make demo``) when present, and that table scaled x100 (31,700
images, the size of a large evaluation), plus the degenerate tables whose conventions matter
(a single expert, a single modality, an all-one-row table).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/cluster_compare.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import REPO, best_time, load_average  # noqa: E402


def own_nmi(table: np.ndarray) -> float:
    """midol's former code: MI of counts/n over the arithmetic mean of the marginal entropies,
    empty rows/columns dropped, 1 for a 1 x 1 table, 0 for MI 0."""
    t = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0].astype(np.float64)
    if t.shape[0] == t.shape[1] == 1:
        return 1.0
    joint = t / t.sum()
    outer = joint.sum(axis=1, keepdims=True) @ joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    mi = max(float((joint[nz] * np.log(joint[nz] / outer[nz])).sum()), 0.0)
    if mi <= 0:
        return 0.0

    def h(v: np.ndarray) -> float:
        q = v[v > 0] / v.sum()
        return float(-(q * np.log(q)).sum())

    return mi / ((h(t.sum(axis=1)) + h(t.sum(axis=0))) / 2)


def labels(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (expert, modality) pair per image of an integer count table."""
    experts, modalities = np.nonzero(table)
    reps = table[experts, modalities].astype(np.int64)
    return np.repeat(experts, reps), np.repeat(modalities, reps)


def sklearn_nmi(table: np.ndarray) -> float:
    e, m = labels(table)
    return float(normalized_mutual_info_score(m, e))


def demo_table() -> np.ndarray | None:
    path = REPO / "outputs/demo/routing_table.md"
    if not path.exists():
        return None
    rows = [line.split("|")[2:-2] for line in path.read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    return np.array([[int(c) for c in row] for row in rows])


def main() -> int:
    tables: dict[str, np.ndarray] = {}
    demo = demo_table()
    if demo is not None:
        tables["demo routing (317 images)"] = demo
        tables["demo routing x100 (31,700 images)"] = demo * 100
    tables["one expert"] = np.array([[5, 7, 9]])
    tables["one modality"] = np.array([[5], [7], [0]])
    tables["independent"] = np.array([[2, 4], [1, 2]])
    tables["perfect"] = np.array([[9, 0], [0, 4]])
    rows = []
    for name, table in tables.items():
        t_own, own = best_time(lambda: own_nmi(table), repeats=20)  # noqa: B023
        t_skl, skl = best_time(lambda: sklearn_nmi(table), repeats=20)  # noqa: B023
        t_mi, mi = best_time(lambda: mutual_info_score(None, None, contingency=table), repeats=20)  # noqa: B023
        rows.append({"table": name, "shape": list(table.shape), "images": int(table.sum()),
                     "nmi_own": own, "nmi_sklearn": skl, "abs_diff": abs(own - skl),
                     "mi_sklearn_contingency": float(mi), "own_ms": 1e3 * t_own,
                     "sklearn_ms": 1e3 * t_skl, "sklearn_mi_ms": 1e3 * t_mi,
                     "finite": math.isfinite(skl)})
    print(json.dumps({"load": load_average(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
