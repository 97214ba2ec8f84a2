"""L_route and L_cst over training (paper Fig. 6) from a CSVLogger ``metrics.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from midol.analysis.plotting import new_figure

DEFAULT_KEYS = ("train/l_route", "train/l_cst")
# Human names of the logged keys for titles and y-axes (a raw key is shown as it is).
KEY_NAMES: dict[str, str] = {
    "train/l_route": "routing-consistency loss L_route",
    "train/l_cst": "intra-expert contrastive loss L_cst",
    "train/loss": "total training loss",
    "train/l_mae": "MAE reconstruction loss L_MAE",
    "train/l_co": "director-expert coherence loss L_co",
    "train/l_bal": "balance loss L_bal",
}


def read_metrics(paths: list[str | Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` of every non-empty cell of one or more CSVLogger files
    (e.g. the versions of a resumed run), sorted by step; a step logged twice keeps the last."""
    series: dict[str, dict[int, float]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file not found: {path}")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if "step" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no 'step' column (expected a Lightning CSVLogger metrics.csv)")
            for row in reader:
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in (None, ""):
                        series.setdefault(key, {})[int(float(step))] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def find_metrics(checkpoint: str | Path) -> Path | None:
    """The newest ``metrics.csv`` under the run folder of ``checkpoint`` (``<run>/checkpoints/
    x.ckpt`` -> ``<run>/**/metrics.csv``), or None: possibly another run's; ``midol analyze``
    reads the files the checkpoint records (:func:`midol.utils.run_logs.run_metrics_files`)."""
    from midol.utils.run_logs import newest_metrics

    return newest_metrics(checkpoint)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def loss_curves(metrics: dict[str, tuple[np.ndarray, np.ndarray]],
                keys: tuple[str, ...] = DEFAULT_KEYS, window: int = 10) -> Figure:
    """One panel per logged key (raw values faint, moving average bold), 4.5 x 3.5 inches each.
    Keys never logged (e.g. ``train/l_route`` of the no-MoE baseline) are left out; none at all
    is an error."""
    present = [k for k in keys if k in metrics]
    if not present:
        raise ValueError(f"none of {list(keys)} is in the metrics (logged: {sorted(metrics)[:12]})")
    fig = new_figure(4.5 * len(present), 3.5)
    for i, key in enumerate(present):
        steps, values = metrics[key]
        ax = fig.add_subplot(1, len(present), i + 1)
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1)
        ax.plot(steps, smooth(values, window), color="tab:blue", linewidth=2,
                label=f"moving average ({window})")
        ax.set_xlabel("optimiser step")
        name = KEY_NAMES.get(key, key)
        ax.set_ylabel(name.split(" L_")[0] if key in KEY_NAMES else key, fontsize=9)
        ax.set_title(f"{name}\n({key})" if key in KEY_NAMES else key, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
