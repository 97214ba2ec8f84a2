"""Continued pre-training: a method's backbone started from released weights, with its report.

The report (:class:`~midol.models.weight_maps.LoadReport`) is printed when the backbone is
built and written as ``init_report.json`` into the run folder (``trainer.default_root_dir``)
when ``fit`` starts, so a run records what it started from."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from midol.models.backbone import load_backbone_weights
from midol.models.weight_maps import LAYOUTS, InitWeightsError, LoadReport

DEFAULT_MIN_LOADED = 0.95  # a whole ViT-B block is 12 of 152 tensors (8 %): refused


def load_init_weights(model: nn.Module, path: str | Path | None, layout: str,
                      min_loaded: float) -> LoadReport | None:
    """Load ``path`` into ``model`` (see :func:`~midol.models.backbone.load_backbone_weights`)
    and print the report's table (rank zero); None without a file. ``layout`` and
    ``min_loaded`` are checked even then (a typo should not wait for the day a file is set)."""
    if layout not in LAYOUTS:
        raise InitWeightsError(f"init_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 0.0 <= min_loaded <= 1.0:
        raise InitWeightsError(f"min_loaded must lie in [0, 1], got {min_loaded!r}")
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"init_checkpoint {path} not found (relative paths are from {Path.cwd()}): midol never "
            "downloads; fetch the released file by hand (a continue preset's comment names it)")
    report = load_backbone_weights(model, path, layout, min_loaded)
    rank_zero_info(report.table())
    return report


def save_init_report(module: L.LightningModule, report: LoadReport | None) -> Path | None:
    """Write ``report`` into the run folder of ``module``'s trainer (global rank zero only)."""
    if report is None or not module.trainer.is_global_zero:
        return None
    return report.save(module.trainer.default_root_dir)
