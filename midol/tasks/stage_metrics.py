"""One metric collection per stage (train / val / test), computed and reset at each stage's
epoch end: the one piece the task modules and MedMIX share (``stage_results`` names the values)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from midol.tasks.task_metrics import stage_results

STAGES = ("train", "val", "test")


class StageMetrics(nn.ModuleDict):
    """``make()`` returns a fresh ``{name: Metric}``; one collection per stage, keyed
    ``<stage>_`` (the module attribute that holds it keeps the checkpoint keys of midol 0.1)."""

    def __init__(self, make: Callable[[], dict[str, Metric]]) -> None:
        super().__init__({f"{s}_": MetricCollection(make()) for s in STAGES})  # type: ignore[arg-type]

    def of(self, stage: str) -> MetricCollection:
        collection = self[f"{stage}_"]
        assert isinstance(collection, MetricCollection)
        return collection

    def results(self, stage: str, names: list[str] | None = None,
                names_of: Callable[[str], list[str] | None] | None = None,
                macro_values: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Compute and reset ``stage``: scalars as they are, per-class vectors as
        ``name_<class>`` plus their macro mean under ``name`` (:func:`stage_results`)."""
        return stage_results(self.of(stage), stage, names, names_of, macro_values)
