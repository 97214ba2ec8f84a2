"""Multi-class classification: cross-entropy with label smoothing, Mixup/CutMix; ACC and macro
one-vs-rest AUC (docs/papers/m-idol.md, 'Downstream protocol')."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from midol.tasks.base import FinetuneModule, FinetuneModuleOptions
from midol.tasks.task_metrics import classification_metrics


class LinearHead(nn.Module):
    """Optional BatchNorm without affine parameters (MAE's linear probe), dropout, linear layer."""

    def __init__(self, in_features: int, out_features: int, norm: bool, dropout: float, init_std: float):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=1e-6) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, out_features)
        nn.init.trunc_normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.norm(features)))


class NamedClasses:
    """Class names of a classifier's outputs (metrics, prediction files): the datamodule's when
    none were given, its class count checked. Shared by the image and the group classifier."""

    num_classes: int
    class_names: list[str] | None

    def check_classes(self, datamodule: Any) -> None:
        n = getattr(datamodule, "num_classes", None)
        if n is not None and n != self.num_classes:
            raise ValueError(f"model.num_classes={self.num_classes} but the data have {n} classes")
        if self.class_names is None and getattr(datamodule, "classes", None):
            self.class_names = list(datamodule.classes)

    def metric_names(self, name: str) -> list[str] | None:
        return self.class_names

    def output_names(self) -> list[str] | None:
        return self.class_names

    def set_output_names(self, names: list[str]) -> None:
        if len(names) == self.num_classes:
            self.class_names = list(names)


class ClassificationModuleOptions(FinetuneModuleOptions, Protocol):
    """``self.hparams`` of :class:`ClassificationModule`: its ``__init__`` arguments, typed, so that a
    misspelt option name is a type error (``tests/test_options_typed.py`` keeps them equal)."""

    num_classes: int
    label_smoothing: float
    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float
    mix_switch_prob: float
    head_norm: bool
    head_dropout: float
    head_init_std: float
    class_names: list[str] | None


class ClassificationModule(NamedClasses, FinetuneModule):
    """Multi-class classification on pooled backbone features.

    Args:
        num_classes: number of classes (checked against the datamodule).
        label_smoothing: cross-entropy label smoothing (also applied to Mixup/CutMix targets).
        mixup_alpha: Mixup's Beta(alpha, alpha) parameter; 0 (with cutmix_alpha 0) turns mixing off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter; 0 turns CutMix off.
        mix_prob: probability of mixing a batch (timm ``Mixup``; needs even batch sizes).
        mix_switch_prob: probability of CutMix instead of Mixup when both are on.
        head_norm: BatchNorm (no affine) before the linear head, as MAE's linear probe.
        head_dropout: dropout before the linear head.
        head_init_std: std of the head's truncated-normal initialisation.
        class_names: names used in per-class metric keys (default: the datamodule's classes).
        **kwargs: backbone, optimiser and schedule arguments of :class:`FinetuneModule`.
    """

    monitor = "val/auc"
    monitor_mode = "max"
    prediction = "softmax"

    if TYPE_CHECKING:

        @property
        def hparams(self) -> ClassificationModuleOptions: ...  # type: ignore[override]

    def __init__(
        self,
        num_classes: int,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        head_norm: bool = False,
        head_dropout: float = 0.0,
        head_init_std: float = 0.01,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.head = LinearHead(self.backbone.num_features, num_classes, head_norm, head_dropout, head_init_std)
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mix_prob,
                switch_prob=mix_switch_prob, label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        if self.mixup is not None and self.hparams.cache_features:
            raise ValueError("Mixup/CutMix mixes images before the backbone: turn off cache_features")
        self.init_metrics(lambda: classification_metrics(num_classes))

    def heads(self) -> list[nn.Module]:
        return [self.head]

    def decode(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def check_datamodule(self, datamodule: Any) -> None:
        self.check_classes(datamodule)

    def augment(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self.mixup is None:
            return x, target, False
        if x.shape[0] % 2:
            raise ValueError(
                f"Mixup/CutMix needs an even batch size, got {x.shape[0]} (use an even "
                "data.batch_size with data.drop_last: true)"
            )
        return (*self.mixup(x, target), True)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, train: bool) -> torch.Tensor:
        logits = logits.float()
        if target.ndim == 2:  # soft targets from Mixup/CutMix (smoothing already inside)
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing if train else 0.0)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor) -> None:
        metrics.update(logits.float().softmax(dim=-1), target)
