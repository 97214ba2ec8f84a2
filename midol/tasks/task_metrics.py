"""Downstream metrics on torchmetrics, with undefined cases kept out of the averages.

torchmetrics scores a class that has no positive (or no negative) target as AUC 0 and then
averages it in; here such a class is NaN and left out of the macro average (with a warning),
so a tiny validation split without one class does not drag the macro AUC down.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelAUROC,
)
from torchmetrics.utilities.data import dim_zero_cat


class OneVsRestAUROC(MulticlassAUROC):
    """Per-class one-vs-rest AUC of softmax scores; NaN for a class absent from the targets."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, average=None, thresholds=None, **kwargs)

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target)
        present = torch.bincount(target.long().flatten(), minlength=self.num_classes) > 0
        # With a single class present no one-vs-rest AUC is defined.
        if present.sum() < 2:
            return torch.full((self.num_classes,), float("nan"), device=target.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(positive|negative) samples.*")
            per_class = super().compute()
        return torch.where(present, per_class, torch.full_like(per_class, float("nan")))


class PerLabelAUROC(MultilabelAUROC):
    """Per-label AUC; NaN for a label whose targets are all 0 or all 1."""

    def __init__(self, num_labels: int, **kwargs):
        super().__init__(num_labels=num_labels, average=None, thresholds=None, **kwargs)

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target)
        defined = (target == 1).any(dim=0) & (target == 0).any(dim=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(positive|negative) samples.*")
            per_label = super().compute()
        return torch.where(defined, per_label, torch.full_like(per_label, float("nan")))


class DicePerClass(MulticlassF1Score):
    """Per-class Dice over all pixels seen (global); NaN for a class absent from both
    predictions and targets."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs):
        super().__init__(
            num_classes=num_classes, average="none", multidim_average="global",
            ignore_index=ignore_index, **kwargs,
        )

    def compute(self) -> torch.Tensor:
        dice = super().compute()
        seen = (self.tp + self.fp + self.fn) > 0
        return torch.where(seen, dice, torch.full_like(dice, float("nan")))


class DicePerImage(Metric):
    """Per-class Dice computed on every image, then averaged over images, with the empty-mask
    rule of the segmentation code the M-IDoL authors point to (MaCo): an image whose ground
    truth lacks the class scores 1 if the prediction lacks it too, else 0. At many empty masks
    (SIIM pneumothorax: ~80 %) this differs a lot from the pooled :class:`DicePerClass`."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds`` and ``target``: B x H x W class indices."""
        valid = (target != self.ignore_index) if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        classes = torch.arange(self.num_classes, device=preds.device).view(1, -1, 1)
        p = (preds.flatten(1).unsqueeze(1) == classes) & valid.flatten(1).unsqueeze(1)
        t = (target.flatten(1).unsqueeze(1) == classes) & valid.flatten(1).unsqueeze(1)
        inter = (p & t).sum(-1).double()
        size = p.sum(-1).double() + t.sum(-1).double()
        empty_gt = t.sum(-1) == 0
        dice = torch.where(empty_gt, (p.sum(-1) == 0).double(), 2 * inter / size.clamp_min(1))
        self.total += dice.sum(0)
        self.images += preds.shape[0]

    def compute(self) -> torch.Tensor:
        if self.images == 0:
            return torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        return (self.total / self.images).float()


class IoUPerClass(MulticlassJaccardIndex):
    """Per-class IoU over all pixels seen (global); NaN for a class absent from both."""

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs):
        super().__init__(num_classes=num_classes, average="none", ignore_index=ignore_index, **kwargs)

    def compute(self) -> torch.Tensor:
        iou = super().compute()
        union = self.confmat.sum(0) + self.confmat.sum(1) - self.confmat.diag()
        return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def macro(values: torch.Tensor, what: str = "metric") -> torch.Tensor:
    """Mean over the finite entries; warns naming how many were undefined."""
    finite = torch.isfinite(values)
    if not finite.all():
        warnings.warn(
            f"{what}: {int((~finite).sum())} of {values.numel()} classes/labels are undefined "
            "(no positive or no negative example) and left out of the macro average",
            stacklevel=2,
        )
    if not finite.any():
        return values.new_tensor(float("nan"))
    return values[finite].mean()


def classification_metrics(num_classes: int) -> dict[str, Metric]:
    """ACC (top-1 over all images) and per-class one-vs-rest AUC (macro-averaged when logged)."""
    return {
        "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "auc": OneVsRestAUROC(num_classes),
    }


def multilabel_metrics(num_labels: int) -> dict[str, Metric]:
    """Per-label AUC (logged per label and as the macro mean)."""
    return {"auc": PerLabelAUROC(num_labels)}


def segmentation_metrics(num_classes: int, ignore_index: int | None = 255) -> dict[str, Metric]:
    """Per-class Dice (= F1) and IoU (= Jaccard), accumulated over every pixel of the stage
    (dataset-level, as mmsegmentation computes mDice/mIoU); pixels equal to ``ignore_index``
    are not counted. Logged as the mean over the foreground classes 1..C-1. Also
    ``dice_per_image`` (:class:`DicePerImage`, the definition the paper's comparisons use)."""
    return {
        "dice": DicePerClass(num_classes, ignore_index),
        "dice_per_image": DicePerImage(num_classes, ignore_index),
        "iou": IoUPerClass(num_classes, ignore_index),
    }


def stage_results(
    metrics: Any,
    stage: str,
    names: list[str] | None = None,
    names_of: Callable[[str], list[str] | None] | None = None,
    macro_values: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Compute and reset a stage's metrics (a ``MetricCollection``): scalars as they are,
    per-class vectors as ``name_<class>`` plus their macro mean (undefined entries left out)
    under ``name``. Class names come from ``names_of(metric)`` or ``names`` (default: numbers);
    ``macro_values`` picks the entries that enter the mean (segmentation: the foreground)."""
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        if metric.update_count == 0:
            continue
        value = metric.compute()
        if value.ndim == 0:
            out[f"{stage}/{name}"] = float(value)
        else:
            labels = (names_of(name) if names_of else None) or names or [str(i) for i in range(value.numel())]
            values = macro_values(name, value) if macro_values else value
            out[f"{stage}/{name}"] = float(macro(values, f"{stage}/{name}"))
            if _same_pair(value):
                continue  # binary one-vs-rest AUC: both classes score the same, log it once
            for label, v in zip(labels, value.tolist(), strict=False):
                if math.isfinite(v):
                    out[f"{stage}/{name}_{label}"] = v
        metric.reset()
    return out


def _same_pair(value: torch.Tensor) -> bool:
    """Two finite per-class entries that are equal (one number, not three identical columns)."""
    if value.numel() != 2 or not bool(torch.isfinite(value).all()):
        return False
    return abs(float(value[0]) - float(value[1])) < 1e-6
