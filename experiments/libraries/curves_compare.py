"""Loss curves from Lightning CSVLogger files: midol's ``midol.analysis.curves.read_metrics`` +
``smooth`` against pandas (``read_csv``, concat of a resumed run's versions, last value per
step, ``rolling(window, min_periods=1).mean()``).

Inputs: every ``metrics.csv`` of the demo M-IDoL run (``outputs/demo/logs/version_*``: a run
and its resume; ``make demo``), real training logs. Reported: equal series (steps and values,
max abs difference), time (best of 20, includes reading the files and importing nothing).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/libraries/curves_compare.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.libraries.common import REPO, best_time, load_average  # noqa: E402
from midol.analysis.curves import read_metrics, smooth  # noqa: E402


def pandas_series(paths: list[Path], window: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import pandas as pd

    frame = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    frame = frame[frame["step"].notna()]
    out = {}
    for column in frame.columns:
        if column in ("step", "epoch"):
            continue
        cells = frame[["step", column]].dropna()
        cells = cells.assign(step=cells["step"].astype(float).astype(int))
        last = cells.groupby("step", sort=True)[column].last()
        values = last.to_numpy(dtype=np.float64)
        out[column] = (last.index.to_numpy(), pd.Series(values).rolling(window, min_periods=1).mean().to_numpy())
    return out


def main() -> int:
    paths = sorted((REPO / "outputs/demo/logs").glob("version_*/metrics.csv"))
    if not paths:
        raise SystemExit("outputs/demo/logs has no metrics.csv: run `make demo` first")
    start = time.perf_counter()
    import pandas  # noqa: F401 - timed once: analyze would pay it per run

    import_s = time.perf_counter() - start
    window = 5

    def ours() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {k: (s, smooth(v, window)) for k, (s, v) in read_metrics(paths).items()}

    t_ours, a = best_time(ours, repeats=20)
    t_pd, b = best_time(lambda: pandas_series(paths, window), repeats=20)
    diffs = [float(np.abs(a[k][1] - b[k][1]).max()) for k in a if k in b and len(a[k][1]) == len(b[k][1])]
    report = {
        "load": load_average(), "files": [str(p.relative_to(REPO)) for p in paths],
        "rows": sum(sum(1 for _ in open(p)) - 1 for p in paths), "columns": len(a),
        "same_columns": sorted(a) == sorted(b),
        "same_steps": all(np.array_equal(a[k][0], b[k][0]) for k in a if k in b),
        "max_abs_diff": max(diffs) if diffs else None,
        "midol_ms": 1e3 * t_ours, "pandas_ms": 1e3 * t_pd, "pandas_import_s": import_s,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
