"""Loggers: W&B that goes offline by itself when no API key is configured."""

from __future__ import annotations

import fnmatch
import math
import netrc
import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_credentials_available() -> bool:
    """An API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# Metric name patterns -> direction of their best-so-far summary.
DEFAULT_BEST: dict[str, str] = {
    "val/loss": "min", "val/auc*": "max", "val/acc*": "max", "val/dice*": "max",
    "val/iou*": "max", "knn/*": "max",
}


class BestSoFar:
    """Best value of each metric whose name matches a pattern (fnmatch) of ``directions``."""

    def __init__(self, directions: Mapping[str, str]) -> None:
        bad = {k: v for k, v in directions.items() if v not in ("max", "min")}
        if bad:
            raise ValueError(f"best_metrics directions must be 'max' or 'min', got {bad}")
        self.directions = dict(directions)
        self.best: dict[str, float] = {}

    def direction(self, name: str) -> str | None:
        if name in self.directions:  # an exact name wins over a pattern
            return self.directions[name]
        return next((d for p, d in self.directions.items() if fnmatch.fnmatchcase(name, p)), None)

    def update(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The ``best/<name>`` entries that improved with ``metrics``."""
        improved: dict[str, float] = {}
        for name, value in metrics.items():
            way = self.direction(name)
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if way is None or not math.isfinite(v):
                continue
            old = self.best.get(name)
            if old is None or (v > old if way == "max" else v < old):
                self.best[name] = v
                improved[f"best/{name}"] = v
        return improved


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger; ``offline=None`` (default) means offline when no API key is
    set, so a run never stalls on a login prompt. Sync later with ``wandb sync``.

    W&B keeps the *last* logged value of a metric as the run's summary, so a sweep would rank
    runs on their last epoch. This logger also keeps ``best/<metric>`` in the summary (the best
    value so far, by ``best_metrics``: name pattern -> ``max`` or ``min``; default: validation
    AUC/accuracy/Dice/IoU up, validation loss down, k-NN accuracy up): sweeps optimise
    ``best/val/auc``.
    """

    def __init__(
        self,
        project: str = "midol",
        name: str | None = None,
        save_dir: str = ".",
        offline: bool | None = None,
        log_model: bool = False,
        entity: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        best_metrics: dict[str, str] | None = None,
        **kwargs: Any,
    ):
        if offline is None:
            offline = not wandb_credentials_available()
        super().__init__(
            project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model,
            entity=entity, tags=tags, group=group, **kwargs,
        )
        self._best = BestSoFar(DEFAULT_BEST if best_metrics is None else best_metrics)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        improved = self._best.update(metrics)
        if improved:
            self.experiment.summary.update(improved)
