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


def _monai_metrics() -> Any:
    """``monai.metrics``, imported when a segmentation metric is built (a few seconds, so not at
    ``import midol``), so a missing extra fails before training, not at the first validation."""
    try:
        import monai.metrics
    except ImportError as err:
        raise ImportError("segmentation metrics need MONAI: pip install 'midol[seg]'") from err
    return monai.metrics


class DicePerImage(Metric):
    """Per-class Dice computed on every image, then averaged over images, with the empty-mask
    rule of the segmentation code the M-IDoL authors point to (MaCo): an image whose ground
    truth lacks the class scores 1 if the prediction lacks it too, else 0. At many empty masks
    (SIIM pneumothorax: ~80 %) this differs a lot from the pooled :class:`DicePerClass`.

    The per-image values are MONAI's ``compute_dice`` (``ignore_empty=False`` is that rule);
    equal to midol's former own code on PH2 and DRIVE and 6-9x faster
    (``experiments/results/library_choices_2026-12-08.md``). This class only sums them in
    torchmetrics states, so they are reduced across ranks."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _monai_metrics()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds`` and ``target``: B x H x W class indices."""
        if preds.shape != target.shape or preds.ndim != 3:
            raise ValueError(f"preds and target must both be B x H x W, got {tuple(preds.shape)} "
                             f"and {tuple(target.shape)}")
        dice = _monai_metrics().compute_dice(
            preds[:, None], target[:, None], include_background=True, ignore_empty=False,
            num_classes=self.num_classes, ignore_index=self.ignore_index)
        self.total += dice.double().sum(0)
        self.images += preds.shape[0]

    def compute(self) -> torch.Tensor:
        if self.images == 0:
            return torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        return (self.total / self.images).float()


class HD95PerClass(Metric):
    """95th-percentile Hausdorff distance (pixels) per class, averaged over images: the boundary
    error segmentation papers report beside Dice. Per image it is MONAI's
    ``compute_hausdorff_distance(percentile=95)`` (the larger of the two directed 95th
    percentiles of boundary-to-boundary distances; equal to a scipy restatement to 3e-5 px on
    PH2 and DRIVE, ``experiments/results/library_choices_2026-12-08.md``).

    Undefined cases, so that an empty prediction is not hidden: an image whose ground truth or
    prediction (but not both) lacks the class scores the image diagonal, the largest distance
    possible; an image where both lack it is not counted. Pixels equal to ``ignore_index`` are
    removed from both masks. Background (class 0) is NaN (not computed)."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"HD95 needs a foreground class: num_classes >= 2, got {num_classes}")
        _monai_metrics()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds`` and ``target``: B x H x W class indices."""
        if preds.shape != target.shape or preds.ndim != 3:
            raise ValueError(f"preds and target must both be B x H x W, got {tuple(preds.shape)} "
                             f"and {tuple(target.shape)}")
        valid = (target != self.ignore_index) if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        classes = torch.arange(1, self.num_classes, device=preds.device).view(1, -1, 1, 1)
        p = (preds[:, None] == classes) & valid[:, None]
        t = (target[:, None] == classes) & valid[:, None]
        has_p, has_t = p.flatten(2).any(-1), t.flatten(2).any(-1)
        with warnings.catch_warnings():
            # MONAI warns for every empty mask; those cases are handled below
            warnings.filterwarnings("ignore", message=".*is all 0.*")
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            # a leading background channel that include_background=False drops (MONAI's layout)
            hd = _monai_metrics().compute_hausdorff_distance(
                torch.cat([torch.zeros_like(p[:, :1]), p], 1).float(),
                torch.cat([torch.zeros_like(t[:, :1]), t], 1).float(),
                include_background=False, percentile=95).to(torch.float64)
        diagonal = math.hypot(*preds.shape[-2:])
        hd = torch.where(has_p & has_t, hd, torch.full_like(hd, diagonal))
        counted = has_p | has_t
        self.total[1:] += torch.where(counted, hd, torch.zeros_like(hd)).sum(0).to(self.total)
        self.count[1:] += counted.sum(0).to(self.count)

    def compute(self) -> torch.Tensor:
        out = self.total / self.count.clamp_min(1)
        out[self.count == 0] = float("nan")
        out[0] = float("nan")
        return out.float()


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
    ``dice_per_image`` (:class:`DicePerImage`, the definition the paper's comparisons use) and
    ``hd95`` (:class:`HD95PerClass`, pixels, lower is better)."""
    return {
        "dice": DicePerClass(num_classes, ignore_index),
        "dice_per_image": DicePerImage(num_classes, ignore_index),
        "hd95": HD95PerClass(num_classes, ignore_index),
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
